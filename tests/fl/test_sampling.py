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
