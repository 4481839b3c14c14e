import torch

from fedtrust.fl.local import local_batches, num_local_steps
from fedtrust.fl.sampling import client_generator, clients_per_round, sample_clients
from fedtrust.fl.schedule import lr_at


def test_clients_per_round_count_and_fraction():
    assert clients_per_round(10, 20) == 10
    assert clients_per_round(50, 20) == 20
    assert clients_per_round(0.3, 40) == 12  # FedLoGe's README: frac 0.3 of 40 users
    assert clients_per_round(0.01, 20) == 1
    assert clients_per_round(1.0, 7) == 7


def test_sampling_is_distinct_sorted_and_reproducible():
    a = sample_clients(100, 10, seed=3, round=5)
    assert a == sorted(set(a)) and len(a) == 10 and all(0 <= c < 100 for c in a)
    assert a == sample_clients(100, 10, seed=3, round=5)
    assert a != sample_clients(100, 10, seed=3, round=6)
    assert a != sample_clients(100, 10, seed=4, round=5)


def test_client_generators_are_independent_streams():
    x = torch.rand(5, generator=client_generator(0, 1, 2))
    assert torch.equal(x, torch.rand(5, generator=client_generator(0, 1, 2)))
    assert not torch.equal(x, torch.rand(5, generator=client_generator(0, 1, 3)))
    assert not torch.equal(x, torch.rand(5, generator=client_generator(0, 2, 2)))


def test_local_batches_cover_each_epoch_once():
    g = torch.Generator().manual_seed(0)
    batches = local_batches(10, 4, epochs=2, steps=None, generator=g)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(batches[3:]).tolist()) == list(range(10))


def test_local_batches_with_fixed_steps():
    g = torch.Generator().manual_seed(0)
    batches = local_batches(5, 2, epochs=1, steps=7, generator=g)
    assert len(batches) == 7 == num_local_steps(5, 2, 1, 7)
    assert num_local_steps(0, 2, 3, None) == 0


def test_lr_schedules():
    assert lr_at(7, 10, 0.1, "constant") == 0.1
    assert lr_at(1, 10, 0.1, "cosine") == 0.1
    assert abs(lr_at(6, 10, 0.1, "cosine", lr_min=0.0) - 0.05) < 1e-12  # halfway
    assert abs(lr_at(21, 30, 1.0, "step", step_rounds=10, gamma=0.5) - 0.25) < 1e-12
    assert abs(lr_at(3, 30, 1.0, "exponential", gamma=0.9) - 0.81) < 1e-12


def test_force_clients_puts_every_forced_client_in_and_keeps_the_round_size():
    """Rules out forcing by appending (a bigger round), dropping forced clients the sampler also drew, or
    an unseeded choice of whom they replace."""
    from fedtrust.fl.sampling import force_clients

    sampled = [1, 4, 6, 8, 9]
    out = force_clients(sampled, {2, 6}, seed=0, round=3)
    assert len(out) == 5 and {2, 6} <= set(out) and set(out) - {2} <= set(sampled) and out == sorted(out)
    assert force_clients(sampled, {2, 6}, seed=0, round=3) == out
    assert len({tuple(force_clients(sampled, {2, 6}, seed=0, round=r)) for r in range(20)}) > 1
    many = force_clients([0, 1], {5, 6, 7}, seed=0, round=1)  # more forced than the round holds
    assert len(many) == 2 and set(many) <= {5, 6, 7}


def test_the_uniform_sampler_is_registered_and_is_todays_sampling():
    """Rules out a default sampler other than the one runs used before (bit-identical runs)."""
    from fedtrust.registry import get

    assert get("sampler", "uniform") is sample_clients


def test_attack_force_puts_the_attackers_into_their_attack_rounds_only(tmp_path):
    """Rules out forcing attackers into every round (outside their rounds the sampler is untouched) or not
    forcing them at all."""
    from fedtrust.runner.config import build_config
    from fedtrust.runner.federation import build_federation

    args = ["data.num_clients=20", "data.clients_per_round=4", "attack.name=sign_flip", "attack.ids=[3, 11]",
            "attack.rounds=[2, 5]"]
    forced = build_federation(build_config({}, args + ["attack.force=true"])).executor
    plain = build_federation(build_config({}, args)).executor
    for r in range(1, 8):
        if r in (2, 5):
            assert {3, 11} <= set(forced.sample(r)) and len(forced.sample(r)) == 4
        else:
            assert forced.sample(r) == plain.sample(r) == sample_clients(20, 4, 0, r)
