"""HeteroFL and FedRolex (spec splitmix.md §5): slices sent, overlap-aware aggregation by hand, rolling windows."""

import pytest
import torch

from fedtrust.algorithms.heterofl import SLICE
from fedtrust.errors import ConfigError
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import ClientContext, Message
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation

BASE = ["algorithm.name=heterofl", "model.norm=bn_static", "model.width=8", "data.num_clients=4",
        "data.clients_per_round=4", "data.partition=iid", "eval.personalized=false", "budget.distribution=blocks",
        "budget.widths=[0.25,0.5,0.75,1.0]"]


def federation(*overrides):
    return build_federation(build_config({}, [*BASE, *overrides]))


def test_each_client_gets_the_prefix_of_its_width_and_replies_it():
    fed = federation()
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    full = state.arrays["model/body.0.0.weight"]  # conv1: (8, C, 3, 3)
    messages = algo.configure(state, 3, [0, 1, 2, 3])
    for c, keep in zip(range(4), (2, 4, 6, 8)):
        w = messages[c].arrays[f"{SLICE}/body.0.0.weight"]
        assert torch.equal(w, full[:keep]), c
        assert not any(k.startswith("model/") for k in messages[c].arrays)
    ctx = ClientContext(1, 3, torch.Generator().manual_seed(1), fed.device)
    reply, _ = algo.client_update(messages[1], fed.data.client(1), ClientStore().get(1), ctx)
    spec = algo.reply_spec(messages[1])
    assert {k: (tuple(v.shape), v.dtype) for k, v in reply.arrays.items()} == spec
    assert not torch.equal(reply.arrays[f"{SLICE}/head.weight"], messages[1].arrays[f"{SLICE}/head.weight"])


def test_fedrolex_windows_roll_one_channel_a_round():
    fed = federation("algorithm.rolling=true")
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    full = state.arrays["model/body.0.0.weight"]
    for r in (1, 5, 7):
        w = algo.configure(state, r, [0])[0].arrays[f"{SLICE}/body.0.0.weight"]  # width 1/4: 2 of 8 channels
        assert torch.equal(w, full[[(r + j) % 8 for j in range(2)]]), r


def test_overlap_aware_mean_by_hand():
    """Clients of width 1/4 (n = 10), 1/2 (n = 30) and none of width 1 in the round: entries in the 1/4 slice
    average both, entries only in the 1/2 slice take client 1's, the rest keep the old values."""
    fed = federation()
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    messages = algo.configure(state, 1, [0, 1])

    def reply(c, n, value):
        arrays = {k: torch.full_like(v, value) if v.is_floating_point() else v.clone()
                  for k, v in messages[c].arrays.items()}
        return Message(arrays=arrays, meta={"num_examples": n, "loss": 0.0, "steps": 1})

    new, _ = algo.aggregate(state, {0: reply(0, 10, 1.0), 1: reply(1, 30, 5.0)}, 1)
    w = new.arrays["model/body.1.0.weight"]  # conv2: (16, 8, 3, 3); widths keep 4x2 and 8x4
    old = state.arrays["model/body.1.0.weight"]
    assert torch.allclose(w[:4, :2], torch.full((4, 2, 3, 3), (10 * 1.0 + 30 * 5.0) / 40))
    assert torch.allclose(w[4:8, :4], torch.full((4, 4, 3, 3), 5.0))
    assert torch.allclose(w[:4, 2:4], torch.full((4, 2, 3, 3), 5.0))
    assert torch.equal(w[8:], old[8:]) and torch.equal(w[:, 4:], old[:, 4:])
    head = new.arrays["model/head.weight"]  # (10, 4·8): outputs whole, inputs sliced
    assert torch.allclose(head[:, :8], torch.full((10, 8), 4.0))
    assert torch.equal(head[:, 16:], state.arrays["model/head.weight"][:, 16:])


def test_predictors_are_the_prefix_subnets_widest_first():
    fed = federation()
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    preds = algo.predictors(state)
    assert list(preds) == ["x1", "x0.75", "x0.5", "x0.25"]
    assert torch.equal(preds["x0.5"].state_dict()["body.0.0.weight"], state.arrays["model/body.0.0.weight"][:4])


@pytest.mark.parametrize("overrides, message", [
    (["defense.aggregator=median"], "element-wise"),
    (["model.name=cnn2"], "width-scalable"),
])
def test_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_federation(build_config({}, [*(o for o in BASE if not o.startswith("model.")), *overrides]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sheterofl_sums_the_losses_of_every_width_up_to_the_budget():
    """SHeteroFL (spec §5): a client of budget 1/2 trains widths 1/4 and 1/2 on each batch; its loss is the sum
    of the CE of its sub-net and of that sub-net's width-1/4 prefix (a standalone width-1/4 net holding the
    prefix weights, hidden outputs divided by 1/4 in training)."""
    from fedtrust.models.slimmable import extract as take, slice_indices

    fed = federation("algorithm.slimmable=true")
    algo = fed.algorithm
    torch.manual_seed(0)
    sub = algo.sub_template(0.5).train()
    batch = {"x": algo.ctx.normalize(fed.data.train.x[:16]), "y": fed.data.train.y[:16]}
    narrow = algo.ctx.new_model(width_ratio=0.25, rescale_layer=True).train()
    narrow.load_state_dict(take(sub.state_dict(), slice_indices(sub, 0.5)))
    want = (torch.nn.functional.cross_entropy(sub(batch["x"]), batch["y"])
            + torch.nn.functional.cross_entropy(narrow(batch["x"]), batch["y"]))
    got = algo.local_loss(sub, dict(sub.named_parameters()), batch, {})
    assert torch.allclose(got, want, atol=1e-5)
    plain = federation().algorithm
    single = plain.local_loss(plain.sub_template(0.5).train(), {}, batch, {})
    assert not torch.allclose(single, got, atol=1e-3)
    # the narrowest budget trains one width: nothing to add
    tiny = algo.sub_template(0.25).train()
    assert torch.allclose(algo.local_loss(tiny, {}, batch, {}),
                          torch.nn.functional.cross_entropy(tiny(batch["x"]), batch["y"]), atol=1e-6)


def test_sheterofl_runs_on_the_vectorised_executor_from_a_fresh_start(tmp_path):
    """The narrower views are built before the vectorised step (building one inside vmap fails)."""
    import fedtrust

    res = fedtrust.run(None, [*BASE, "algorithm.slimmable=true", "rounds=1", "eval.every=1", "executor=vectorized",
                              "checkpoint_every=0", f"out={tmp_path}"], progress=False, report=False)
    assert res.summary["executor"] == "vectorized" and res.summary["test_acc"] > 0
