"""Personalized evaluation is wired to the right data: each client's own local test set, each
client's own model, and metrics.jsonl numbers that a plain recomputation reproduces.

The local-test-set rule (``fedtrust.metrics.accuracy.local_test_indices``, fedloge.md §1):
client k gets ``floor(n_kc · N_test / N_train)`` test images of class c, at most the number of
class-c test images, none for a class it holds fewer than 2 training images of, no image twice.

The end-to-end checks train a tiny long-tailed digits run (FedAvg, and FedPer, whose predictions
depend on each client's own head), then recompute every accuracy from the saved checkpoint with
numpy: predictions of the model built from the checkpoint's tensors, per-class accuracy, the
many/medium/few (RNA count thresholds) and head/middle/tail (cumulative share) groups, and each
client's accuracy on its local test set, with and without the absent-class mask. Nothing here
calls the library's metric or evaluation functions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fedtrust
from fedtrust.data.datasets import load_dataset
from fedtrust.models import create_model
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation
from fedtrust.runner.rundir import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 10
LONG_TAIL = ["data.imbalance_ratio=10", "data.alpha=0.3", "data.min_size=20", "eval.personalized=true"]


# --- independent reference code ------------------------------------------------------------


def own_histograms(fed) -> np.ndarray:
    """Client x class training counts, from the client index arrays and the training labels."""
    y = fed.data.train.y.cpu().numpy()
    return np.stack([np.bincount(y[idx.cpu().numpy()], minlength=NUM_CLASSES) for idx in fed.data.indices])


def expected_local_counts(hist: np.ndarray, test_y: np.ndarray) -> np.ndarray:
    """Per client and class, the number of local test images the documented rule asks for."""
    n_train, n_test = int(hist.sum()), len(test_y)
    available = np.bincount(test_y, minlength=NUM_CLASSES)
    want = np.zeros_like(hist)
    for k in range(hist.shape[0]):
        for c in range(NUM_CLASSES):
            if hist[k, c] >= 2:
                want[k, c] = min((int(hist[k, c]) * n_test) // n_train, int(available[c]))
    return want


def assert_local_sets_follow_own_histograms(fed) -> None:
    hist = own_histograms(fed)
    test_y = fed.eval_setup.test.y.cpu().numpy()
    want = expected_local_counts(hist, test_y)
    local = [idx.cpu().numpy() for idx in fed.eval_setup.local_test]
    assert len(local) == hist.shape[0]
    for k, idx in enumerate(local):
        assert len(np.unique(idx)) == len(idx), f"client {k}: a test image drawn twice"
        assert idx.min(initial=0) >= 0 and idx.max(initial=0) < len(test_y)
        got = np.bincount(test_y[idx], minlength=NUM_CLASSES)
        np.testing.assert_array_equal(got, want[k], err_msg=f"client {k}: local test labels vs its own histogram")


def shot_groups_ref(counts: np.ndarray) -> dict[str, list[int]]:
    """RNA rule: sorted descending n; many n_c > n[int(.34 C)], few n_c < n[int(.67 C)], medium the rest."""
    desc = sorted(counts.tolist(), reverse=True)
    t_many, t_few = desc[int(0.34 * len(counts))], desc[int(0.67 * len(counts))]
    return {"many": [c for c, n in enumerate(counts) if n > t_many],
            "medium": [c for c, n in enumerate(counts) if t_few <= n <= t_many],
            "few": [c for c, n in enumerate(counts) if n < t_few]}


def cumulative_groups_ref(counts: np.ndarray) -> dict[str, list[int]]:
    """Head up to the class where the cumulative share reaches 75%, middle up to 95%, tail the rest."""
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    total, running, out = counts.sum(), 0, {"head": [], "middle": [], "tail": []}
    for c in order:
        before = running / total
        running += counts[c]
        out["head" if before < 0.75 else "middle" if before < 0.95 else "tail"].append(c)
    return {k: sorted(v) for k, v in out.items()}


def logits_of(state: dict[str, torch.Tensor], cfg, x: torch.Tensor, mean, std) -> np.ndarray:
    """Logits of the config's model carrying ``state`` (eval mode) on uint8 images ``x``."""
    model = create_model(cfg.model.name, NUM_CLASSES, tuple(x.shape[1:]), **cfg.model.params())
    model.load_state_dict(state, strict=True)
    model.eval()
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    with torch.no_grad():
        return model((x.float() / 255.0 - m) / s).numpy()


