"""The vectorised executor equals the sequential reference (float64, so float32 chaos can't hide a bug)."""

from __future__ import annotations

import pytest
import torch

from fedtrust.fl.executor import ClientStore, SequentialExecutor
from fedtrust.fl.stacked_optim import StackedOptimizer
from fedtrust.fl.protocol import OptimizerSpec
from fedtrust.fl.vectorized import (CPU_GROUP_BYTES, MIN_CPU_GROUP, VectorizedExecutor, choose_executor, chunked,
                                   clients_per_group, executor_choice, state_bytes)
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation




def run_both(overrides, rounds=2, group_bytes="auto", device="cpu"):
    cfg = build_config({}, [f"device={device}", "data.num_clients=6", "data.clients_per_round=4", "data.alpha=0.3",
                            "data.min_size=20", "eval.personalized=false", *overrides])
    fed = build_federation(cfg)
    torch.manual_seed(0)
    state = fed.algorithm.init()
    sizes = {len(i) for i in fed.data.indices}
    assert len(sizes) > 1, "clients must be uneven"
    seq = SequentialExecutor(fed.algorithm, fed.data, cfg.seed, fed.device, 4)
    vec = VectorizedExecutor(fed.algorithm, fed.data, cfg.seed, fed.device, 4, group_bytes=group_bytes)
    return seq.run(state, ClientStore(), 0, rounds), vec.run(state, ClientStore(), 0, rounds), state


