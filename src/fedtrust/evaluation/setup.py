"""The fixed parts of evaluation, built once per run, and the per-sample outputs kept for the report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from fedtrust.adversarial.robust import RobustEvalParams
from fedtrust.data.types import ImageSet
from fedtrust.fl.types import Message

ClientScores = dict[str, tuple[float, float]]
"""One client's personalized scores: predictor name → (accuracy, masked accuracy) on its local test set."""

ClientEvaluator = Callable[[Message, Sequence[int]], dict[int, ClientScores | None]]
"""``(server state, client ids) -> {client id: scores}``: each client's :func:`score_client` with its
own state, computed where that state lives; None for a client that could not be scored."""


@runtime_checkable
class EvaluatesClients(Protocol):
    """An executor that keeps client state away from the server and so scores the clients itself."""

    def evaluate_clients(self, state: Message, clients: Sequence[int]) -> dict[int, ClientScores | None]: ...


@dataclass
class EvalSetup:
    """The fixed parts of evaluation, built once per run."""

    test: ImageSet
    normalize: Callable[[Tensor], Tensor]
    groups: dict[str, list[int]]
    hmt: dict[str, list[int]]
    local_test: Sequence[Tensor] | None
    batch_size: int = 1024
    ood_sets: dict[str, Tensor] = field(default_factory=dict)
    scores: tuple[str, ...] = ("msp",)
    metrics: tuple[str, ...] = ("accuracy", "calibration", "ood")
    """Registered evaluators to run (``eval.metrics``), in this order."""
    backdoor: tuple[Tensor, int] | None = None
    """The backdoor test set (non-target test images stamped with the full trigger, uint8) and the target
    class, when the run's attack is a backdoor; None: no ASR to measure."""
    reject_tau: float = 0.0
    """FLIP's inference-time rejection threshold τ (``eval.reject_tau``): 0 accepts every prediction."""
    leakage_probes: int = 4
    """Test samples the ``leakage`` evaluator probes (``eval.leakage_probes``)."""
    leakage_sigma: float = 1e-3
    """Std of the ``leakage`` evaluator's reference Gaussian δ (``eval.leakage_sigma``)."""
    robust: RobustEvalParams = field(default_factory=RobustEvalParams)
    """The ``robust_acc`` evaluator's attack, μ list, subset cap and seed (``eval.robust``)."""
    ood_model: nn.Module | None = None
    """The model OOD detection is scored with instead of each predictor (``eval.ood_model=init_from``:
    PASCL stage 2 scores OOD with its stage-1 model); None: the predictor itself."""
    client_evaluator: ClientEvaluator | None = None
    """Scores personalized clients where their state lives (executor=flower: on the nodes);
    None scores them here, from the ``ClientStore``."""


@dataclass
class EvalScores:
    """Per-sample outputs of the primary predictor at one evaluation, for the report's OOD plots.

    :func:`evaluate` fills it when given one (the runner asks at the final
    round only and saves it as ``eval_scores.npz``): the test labels and
    logits, and, when OOD sets are configured, every configured score on the
    ID test set and on each OOD set, the very tensors the ``ood`` metrics
    were computed from (no second forward pass).
    """

    predictor: str = ""
    labels: Tensor | None = None
    logits: Tensor | None = None
    id_scores: dict[str, Tensor] = field(default_factory=dict)
    ood_scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)
