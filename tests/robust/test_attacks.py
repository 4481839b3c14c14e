"""Attack wrappers (robust/attacks.py): who attacks when, and exactly what each attack changes."""

from __future__ import annotations

import pytest
import torch

from fedtrust.data.types import ImageSet
from fedtrust.errors import ConfigError
from fedtrust.fl.runtime import ClientRuntime
from fedtrust.fl.types import ClientContext, Message
from fedtrust.robust import byzantine
from fedtrust.robust.attacks import Targets, build_attack, choose_attackers
from fedtrust.runner.config import build_config


def attack(name: str, ids=(1, 3), rounds=None, first=1, last=None, **params):
    return build_attack(name, params, ids=list(ids), fraction=0.0, rounds=rounds, first=first, last=last,
                        num_clients=5, num_classes=10, seed=0)


def ctx(client: int, round: int = 1, seed: int = 0) -> ClientContext:
    return ClientContext(client, round, torch.Generator().manual_seed(seed), torch.device("cpu"))


def msg(value: float) -> Message:
    return Message({"model/w": torch.full((2, 2), value), "model/n": torch.tensor(3), "personal/h": torch.ones(2)},
                   {"num_examples": 4})


def test_targets_choose_clients_and_rounds():
    """Rules out attacking outside the configured rounds or with the wrong clients (an attacker is benign
    outside its rounds)."""
    t = Targets(frozenset({1, 3}), None, 3, 5)
    assert [r for r in range(1, 8) if t.attacks(1, r)] == [3, 4, 5]
    assert not any(t.attacks(2, r) for r in range(1, 8))
    listed = Targets(frozenset({0}), frozenset({2, 7}))
    assert [r for r in range(1, 9) if listed.attacks(0, r)] == [2, 7]


def test_fraction_draws_that_many_attackers_from_the_seed():
    """Rules out a fraction that is floored to zero, ids outside the federation, or a draw that ignores the seed."""
    a = choose_attackers(20, 0.2, seed=0)
    assert len(a) == 4 and all(0 <= c < 20 for c in a) and a == sorted(set(a))
    assert choose_attackers(20, 0.2, seed=0) == a and choose_attackers(20, 0.2, seed=1) != a


def test_sign_flip_reverses_and_scales_the_update_on_the_received_entries_only():
    """Rules out flipping the weights instead of the update (θ_i → −θ_i), touching entries the server did
    not send (personal parts) or integer counters."""
    a = attack("sign_flip", scale=3.0)
    received = Message({"model/w": torch.full((2, 2), 1.0), "model/n": torch.tensor(0)}, {})
    honest = msg(1.5)
    out = a.poison_reply(received, honest, ctx(1))
    assert torch.allclose(out.arrays["model/w"], torch.full((2, 2), 1.0 - 3.0 * 0.5))
    assert torch.equal(out.arrays["model/n"], honest.arrays["model/n"])
    assert torch.equal(out.arrays["personal/h"], honest.arrays["personal/h"]) and out.meta == honest.meta


def test_gaussian_replies_the_received_model_plus_noise_from_the_client_generator():
    """Rules out noise added to the trained model (the honest update leaking through) and noise from the
    global RNG (not reproducible per client and round)."""
    a = attack("gaussian", std=2.0)
    received = Message({"model/w": torch.zeros(2, 2)}, {})
    out = a.poison_reply(received, msg(7.0), ctx(1, seed=5))
    expect = byzantine.gaussian_update((4,), 2.0, torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(out.arrays["model/w"].flatten().double(), expect, atol=1e-6)


def test_label_flip_changes_the_data_of_attackers_in_attack_rounds_only():
    """Rules out flipping every client's labels, or flipping in rounds outside the schedule."""
    seen = []

    class Recorder:
        name = "rec"

        def client_update(self, message, data, client_state, c):
            seen.append(data.y.clone())
            return Message(), client_state

    runtime = ClientRuntime(Recorder(), attack("label_flip", ids=[1], rounds=[2]))  # type: ignore[arg-type]
    data = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 9]), 10)
    runtime.run(Message(), data, Message(), ctx(1, round=2))
    runtime.run(Message(), data, Message(), ctx(1, round=3))
    runtime.run(Message(), data, Message(), ctx(0, round=2))
    assert [s.tolist() for s in seen] == [[9, 8, 7, 0], [0, 1, 2, 9], [0, 1, 2, 9]]


def test_omniscient_attacks_craft_every_malicious_reply_from_the_benign_ones():
    """Rules out crafting from all replies (the attackers' own included), touching benign replies, or
    attackers sending different crafted updates."""
    a = attack("ipm", ids=(1, 3), epsilon=0.5)
    state = Message({"model/w": torch.zeros(2, 2)}, {})
    messages = {c: state for c in range(4)}
    replies = {c: Message({"model/w": torch.full((2, 2), float(c + 1))}, {"num_examples": 1}) for c in range(4)}
    out = a.collude(state, messages, replies, round=1)
    benign_mean = (1.0 + 3.0) / 2  # clients 0 and 2
    for c in (1, 3):
        assert torch.allclose(out[c].arrays["model/w"], torch.full((2, 2), -0.5 * benign_mean))
    for c in (0, 2):
        assert out[c] is replies[c]


def test_alie_crafts_mean_minus_z_sigma_of_the_benign_updates():
    """Rules out ALIE on the wrong statistics: z must come from n (the round's replies) and f (its attackers)."""
    a = attack("alie", ids=(0,))
    state = Message({"model/w": torch.zeros(2)}, {})
    vals = {0: [9.0, 9.0], 1: [1.0, 2.0], 2: [3.0, 2.0], 3: [2.0, 5.0]}
    replies = {c: Message({"model/w": torch.tensor(v)}, {"num_examples": 1}) for c, v in vals.items()}
    out = a.collude(state, {c: state for c in vals}, replies, round=1)
    benign = torch.tensor([vals[1], vals[2], vals[3]])
    expect = byzantine.alie(benign, 4, 1)
    assert torch.allclose(out[0].arrays["model/w"], expect.float())


def test_attack_config_errors_are_one_line():
    """Rules out silent defaults: an attack without attackers, ids out of range, unknown params."""
    for bad, fragment in ((["attack.name=sign_flip"], "has no attackers"),
                          (["attack.name=sign_flp", "attack.fraction=0.1"], "did you mean sign_flip"),
                          (["attack.name=sign_flip", "attack.fraction=0.1", "attack.scal=2"], "attack.scal"),
                          (["attack.name=sign_flip", "attack.fraction=1.5"], "attack.fraction"),
                          (["attack.name=sign_flip", "attack.ids=[0]", "attack.from=5", "attack.to=2"], "attack.to"),
                          (["attack.scale=2"], "attack.scale"),
                          (["attack.name=gaussian", "attack.ids=[0]", "attack.std=.inf"], "inf is not allowed")):
        with pytest.raises(ConfigError) as err:
            build_config({}, bad)
        assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="client 40 is out of range"):
        build_attack("sign_flip", {}, ids=[40], fraction=0, rounds=None, first=1, last=None, num_clients=20,
                     num_classes=10, seed=0)


def test_attack_from_round_round_trips_through_the_resolved_config():
    """Rules out a resolved config that writes ``start`` where the user wrote ``from`` (resume re-reads it)."""
    from fedtrust.runner.config import config_to_dict

    cfg = build_config({}, ["attack.name=sign_flip", "attack.fraction=0.2", "attack.from=3", "attack.scale=2"])
    tree = config_to_dict(cfg)
    assert tree["attack"]["from"] == 3 and tree["attack"]["scale"] == 2
    assert build_config(tree) == cfg
