"""The sequential trainer's fast paths give exactly what the plain torch calls give."""

import pytest
import torch
from torch import nn

from fedtrust.fl.local import load_state, local_batches, num_local_steps
from fedtrust.fl.sampling import seed_global_rngs
from fedtrust.models import create_model


def _state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_load_state_equals_load_state_dict_buffers_included():
    torch.manual_seed(0)
    source = create_model("cnn", 10, (1, 8, 8))
    source.train()
    source(torch.randn(16, 1, 8, 8))  # move BN running statistics and the batch counter off their init
    state = _state_of(source)
    torch.manual_seed(1)
    target = create_model("cnn", 10, (1, 8, 8))
    load_state(target, state, torch.device("cpu"))
    for k, v in target.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert int(target.state_dict()["body.0.1.num_batches_tracked"]) == 1
    # the copy is a copy: changing the source state afterwards does not reach the model
    first = next(iter(state))
    state[first].add_(1.0)
    assert not torch.equal(target.state_dict()[first], state[first])


def test_load_state_rejects_a_state_of_another_model_like_load_state_dict():
    model = create_model("cnn", 10, (1, 8, 8))
    other = _state_of(create_model("cnn", 7, (1, 8, 8)))  # same keys, head of another shape
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_state(model, other, torch.device("cpu"))
    missing = _state_of(model)
    missing.pop(next(iter(missing)))
    with pytest.raises(RuntimeError, match="Missing key"):
        load_state(model, missing, torch.device("cpu"))


def test_seed_global_rngs_reproduces_dropout_like_manual_seed():
    x = torch.ones(1000)
    torch.manual_seed(123)
    reference = nn.functional.dropout(x, 0.5)
    seed_global_rngs(123)
    assert torch.equal(nn.functional.dropout(x, 0.5), reference)
    seed_global_rngs(124)
    assert not torch.equal(nn.functional.dropout(x, 0.5), reference)


@pytest.mark.parametrize("n,batch,epochs,steps,sizes,dropped", [
    (10, 4, 2, None, [4, 4, 2] * 2, [4, 4] * 2),  # short batch of each pass dropped
    (12, 4, 1, None, [4, 4, 4], [4, 4, 4]),  # nothing to drop
    (3, 4, 2, None, [3, 3], [3, 3]),  # smaller than a batch: keeps its one batch per pass
    (10, 4, 1, 5, [4, 4, 2, 4, 4], [4, 4, 4, 4, 4]),  # fixed steps: passes of full batches only
])
def test_drop_last_drops_the_short_batch_of_each_pass(n, batch, epochs, steps, sizes, dropped):
    """Rules out drop_last dropping only the last batch of the run (not of each pass), a client smaller
    than one batch not training at all, a step count that disagrees with the batches, and drop_last=False
    changing anything (same generator, same batches as before)."""
    plain = local_batches(n, batch, epochs, steps, torch.Generator().manual_seed(0))
    assert [len(b) for b in plain] == sizes == [len(b) for b in local_batches(
        n, batch, epochs, steps, torch.Generator().manual_seed(0), drop_last=False)]
    assert len(plain) == num_local_steps(n, batch, epochs, steps)
    kept = local_batches(n, batch, epochs, steps, torch.Generator().manual_seed(0), drop_last=True)
    assert [len(b) for b in kept] == dropped and len(kept) == num_local_steps(n, batch, epochs, steps, True)
    if steps is None:  # each pass: a permutation's full batches, no index twice
        per_pass = len(kept) // epochs
        for e in range(epochs):
            seen = torch.cat(kept[e * per_pass:(e + 1) * per_pass])
            assert len(seen.unique()) == len(seen) == (n if n < batch else n // batch * batch)
        assert torch.equal(kept[0], plain[0])  # the same permutation, only the tail dropped


def test_outlier_ratio_sets_the_outliers_beside_each_id_batch():
    """``train.outlier_ratio=2``: every step's outlier batch is twice its ID batch (the last, short ID batch
    of a pass included), drawn without replacement per pass, and the augmentation draws follow those sizes."""
    from fedtrust.fl.local import client_schedule, outlier_count
    from fedtrust.fl.types import LocalTraining, OptimizerSpec

    outliers = torch.zeros(50, 1, 8, 8, dtype=torch.uint8)
    plan = LocalTraining(model=torch.nn.Linear(1, 1), init={}, trainable=(), loss=lambda *a: None,
                         optimizer=OptimizerSpec(), batch_size=8, epochs=2, outliers=outliers, outlier_ratio=2.0,
                         augment="crop_flip")
    sched = client_schedule(plan, 20, torch.Generator().manual_seed(0), width=8)
    assert [len(b) for b in sched.batches] == [8, 8, 4, 8, 8, 4]
    assert [len(b) for b in sched.outlier_batches] == [16, 16, 8, 16, 16, 8]
    assert [len(d["x_ood"]["flip"]) for d in sched.draws] == [16, 16, 8, 16, 16, 8]
    flat = torch.cat(sched.outlier_batches)
    assert len(set(flat[:50].tolist())) == 50, "the first pass over the outliers repeats one"
    assert outlier_count(3, 0.5) == 2 and outlier_count(1, 0.1) == 1
