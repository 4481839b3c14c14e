"""The report's "FLIP inverted masks" figure shows what the checkpoint holds: the benign clients' masks
m = tanh(a)/2 + 1/2 toward the attack's target, averaged per source, next to the attack's real trigger."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from matplotlib.axes import Axes
from safetensors import safe_open
from safetensors.torch import save_file

import fedtrust
from fedtrust.report import load_run, plots
from fedtrust.runner.config import build_config, config_to_dict

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS_TRIGGER = np.zeros((8, 8), dtype=bool)
DIGITS_TRIGGER[[0, 2, 4, 6], 0:2] = True
"""The 8x8 DBA preset written out by hand: four 1x2 pieces down the left edge, rows 0, 2, 4, 6, columns 0-1."""


def _spy_panels(monkeypatch) -> list[tuple[Axes, np.ndarray]]:
    """Record every image drawn (its axes and array); titles are read from the axes afterwards."""
    drawn: list[tuple[Axes, np.ndarray]] = []
    original = Axes.imshow

    def spy(self, image, *args, **kwargs):
        drawn.append((self, np.asarray(image, dtype=np.float64)))
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", spy)
    return drawn


# --- a hand-made checkpoint: every number worked out by hand ---------------------------------------------------


def _write_run(tmp_path, overrides: list[str], tensors: dict[str, torch.Tensor]):
    run = tmp_path / "run"
    run.mkdir()
    cfg = config_to_dict(build_config(None, ["data.num_clients=6", "data.clients_per_round=3", *overrides]))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    meta = {"round": 7, "client_ids": sorted({int(k.split("/")[1]) for k in tensors})}
    tensors = {k: v.clone() for k, v in tensors.items()}
    save_file(tensors, str(run / "checkpoint.safetensors"), metadata={"fedtrust": json.dumps(meta)})
    return run


def _client(cid: int, masks: dict[tuple[int, int], torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {f"client/{cid}/flip/mat_diff": torch.zeros(10, 10, dtype=torch.float64),
           f"client/{cid}/flip/seen": torch.tensor(True)}
    for (s, t), a in masks.items():
        out[f"client/{cid}/flip/cache/{s}_{t}/a"] = a
        out[f"client/{cid}/flip/cache/{s}_{t}/b"] = torch.zeros(1, 8, 8)
    return out


FLIP_ATTACK = ["algorithm.name=flip", "attack.name=backdoor", "attack.ids=[1]"]


def test_mean_mask_count_and_l1_of_a_hand_made_checkpoint(tmp_path, monkeypatch):
    """Client 0: a = 0 (m = 0.5 everywhere, L1 32); client 3: a = ±20 (m = 1 on 4 pixels, L1 4); so the mean
    mask of 0→2 has L1 (32 + 4)/2 = 18 over 2 clients. Attacker 1's all-ones mask (L1 64) must be left out
    (with it: 33.3 over 3), pairs toward another target (2→0) and pair 5→2's count (1) kept apart. Rules out
    the mask read as ``a`` itself, a sum instead of a mean, attackers counted, or the wrong target."""
    ones4 = torch.full((8, 8), -20.0)
    ones4[5:7, 5:7] = 20.0
    tensors = {**_client(0, {(0, 2): torch.zeros(8, 8), (2, 0): torch.full((8, 8), 20.0)}),
               **_client(3, {(0, 2): ones4, (5, 2): ones4}),
               **_client(1, {(0, 2): torch.full((8, 8), 20.0)})}
    run = load_run(_write_run(tmp_path, FLIP_ATTACK, tensors))

    fm = run.flip_masks
    assert fm is not None and fm.target == 2 and fm.round == 7
    assert fm.excluded == [1] and fm.clients == 2 and fm.num_sources == 2
    assert [(p.source, p.clients) for p in fm.pairs] == [(0, 2), (5, 1)]
    expected = (np.full((8, 8), 0.5) + (ones4 > 0).double().numpy()) / 2
    np.testing.assert_allclose(fm.pairs[0].mask, expected, atol=1e-12)
    assert fm.pairs[0].l1 == pytest.approx(18.0) and fm.pairs[1].l1 == pytest.approx(4.0)
    assert np.array_equal(fm.trigger, DIGITS_TRIGGER)

    drawn = _spy_panels(monkeypatch)
    assert plots.flip_masks_png([run]) is not None
    titles = [ax.get_title() for ax, _ in drawn]
    assert titles == ["real trigger\n8 px", "0→2 · 2 clients\nL1 18.0", "5→2 · 1 client\nL1 4.0"]
    np.testing.assert_array_equal(drawn[0][1], DIGITS_TRIGGER.astype(float))
    np.testing.assert_allclose(drawn[1][1], expected, atol=1e-12)


def test_at_most_nine_sources_with_the_smallest_l1(tmp_path):
    """100 classes, 11 sources (0..11 but 2) toward 2 whose constant a = 3 − s/2 makes the L1 fall as s
    grows: the figure keeps the 9 smallest (sources 3..11), shown by source, and counts all 11 found."""
    k = 100
    masks = {(s, 2): torch.full((8, 8), 3.0 - 0.5 * s) for s in range(12) if s != 2}
    tensors = _client(0, masks)
    tensors["client/0/flip/mat_diff"] = torch.zeros(k, k, dtype=torch.float64)
    run_dir = _write_run(tmp_path, FLIP_ATTACK, tensors)
    fm = load_run(run_dir).flip_masks
    assert fm is not None and fm.num_sources == 11
    assert [p.source for p in fm.pairs] == [3, 4, 5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("overrides", [["algorithm.name=fedavg", "attack.name=backdoor", "attack.ids=[1]"],
                                       ["algorithm.name=flip"]], ids=["fedavg-attacked", "flip-clean"])
def test_no_flip_figure_outside_attacked_flip_runs(tmp_path, overrides):
    """The checkpoint holds FLIP caches, but the run is not FLIP under attack: nothing read, no figure."""
    run = load_run(_write_run(tmp_path, overrides, _client(0, {(0, 2): torch.zeros(8, 8)})))
    assert run.flip_masks is None and not any("FLIP" in n for n in run.notes)
    assert plots.flip_masks_png([run]) is None


def test_a_flip_run_without_pairs_gets_a_note_not_an_error(tmp_path):
    run = load_run(_write_run(tmp_path, FLIP_ATTACK, {"client/0/flip/seen": torch.tensor(True)}))
    assert run.flip_masks is None
    assert any("no FLIP mask cache" in n for n in run.notes)


# --- a tiny real FLIP run -----------------------------------------------------------------------------------------


ATTACKERS = [1, 5, 9, 13]
TINY = ["algorithm.name=flip", "algorithm.warmup_steps=20", "algorithm.pair_steps=10", "algorithm.refine_steps=5",
        "algorithm.tau_inv=0.3", "attack.name=backdoor", f"attack.ids={ATTACKERS}", "attack.force=true",
        "rounds=3", "eval.every=3", "data.num_clients=20", "eval.personalized=false", "train.epochs=3"]


@pytest.fixture(scope="module")
def tiny_flip_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("flip") / "run"
    return fedtrust.run(None, TINY + [f"out={out}"], progress=False, report=True).run_dir


def _independent_means(run_dir, target: int) -> dict[int, tuple[int, float, np.ndarray]]:
    """Straight from the checkpoint: per source, (benign clients with pair source→target, L1 of the mean
    mask, the mean mask), m = tanh(a)/2 + 1/2 computed here in numpy."""
    found: dict[int, list[np.ndarray]] = {}
    with safe_open(str(run_dir / "checkpoint.safetensors"), framework="np") as fh:
        for key in fh.keys():
            m = re.fullmatch(r"client/(\d+)/flip/cache/(\d+)_(\d+)/a", key)
            if m and int(m[3]) == target and int(m[1]) not in ATTACKERS:
                found.setdefault(int(m[2]), []).append(np.tanh(fh.get_tensor(key).astype(np.float64)) / 2 + 0.5)
    return {s: (len(ms), float(np.mean(ms, axis=0).sum()), np.mean(ms, axis=0)) for s, ms in found.items()}


@pytest.mark.slow
def test_the_figure_shows_the_checkpoints_masks(tiny_flip_run, monkeypatch):
    """Counts, L1s and images of every pair toward target 2 equal those computed from the checkpoint here,
    the first panel is the digits trigger, and the written page carries the figure and its numbers."""
    run = load_run(tiny_flip_run)
    fm = run.flip_masks
    assert fm is not None and fm.target == 2 and fm.excluded == ATTACKERS
    expected = _independent_means(tiny_flip_run, 2)
    assert expected, "the tiny run cached no pair toward 2: the figure has nothing to show"
    assert fm.num_sources == len(expected)
    assert {p.source: p.clients for p in fm.pairs} == {s: n for s, (n, _, _) in expected.items()}
    for p in fm.pairs:
        assert p.l1 == pytest.approx(expected[p.source][1], rel=1e-6)
        np.testing.assert_allclose(p.mask, expected[p.source][2], atol=1e-6)
    assert np.array_equal(fm.trigger, DIGITS_TRIGGER)

    drawn = _spy_panels(monkeypatch)
    assert plots.flip_masks_png([run]) is not None
    titles = [ax.get_title() for ax, _ in drawn]
    assert titles[0] == "real trigger\n8 px"
    for p, title in zip(fm.pairs, titles[1:], strict=True):
        n, l1, _ = expected[p.source]
        assert title == f"{p.source}→2 · {n} client{'s' if n != 1 else ''}\nL1 {l1:.1f}"

    page = (tiny_flip_run / "report.html").read_text()
    assert "FLIP inverted masks" in page
    assert f"{fm.clients} benign clients with FLIP state, {len(expected)} source(s) with a mask toward 2" in page
