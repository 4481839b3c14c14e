"""The client-side update defense (config ``privacy``): prune, clip, then noise a benign client's update
before it leaves; seeded per (seed, round, client), the same on every executor, never applied by an
attacker, and BN running statistics kept exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fedtrust
from fedtrust.errors import ConfigError
from fedtrust.fl.types import ClientContext, Message
from fedtrust.fl.update_privacy import UpdatePrivacy, shared_keys
from fedtrust.runner.config import build_config
from fedtrust.runner.rundir import read_metrics

pytestmark = [pytest.mark.usefixtures("one_thread")]

SMALL = ["data.num_clients=6", "data.clients_per_round=4", "rounds=2", "eval.every=1", "train.steps=4",
         "eval.personalized=false"]


def ctx(client: int, round: int = 1) -> ClientContext:
    return ClientContext(client, round, torch.Generator().manual_seed(0), torch.device("cpu"))


def message_and_reply() -> tuple[Message, Message]:
    base = {"model/w": torch.zeros(2, 3), "model/b": torch.ones(4), "model/bn.running_var": torch.ones(3),
            "model/bn.num_batches_tracked": torch.tensor(5)}
    reply = {"model/w": torch.tensor([[3.0, 0.1, -0.2], [0.0, 4.0, 0.05]]), "model/b": torch.tensor([1.0, 1.0, 1.0, 2.0]),
             "model/bn.running_var": torch.tensor([0.5, 2.0, 1.0]), "model/bn.num_batches_tracked": torch.tensor(9),
             "stats/extra": torch.tensor([7.0])}
    return Message(base, {"lr": 0.1}), Message(reply, {"num_examples": 12})


def delta(message: Message, reply: Message) -> torch.Tensor:
    return torch.cat([(reply.arrays[k] - message.arrays[k]).reshape(-1) for k in shared_keys(message, reply)])


def test_shared_keys_are_the_floating_parameters_both_sides_hold() -> None:
    message, reply = message_and_reply()
    assert shared_keys(message, reply) == ["model/b", "model/w"]
    assert not UpdatePrivacy().active and UpdatePrivacy().protect(message, reply, ctx(0)) is reply


def test_pruning_zeroes_the_smallest_update_entries_and_clipping_bounds_the_norm() -> None:
    """Δ = [1, 0,0,0,1 (b) | 3, .1, -.2, 0, 4, .05 (w)]: pruning half (5 of 10) zeroes the five smallest
    magnitudes; clipping to 2.5 scales the rest to norm 2.5 exactly; nothing else changes."""
    message, reply = message_and_reply()
    out = UpdatePrivacy(prune=0.5).protect(message, reply, ctx(0))
    # Δ: b = [0, 0, 0, 1], w = [[3, .1, -.2], [0, 4, .05]]; the 5 smallest |Δ| are the four zeros and 0.05
    assert torch.equal(delta(message, out), torch.tensor([0.0, 0, 0, 1.0, 3.0, 0.1, -0.2, 0, 4.0, 0]))
    clipped = UpdatePrivacy(clip=2.5).protect(message, reply, ctx(0))
    d = delta(message, reply)
    assert torch.allclose(delta(message, clipped), d * 2.5 / d.norm())
    assert UpdatePrivacy(clip=100.0).protect(message, reply, ctx(0)).arrays["model/w"] is not reply.arrays["model/w"]
    assert torch.equal(delta(message, UpdatePrivacy(clip=100.0).protect(message, reply, ctx(0))), d)
    for o in (out, clipped):
        for k in ("model/bn.running_var", "model/bn.num_batches_tracked", "stats/extra"):
            assert torch.equal(o.arrays[k], reply.arrays[k])
        assert o.meta == reply.meta


def test_noise_is_seeded_per_seed_round_and_client_with_the_configured_std() -> None:
    message = Message({"model/w": torch.zeros(20000)}, {})
    reply = Message({"model/w": torch.zeros(20000)}, {"num_examples": 1})
    defense = UpdatePrivacy(noise=0.01, seed=3)
    a = defense.protect(message, reply, ctx(2, 5)).arrays["model/w"]
    assert torch.equal(a, defense.protect(message, reply, ctx(2, 5)).arrays["model/w"])
    assert a.std().item() == pytest.approx(0.01, rel=0.03) and abs(a.mean().item()) < 3e-4
    for other in (defense.protect(message, reply, ctx(3, 5)), defense.protect(message, reply, ctx(2, 6)),
                  UpdatePrivacy(noise=0.01, seed=4).protect(message, reply, ctx(2, 5))):
        assert not torch.allclose(other.arrays["model/w"], a)
    # the training RNG in ctx is not the noise's source: another ctx.generator draws the same noise
    c = ClientContext(2, 5, torch.Generator().manual_seed(99), torch.device("cpu"))
    assert torch.equal(defense.protect(message, reply, c).arrays["model/w"], a)


def test_order_is_prune_then_clip_then_noise() -> None:
    """Noise after clipping: the sent norm exceeds C by about the noise's norm (clip last would give C)."""
    message = Message({"model/w": torch.zeros(1000)}, {})
    reply = Message({"model/w": torch.linspace(-1, 1, 1000)}, {"num_examples": 1})
    sent = delta(message, UpdatePrivacy(clip=1.0, noise=0.1, prune=0.5).protect(message, reply, ctx(0)))
    assert sent.norm().item() == pytest.approx((1 + 1000 * 0.01) ** 0.5, rel=0.1)
    assert (sent.abs() < 0.5).float().mean() > 0.9  # the pruned half carries noise only