def group_means(per_class: np.ndarray, groups: dict[str, list[int]]) -> dict[str, float | None]:
    out = {}
    for name, classes in groups.items():
        vals = [per_class[c] for c in classes if not math.isnan(per_class[c])]
        out[name] = float(np.mean(vals)) if vals else None
    return out


def client_scores(pred_logits: list[np.ndarray], local: list[np.ndarray], test_y: np.ndarray):
    """Each client's accuracy on its local test set, plain and with absent classes masked to -inf."""
    acc, masked = [], []
    for k, idx in enumerate(local):
        if len(idx) == 0:
            acc.append(None)
            masked.append(None)
            continue
        y_k, z = test_y[idx], pred_logits[k]
        absent = np.bincount(y_k, minlength=NUM_CLASSES) == 0
        acc.append(float(np.mean(z.argmax(1) == y_k)))
        masked.append(float(np.mean(np.where(absent[None, :], -np.inf, z).argmax(1) == y_k)))
    return acc, masked


def assert_close_lists(got, want, what):
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"{what}[{k}]: {g} vs {w}"
        if w is not None:
            assert g == pytest.approx(w, abs=1e-6), f"{what}[{k}]"


def mean_of(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals)


# --- (a) the local test sets ------------------------------------------------------------------


def test_each_clients_local_test_set_follows_its_own_label_histogram():
    """Rules out: client k's local test set built from another client's histogram (indices[j], a
    shifted or reversed histogram table), a rule other than floor(n_kc·N_test/N_train) capped per
    class with classes of < 2 training images dropped, and draws with replacement.
    """
    cfg = build_config({}, ["data.num_clients=6", "data.clients_per_round=3", *LONG_TAIL])
    fed = build_federation(cfg)
    hist = own_histograms(fed)
    assert len({tuple(r) for r in hist}) == len(hist), "clients must differ for a swap to be visible"
    assert_local_sets_follow_own_histograms(fed)
    test_y = fed.eval_setup.test.y.cpu().numpy()
    labels = [tuple(np.bincount(test_y[i.cpu().numpy()], minlength=NUM_CLASSES)) for i in fed.eval_setup.local_test]
    assert len(set(labels)) == len(labels), "clients with different histograms got the same local test set"
    # The histogram the run records is the clients' own one, too.
    np.testing.assert_array_equal(np.asarray(fed.partition["label_hist"]), hist)


# --- (b) metrics.jsonl against a recomputation from the checkpoint ----------------------------


def _run(tmp_path_factory, name: str, overrides: list[str]):
    out = tmp_path_factory.mktemp(name) / "run"
    result = fedtrust.run(None, [f"out={out}", *overrides], progress=False, report=False)
    fed = build_federation(result.config)
    final = [r for r in read_metrics(result.run_dir) if "test_acc" in r][-1]
    tensors = load_file(str(Path(result.run_dir) / "checkpoint.safetensors"))
    return result, fed, final, tensors


COMMON = ["data.num_clients=5", "data.clients_per_round=5", "train.epochs=2", "train.lr=0.1", *LONG_TAIL]


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory, one_thread):
    return _run(tmp_path_factory, "fedavg", COMMON + ["rounds=3", "eval.every=3"])


@pytest.fixture(scope="module")
def fedper_run(tmp_path_factory, one_thread):
    return _run(tmp_path_factory, "fedper", COMMON + ["algorithm.name=fedper", "rounds=2", "eval.every=2"])


def _server_model(tensors) -> dict[str, torch.Tensor]:
    return {k[len("server/model/"):]: v for k, v in tensors.items() if k.startswith("server/model/")}


