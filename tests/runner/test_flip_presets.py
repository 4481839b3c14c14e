"""The FLIP paper presets (configs/flip-{mnist,fmnist,cifar10}-{continuous,single}.yaml) carry FLIP's settings.

The expected values are FLIP's, written out here from spec flip.md §1-§3 and FLIP's utils/*.yaml and
invert_*.py: a preset with a wrong attacker, a piece stamped by the wrong attacker, a schedule off by the
pre-training rounds or a swapped dataset setting fails here (test_configs_dir only checks that it builds).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtrust.runner.config import load_config
from fedtrust.runner.federation import build_run_attack

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

MNIST_PIECES = [(0, 0, 1, 4), (0, 6, 1, 4), (3, 0, 1, 4), (3, 6, 1, 4)]  # FLIP {i}_poison_pattern, i = 0..3
CIFAR_PIECES = [(0, 0, 1, 6), (0, 9, 1, 6), (4, 0, 1, 6), (4, 9, 1, 6)]

FLIP = {  # adversary_list (piece i is adversary_list[i]'s), attack rounds after the pre-training, the rest
    "mnist": dict(dataset="mnist", shape=(1, 28, 28), model="lenet", adversaries=[41, 73, 51, 74],
                  pieces=MNIST_PIECES, pretrain=10, single=[12, 14, 16, 18], rounds=90, poison=20 / 64,
                  att_epochs=10, harden_lr=0.01, warmup=400, pair=200, refine=50, tau=0.9, portion=0.5,
                  batch=64, epochs=10, mask_frac=1 / 8),
    "fmnist": dict(dataset="fashion_mnist", shape=(1, 28, 28), model="lenet", adversaries=[41, 73, 51, 74],
                   pieces=MNIST_PIECES, pretrain=200, single=[202, 204, 206, 208], rounds=100, poison=20 / 64,
                   att_epochs=20, harden_lr=0.01, warmup=600, pair=400, refine=100, tau=0.9, portion=0.6,
                   batch=128, epochs=5, mask_frac=1 / 8),
    "cifar10": dict(dataset="cifar10", shape=(3, 32, 32), model="resnet18", adversaries=[17, 33, 77, 11],
                    pieces=CIFAR_PIECES, pretrain=200, single=[203, 205, 207, 209], rounds=100, poison=5 / 64,
                    att_epochs=6, harden_lr=0.001, warmup=600, pair=200, refine=50, tau=0.85, portion=0.9,
                    batch=128, epochs=8, mask_frac=(3 * 32 * 32 / 4) / 3 / (32 * 32)),
}
CASES = [(ds, mode) for ds in FLIP for mode in ("continuous", "single")]


@pytest.mark.parametrize(("ds", "mode"), CASES, ids=[f"{d}-{m}" for d, m in CASES])
def test_preset_has_flips_settings(ds: str, mode: str) -> None:
    want = FLIP[ds]
    cfg = load_config(CONFIGS / f"flip-{ds}-{mode}.yaml")
    assert cfg.init_from is not None and cfg.init_from.path == f"runs/flip-{ds}-pretrain"
    assert (cfg.data.dataset, cfg.model.name, cfg.rounds) == (want["dataset"], want["model"], want["rounds"])
    assert (cfg.data.num_clients, cfg.data.clients_per_round, cfg.data.partition, cfg.data.alpha) == (
        100, 10, "dirichlet", 0.5)
    assert (cfg.data.normalize, cfg.data.augment) == ("none", "none")  # FLIP: [0, 1] inputs, no augmentation
    assert cfg.defense.server_lr == 0.1 and cfg.defense.aggregator == "mean"
    assert cfg.defense.uniform is True, "FLIP's server mean is unweighted (§3)"
    milestones = cfg.attack.params().get("lr_milestones")
    assert milestones == (None if ds == "cifar10" else [0.2, 0.8]), "MultiStepLR x0.1 at 20 %/80 % (§1; off on CIFAR)"

    p = cfg.algorithm.params()
    assert cfg.algorithm.name == "flip"
    assert (p["harden_lr"], p["max_steps"], p["warmup_steps"], p["pair_steps"], p["refine_steps"]) == (
        want["harden_lr"], 110, want["warmup"], want["pair"], want["refine"])
    assert (p["tau_inv"], p["portion"], p["warmup_portion"]) == (want["tau"], want["portion"], want["portion"])
    assert p["max_mask_frac"] == pytest.approx(want["mask_frac"])
    assert (cfg.train.batch_size, cfg.train.epochs) == (want["batch"], want["epochs"])

    attack = build_run_attack(cfg, 10)
    a = attack.params
    assert (a.trigger, a.target, a.lr, a.momentum, a.weight_decay, a.epochs) == (
        "dba", 2, 0.05, 0.9, 5e-4, want["att_epochs"])
    assert a.poison_fraction == pytest.approx(want["poison"])
    assert attack.targets.clients == frozenset(want["adversaries"]) and attack.targets.force
    for piece, client in zip(want["pieces"], want["adversaries"]):  # each attacker stamps its FLIP piece
        assert attack.client_trigger(client, want["shape"]).rects == (piece,), client
    assert set(attack.test_trigger(want["shape"]).rects) == set(want["pieces"])

    if mode == "single":  # one attacker a round, in FLIP's order, at FLIP's round minus the pre-training
        rounds = [r - want["pretrain"] for r in want["single"]]
        assert {r: sorted(c) for r, c in attack.targets.schedule.items()} == {
            r: [c] for r, c in zip(rounds, want["adversaries"])}
        assert a.scale == cfg.data.clients_per_round / cfg.defense.server_lr == 100  # gamma = n/eta
        assert cfg.eval.reject_tau == 0.0
    else:  # all four in every round, unscaled, tau-rejection 0.4
        assert attack.targets.schedule is None
        assert all(attack.attacks(c, r) for c in want["adversaries"] for r in (1, cfg.rounds))
        assert a.scale == 1.0 and cfg.eval.reject_tau == 0.4