CASES = {
    "fedavg-sgd-momentum-wd": ["train.momentum=0.9", "train.weight_decay=0.001"],
    "fedavg-sgd-nesterov": ["train.nesterov=true"],
    "fedavg-adam": ["train.optimizer=adam", "train.lr=0.005", "train.weight_decay=0.0001"],
    "fedprox-sgd": ["algorithm.name=fedprox", "algorithm.mu=0.1", "train.weight_decay=0.001"],
    "fedprox-adam": ["algorithm.name=fedprox", "algorithm.mu=0.1", "train.optimizer=adam", "train.lr=0.005"],
    "fixed-steps-augmented": ["train.steps=7", "data.augment=crop_flip", "train.batch_size=32"],
    "two-epochs-plain-sgd": ["train.epochs=2", "train.momentum=0"],
    "rna-outliers-in-the-bn-batch": ["objective.name=rna", "data.outliers=photos", "data.num_outliers=300",
                                     "algorithm.bn_aggregation=pooled"],
    "rna-variant-b-ood-bn-moments": ["algorithm.name=rna_moments", "objective.name=rna_no_outliers",
                                     "data.outliers=photos", "data.num_outliers=300"],
    "splitmix-several-bases-per-client": ["algorithm.name=splitmix", "model.norm=bn_static",
                                          "budget.distribution=blocks", "budget.widths=[0.25,0.5,1.0]",
                                          "algorithm.base_ratio=0.25"],
    "splitmix-local-bn-kept-on-the-clients": ["algorithm.name=splitmix", "model.norm=bn", "algorithm.local_bn=true",
                                              "algorithm.rescale_layer=false", "algorithm.base_ratio=0.25",
                                              "budget.distribution=blocks", "budget.widths=[0.25,0.5,1.0]"],
    "fedbn-local-norm-layers": ["algorithm.name=fedbn", "train.momentum=0.9"],
    "heterofl-slices-of-four-widths": ["algorithm.name=heterofl", "model.norm=bn_static",
                                       "budget.distribution=blocks", "budget.widths=[0.25,0.5,0.75,1.0]"],
    "sheterofl-slimmable-widths": ["algorithm.name=heterofl", "algorithm.slimmable=true", "model.norm=bn_static",
                                   "budget.distribution=blocks", "budget.widths=[0.25,0.5,0.75,1.0]"],
    "energy-oe-two-outliers-per-image": ["objective.name=energy_oe", "data.outliers=photos", "data.num_outliers=300",
                                         "train.outlier_ratio=2", "data.augment=crop_flip"],
    "keep-optimizer-trainable-head": ["train.keep_optimizer=true", "train.trainable=[head.*]",
                                      "train.optimizer=adam", "train.lr=0.01"],
    "pascl-two-views-augmented": ["objective.name=pascl", "data.outliers=photos", "data.num_outliers=300",
                                  "data.augment=crop_flip"],
    "pascl-digits-unaugmented-second-view-cropped": ["objective.name=pascl", "data.outliers=photos",
                                                     "data.num_outliers=300", "train.steps=5"],
    # clients of 101..378 samples: one keeps its single short batch, the others drop theirs, 1 or 2 steps a pass
    "drop-last-uneven-clients": ["train.drop_last=true", "train.batch_size=128", "train.epochs=2"],
    "colour-pipeline-outliers": ["objective.name=oe", "data.outliers=photos", "data.num_outliers=300",
                                 "data.augment=crop+flip+color_jitter+grayscale", "train.steps=5"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_vectorized_equals_sequential(name, float64, executor_device):
    a, b, start = run_both(CASES[name], device=executor_device)
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        assert torch.allclose(a.arrays[k].double().cpu(), b.arrays[k].double().cpu(), atol=1e-9, rtol=1e-7), k
    moved = [k for k in start.arrays if not torch.equal(a.arrays[k].cpu(), start.arrays[k].cpu())]
    assert moved, "training changed nothing, so the comparison proves nothing"


def test_vectorized_float32_stays_close_in_accuracy(tmp_path):
    import fedtrust

    common = ["rounds=6", "eval.every=6", "data.partition=iid"]
    a = fedtrust.run(None, common + ["executor=sequential", f"out={tmp_path / 'a'}"], progress=False, report=False)
    b = fedtrust.run(None, common + ["executor=vectorized", f"out={tmp_path / 'b'}"], progress=False, report=False)
    assert a.summary["executor"] == "sequential" and b.summary["executor"] == "vectorized"
    assert abs(a.summary["test_acc"] - b.summary["test_acc"]) <= 0.02


def test_stacked_adam_rows_update_only_the_rows_given():
    params = {"w": torch.ones(3, 2)}
    opt = StackedOptimizer(OptimizerSpec("adam", lr=0.1), params, 3)
    opt.step({"w": torch.ones(2, 2)}, torch.tensor([0, 2]))
    assert torch.equal(params["w"][1], torch.ones(2))
    # Adam's first step moves each coordinate by lr against the gradient sign
    assert torch.allclose(params["w"][0], torch.full((2,), 0.9))
    assert opt.steps.tolist() == [1, 0, 1]


@pytest.mark.parametrize("clients_per_chunk", [1, 3])
def test_chunked_groups_equal_sequential(clients_per_chunk, float64, executor_device, monkeypatch):
    """A group over the byte budget trains in chunks (4 clients: 1+1+1+1 or 3+1); same result."""
    cfg = build_config({}, ["data.num_clients=6", "data.clients_per_round=4", "eval.personalized=false"])
    per_client = state_bytes(build_federation(cfg).algorithm.template.double())
    sizes = []
    train_group = VectorizedExecutor._train_group

    def spy(self, members):
        sizes.append(len(members))
        return train_group(self, members)

    monkeypatch.setattr(VectorizedExecutor, "_train_group", spy)
    a, b, start = run_both(["train.momentum=0.9", "train.weight_decay=0.001"],
                           group_bytes=clients_per_chunk * per_client, device=executor_device)
    expected = [1, 1, 1, 1] if clients_per_chunk == 1 else [3, 1]
    assert sizes == expected * 2  # two rounds, the 4 clients of each in chunks
    for k in a.arrays:
        assert torch.allclose(a.arrays[k].double().cpu(), b.arrays[k].double().cpu(), atol=1e-9, rtol=1e-7), k
    assert any(not torch.equal(a.arrays[k].cpu(), start.arrays[k].cpu()) for k in a.arrays)


def test_chunking_helpers():
    assert chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunked(list(range(7)), None) == [list(range(7))]
    assert chunked(list(range(2)), 5) == [[0, 1]]

    class Plan:
        init = {"w": torch.zeros(10, dtype=torch.float32), "n": torch.zeros((), dtype=torch.int64)}  # 48 bytes

    assert state_bytes(Plan.init) == 48
    assert clients_per_group(Plan, 100) == 2
    assert clients_per_group(Plan, 10) == 1  # never zero: one client always trains
    assert clients_per_group(Plan, None) is None


def test_cpu_group_budget_applies_on_cpu_only():
    cfg = build_config({}, ["data.num_clients=4", "data.clients_per_round=2", "eval.personalized=false"])
    fed = build_federation(cfg)
    assert VectorizedExecutor(fed.algorithm, fed.data, 0, torch.device("cpu"), 2).group_bytes == CPU_GROUP_BYTES
    assert VectorizedExecutor(fed.algorithm, fed.data, 0, torch.device("cuda"), 2).group_bytes is None


def test_auto_picks_vectorized_only_where_it_is_faster():
    cfg = build_config({}, ["data.num_clients=4", "data.clients_per_round=2", "eval.personalized=false"])
    fed = build_federation(cfg)
    assert fed.executor.name == "vectorized"  # digits cnn: 0.4 MB per client, many fit the CPU budget
    assert choose_executor(fed.algorithm, 1, "cpu") == "sequential"  # nothing to vectorise
    assert choose_executor(fed.algorithm, 2, "cuda") == "vectorized"
    # a model too big for MIN_CPU_GROUP clients in the CPU budget trains one client at a time on a CPU,
    # still vectorised on an accelerator (where there is no budget)
    big = build_federation(build_config({}, ["data.num_clients=4", "data.clients_per_round=2",
                                             "eval.personalized=false", "model.width=256"]))
    assert MIN_CPU_GROUP * state_bytes(big.algorithm.template) > CPU_GROUP_BYTES
    assert big.executor.name == "sequential"
    assert choose_executor(big.algorithm, 2, torch.device("cuda")) == "vectorized"
    # MNIST-size inputs train one client at a time on a CPU (vmapped convolutions lose there), not on a GPU
    assert choose_executor(fed.algorithm, 2, "cpu", (1, 8, 8)) == "vectorized"
    assert choose_executor(fed.algorithm, 2, "cpu", (1, 16, 16)) == "vectorized"
    assert choose_executor(fed.algorithm, 2, "cpu", (1, 28, 28)) == "sequential"
    assert choose_executor(fed.algorithm, 2, "cuda", (3, 32, 32)) == "vectorized"
    assert executor_choice(fed.algorithm, 2, "cpu", (3, 32, 32))[1].startswith("32x32 inputs: on a CPU one client")


def test_the_run_says_why_auto_chose_its_executor():
    small = build_federation(build_config({}, ["data.num_clients=4", "data.clients_per_round=2",
                                               "eval.personalized=false"]))
    per_group = CPU_GROUP_BYTES // state_bytes(small.algorithm.template)
    assert small.executor_reason == f"auto: 2 clients per round train together, up to {per_group} per group on the CPU"
    big = build_federation(build_config({}, ["data.num_clients=4", "data.clients_per_round=2",
                                             "eval.personalized=false", "model.width=256"]))
    assert big.executor_reason.startswith("auto: ") and "fewer than 4 fit the 16.0 MiB CPU group budget" \
        in big.executor_reason
    assert executor_choice(small.algorithm, 1, "cpu") == ("sequential", "one client per round")
    assert executor_choice(small.algorithm, 3, "cuda")[1].endswith("all at once on cuda")
    named = build_federation(build_config({}, ["data.num_clients=4", "data.clients_per_round=2", "executor=sequential",
                                               "eval.personalized=false"]))
    assert named.executor_reason == "set in the config"


def test_pascl_second_view_is_cropped_when_the_data_set_has_no_augmentation():
    """Digits (augment none) under PASCL: ``x`` and ``x_ood`` are the raw images, ``x2`` the same images
    cropped by its own draws. Rules out two identical views (nothing to contrast), augmenting ``x`` or the
    outliers too, and an ``assemble_batch`` that ignores the ``x2`` draws when the plan says ``none``."""
    from fedtrust.data.augment import random_crop
    from fedtrust.fl.local import assemble_batch, client_schedule
    from fedtrust.fl.types import Message

    cfg = build_config({}, ["data.num_clients=4", "data.clients_per_round=2", "eval.personalized=false",
                            "objective.name=pascl", "data.outliers=photos", "data.num_outliers=300"])
    fed = build_federation(cfg)
    assert fed.algorithm.ctx.schedule.augment == "none"
    torch.manual_seed(0)
    message = fed.algorithm.configure(fed.algorithm.init(), 1, [0])[0]
    ctx = fed.executor.client_context(0, 1)
    plan = fed.algorithm.local_training(message, Message(), ctx)
    assert plan.views == 2 and plan.outliers is not None
    data = fed.data.client(0)
    schedule = client_schedule(plan, len(data), ctx.generator, data.x.shape[-1])
    differ = 0
    for t in range(3):
        draws = schedule.draws[t]
        assert set(draws) == {"x2"} and set(draws["x2"]) == {"dy", "dx"}
        idx, ood = schedule.batches[t], plan.outliers[schedule.outlier_batches[t]]
        batch = assemble_batch(data.x[idx], data.y[idx], ood, 2, plan.augment, draws, lambda x: x)
        assert torch.equal(batch["x"], data.x[idx]) and torch.equal(batch["x_ood"], ood)
        assert torch.equal(batch["x2"], random_crop(data.x[idx], 1, draws["x2"]["dy"], draws["x2"]["dx"]))
        differ += int((batch["x2"] != batch["x"]).flatten(1).any(1).sum())
    assert differ > 0.7 * sum(len(schedule.batches[t]) for t in range(3))  # only the centre offset (1/9) is the identity