def _check_global_metrics(final, z: np.ndarray, test_y: np.ndarray, counts: np.ndarray) -> None:
    pred = z.argmax(1)
    assert final["test_acc"] == pytest.approx(float(np.mean(pred == test_y)), abs=1e-6)
    per_class = np.array([np.mean(pred[test_y == c] == c) if (test_y == c).any() else np.nan
                          for c in range(NUM_CLASSES)])
    assert_close_lists(final["class_acc"], [None if math.isnan(a) else a for a in per_class], "class_acc")
    many = shot_groups_ref(counts)
    hmt = cumulative_groups_ref(counts)
    assert all(many.values()) and all(hmt.values()), f"every group must be non-empty: {many} {hmt}"
    assert set(final["group_acc"]) == set(many) and set(final["hmt_acc"]) == set(hmt)
    for name, want in group_means(per_class, many).items():
        assert final["group_acc"][name] == pytest.approx(want, abs=1e-9), f"group_acc.{name}"
    for name, want in group_means(per_class, hmt).items():
        assert final["hmt_acc"][name] == pytest.approx(want, abs=1e-9), f"hmt_acc.{name}"


@pytest.mark.slow
def test_fedavg_metrics_equal_a_recomputation_from_the_checkpoint(fedavg_run):
    """Rules out: client k scored on client j's local test set or with another predictor's logits,
    a per-class / group / head-middle-tail accuracy computed over the wrong classes (groups from
    test counts, a swapped threshold, a weighted instead of a per-class mean), the absent-class
    mask taken from the training or the global test labels, client_acc_mean weighted by set size,
    and metrics of a model other than the saved final one.
    """
    result, fed, final, tensors = fedavg_run
    assert final["round"] == result.config.rounds
    dataset = load_dataset("digits", None)
    test_x, test_y = dataset.test.x, dataset.test.y.numpy()
    z = logits_of(_server_model(tensors), result.config, test_x, dataset.mean, dataset.std)

    counts = own_histograms(fed).sum(0)
    _check_global_metrics(final, z, test_y, counts)

    assert_local_sets_follow_own_histograms(fed)
    local = [i.cpu().numpy() for i in fed.eval_setup.local_test]
    acc, masked = client_scores([z[idx] for idx in local], local, test_y)
    assert len(set(acc)) > 2, "client accuracies must differ for a swap to be visible"
    assert acc != masked, "the mask must change some client's accuracy for the check to bite"
    assert_close_lists(final["client_acc"], acc, "client_acc")
    assert_close_lists(final["client_acc_masked"], masked, "client_acc_masked")
    assert final["client_acc_mean"] == pytest.approx(mean_of(acc), abs=1e-6)
    assert final["client_acc_masked_mean"] == pytest.approx(mean_of(masked), abs=1e-6)


@pytest.mark.slow
def test_fedper_client_acc_uses_each_clients_own_head(fedper_run):
    """Rules out: a personalized client scored with another client's state (store.get(j) for client
    k, the first client's head for all, the server's initial head) or on another client's local
    test set; global metrics of anything but the shared body with the server's head.
    """
    result, fed, final, tensors = fedper_run
    dataset = load_dataset("digits", None)
    test_x, test_y = dataset.test.x, dataset.test.y.numpy()
    server = _server_model(tensors)
    _check_global_metrics(final, logits_of(server, result.config, test_x, dataset.mean, dataset.std), test_y,
                          own_histograms(fed).sum(0))

    local = [i.cpu().numpy() for i in fed.eval_setup.local_test]
    logits = []
    for k, idx in enumerate(local):
        prefix = f"client/{k}/personal/"
        own = {k2[len(prefix):]: v for k2, v in tensors.items() if k2.startswith(prefix)}
        assert set(own) == {"head.weight", "head.bias"}, f"client {k} has no personal head in the checkpoint"
        logits.append(logits_of({**server, **own}, result.config, test_x[idx], dataset.mean, dataset.std))
    heads = [tensors[f"client/{k}/personal/head.weight"] for k in range(len(local))]
    assert not torch.equal(heads[0], heads[1]), "heads must differ for a swap to be visible"
    acc, masked = client_scores(logits, local, test_y)
    assert len(set(acc)) > 2
    assert_close_lists(final["client_acc"], acc, "client_acc")
    assert_close_lists(final["client_acc_masked"], masked, "client_acc_masked")
    assert final["client_acc_mean"] == pytest.approx(mean_of(acc), abs=1e-6)