@pytest.mark.parametrize("bad, fragment", [("privacy.clip=0", "privacy.clip"), ("privacy.noise=-1", "privacy.noise"),
                                           ("privacy.prune=1", "privacy.prune"), ("privacy.eps=1", "privacy.eps")])
def test_privacy_config_errors_are_one_line(bad: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(None, [bad])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def run(tmp_path: Path, name: str, *args: str) -> tuple[object, list[dict]]:
    result = fedtrust.run(None, [*SMALL, *args, f"out={tmp_path / name}"], progress=False, report=False)
    return result, read_metrics(tmp_path / name)


@pytest.mark.slow
def test_sequential_vectorized_agree_and_the_defense_changes_the_run(tmp_path, float64) -> None:
    """Same noise on both in-process executors (the vectorized one finishes its clients through the same
    runtime), and a run with the defense differs from one without (it is applied at all)."""
    args = ["privacy.clip=0.5", "privacy.noise=0.002", "privacy.prune=0.3", "seed=1"]
    _, seq = run(tmp_path, "seq", "executor=sequential", *args)
    _, vec = run(tmp_path, "vec", "executor=vectorized", *args)
    _, clear = run(tmp_path, "clear", "executor=sequential", "seed=1")
    for a, b in zip(seq, vec, strict=True):
        for k in ("train_loss", "test_loss", "test_acc"):
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), (a["round"], k)
    assert seq[-1]["test_loss"] != pytest.approx(clear[-1]["test_loss"], rel=1e-6)


@pytest.mark.slow
def test_attackers_do_not_defend_and_benign_replies_are_clipped(tmp_path) -> None:
    """With clip C, every benign client's update reaches the server with norm ≤ C (up to float32), the
    scaling attacker's does not: the attack is applied as it was made, not undone by the defense."""
    from fedtrust.fl.executor import ClientStore
    from fedtrust.runner.federation import build_federation

    cfg = build_config(None, [*SMALL, "privacy.clip=0.05", "attack.name=sign_flip", "attack.ids=[0]",
                              "attack.scale=10", "executor=sequential"])
    fed = build_federation(cfg)
    state = fed.algorithm.init()
    messages = fed.algorithm.configure(state, 1, [0, 1, 2])
    replies = fed.executor.execute(messages, 1, ClientStore())
    norms = {c: delta(messages[c], r).norm().item() for c, r in replies.items()}
    assert sorted(norms) == [0, 1, 2]
    assert all(0.04 < norms[c] <= 0.05 * (1 + 1e-5) for c in (1, 2)), norms
    assert norms[0] > 0.2, norms
