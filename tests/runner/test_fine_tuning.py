"""Two-stage recipes on ``init_from`` (issue 14): PASCL's stage 2 and the fine-tuned OOD baselines.

* ``train.trainable`` restricts local training to the parameters the patterns select: PASCL stage 2
  changes only BN and FC weights (asserted on the weights, against its stage-1 source).
* ``eval.ood_model=init_from`` scores OOD with the stage-1 model: the stage-2 run's OOD metrics are the
  stage-1 run's final ones exactly, while its accuracy is its own.
* Objective params set to ``pretrained`` are measured on the init_from model when the run starts and
  recorded in config.yaml as numbers (OECC's A_tr, BEL's π̂).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fedtrust
from fedtrust.errors import ConfigError
from fedtrust.runner.config import build_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CENTRAL = ["data.imbalance_ratio=10", "data.num_clients=1", "data.clients_per_round=1", "data.partition=iid",
           "eval.personalized=false", "train.optimizer=adam", "train.lr=0.001", "train.momentum=0",
           "train.batch_size=64", "train.keep_optimizer=true", "data.outliers=photos", "data.num_outliers=300",
           "eval.ood=[textures]", "eval.num_ood=200", "eval.scores=[msp,energy]"]


def _run(tmp_path, name, overrides):
    return fedtrust.run(None, CENTRAL + overrides + [f"out={tmp_path / name}"], progress=False, report=False)


def _weights(run_dir):
    return {k.removeprefix("server/model/"): v for k, v in load_file(str(run_dir / "checkpoint.safetensors")).items()
            if k.startswith("server/model/")}


def test_pascl_stage_two_trains_only_bn_and_fc_and_scores_ood_with_stage_one(tmp_path):
    stage1 = _run(tmp_path, "stage1", ["objective.name=pascl", "rounds=2", "eval.every=2"])
    stage2 = _run(tmp_path, "stage2", ["objective.name=la", "rounds=2", "eval.every=2", "train.lr=0.0005",
                                       f"init_from={stage1.run_dir}", "train.trainable=[<norm>,head.*]",
                                       "eval.ood_model=init_from"])
    before, after = _weights(stage1.run_dir), _weights(stage2.run_dir)
    assert not any(k.startswith("projection.") for k in after), "stage 2 trains no projection head"
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    norm_params = {"body.0.1.weight", "body.0.1.bias", "body.1.1.weight", "body.1.1.bias",
                   "body.3.1.weight", "body.3.1.bias"}
    assert {"head.weight", "head.bias"} <= changed and norm_params & changed, changed
    assert all(k in norm_params | {"head.weight", "head.bias"} or "running" in k or "num_batches" in k
               for k in changed), f"stage 2 changed a frozen weight: {sorted(changed)}"
    assert all(torch.equal(before[k], after[k]) for k in after if k.endswith("0.weight") and "body" in k)

    assert stage2.summary["ood"] == stage1.summary["ood"], "OOD must be scored with the stage-1 model"
    assert stage2.summary["test_acc"] != stage1.summary["test_acc"] or \
        stage2.summary["class_acc"] != stage1.summary["class_acc"]


def test_fine_tuning_measures_pretrained_values_into_the_resolved_config(tmp_path):
    ce = _run(tmp_path, "ce", ["objective.name=ce", "rounds=2", "eval.every=2"])
    oecc = _run(tmp_path, "oecc", ["objective.name=oecc", "objective.train_accuracy=pretrained", "rounds=1",
                                   f"init_from={ce.run_dir}"])
    recorded = yaml.safe_load((oecc.run_dir / "config.yaml").read_text())["objective"]["train_accuracy"]
    assert isinstance(recorded, float) and 0.3 < recorded <= 1.0
    bel = _run(tmp_path, "bel", ["objective.name=bel", "objective.prior=pretrained", "rounds=1",
                                 f"init_from={ce.run_dir}"])
    prior = yaml.safe_load((bel.run_dir / "config.yaml").read_text())["objective"]["prior"]
    assert len(prior) == 10 and sum(prior) == pytest.approx(1.0) and all(p >= 0 for p in prior)
    assert max(prior) < 1.0 or min(prior) == 0.0


def test_pretrained_values_and_the_init_model_need_init_from():
    with pytest.raises(ConfigError, match="objective.train_accuracy.*set init_from"):
        build_config({}, CENTRAL + ["objective.name=oecc", "objective.train_accuracy=pretrained"])
    with pytest.raises(ConfigError, match="eval.ood_model.*set init_from"):
        build_config({}, CENTRAL + ["eval.ood_model=init_from"])
    with pytest.raises(ConfigError, match="pattern 'nohead.\\*' matches no parameter"):
        fedtrust.run(None, CENTRAL + ["train.trainable=[nohead.*]", "rounds=1"], progress=False, report=False)
