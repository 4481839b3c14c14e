"""Evaluation behind a registry (kind ``evaluator``, config ``eval.metrics``): accuracy (overall, groups,
per client), calibration and OOD detection; the next systems add ASR, robust accuracy, per-width
accuracy and leakage risk as evaluators."""

from fedtrust.evaluation.clients import score_client
from fedtrust.evaluation.evaluate import evaluate
from fedtrust.evaluation.predict import predict_all, predict_logits
from fedtrust.evaluation.setup import ClientEvaluator, ClientScores, EvalScores, EvalSetup, EvaluatesClients

__all__ = ["ClientEvaluator", "ClientScores", "EvalScores", "EvalSetup", "EvaluatesClients", "evaluate",
           "predict_all", "predict_logits", "score_client"]
