"""Split-Mix (spec splitmix.md §2–§3): base selection, per-base aggregation, mixed models per width, and one
training serving every width on digits domains."""

import pytest
import torch

from fedtrust.algorithms.splitmix import base_prefix, bases_for, choose_bases
from fedtrust.errors import ConfigError
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import ClientContext, Message
from fedtrust.models.cost import model_cost
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation

BASE = ["algorithm.name=splitmix", "model.norm=bn_static", "data.num_clients=8", "data.clients_per_round=8",
        "data.partition=iid", "eval.personalized=false", "budget.distribution=blocks"]


def federation(*overrides):
    return build_federation(build_config({}, [*BASE, *overrides]))


def test_bases_per_budget():
    assert [bases_for(b, 0.125) for b in (0.125, 0.25, 0.5, 1.0)] == [1, 2, 4, 8]
    assert bases_for(0.3, 0.125) == 2 and bases_for(0.1, 0.25) == 1


def test_first_bases_cycle_through_every_index_and_the_others_are_distinct():
    g = torch.Generator().manual_seed(0)
    chosen = choose_bases([1, 3, 2, 8, 1, 1, 1, 1, 4, 2], 8, g)
    assert sorted(c[0] for c in chosen[:8]) == list(range(8))  # one full cycle over the first 8 clients
    assert [len(c) for c in chosen] == [1, 3, 2, 8, 1, 1, 1, 1, 4, 2]
    assert all(len(set(c)) == len(c) and all(0 <= i < 8 for i in c) for c in chosen)
    again = choose_bases([1, 3, 2, 8, 1, 1, 1, 1, 4, 2], 8, torch.Generator().manual_seed(0))
    assert again == chosen


def test_a_client_receives_and_replies_exactly_its_budgets_bases():
    fed = federation()
    algo = fed.algorithm
    assert algo.num_bases == 8 and list(fed.algorithm.ctx.budgets) == [0.125] * 2 + [0.25] * 2 + [0.5] * 2 + [1.0] * 2
    torch.manual_seed(0)
    state = algo.init()
    assert {k.split("/")[0] for k in state.arrays} == {base_prefix(i) for i in range(8)}
    messages = algo.configure(state, 1, list(range(8)))
    for c, msg in messages.items():
        n = bases_for(algo.ctx.budgets[c], 0.125)
        assert len(msg.meta["bases"]) == n
        assert {k.split("/")[0] for k in msg.arrays} == {base_prefix(i) for i in msg.meta["bases"]}
    c = 2  # budget 0.25: two bases
    ctx = ClientContext(c, 1, torch.Generator().manual_seed(c), fed.device)
    reply, _ = algo.client_update(messages[c], fed.data.client(c), ClientStore().get(c), ctx)
    spec = algo.reply_spec(messages[c])
    assert set(reply.arrays) == set(spec)
    for k, (shape, dtype) in spec.items():
        assert tuple(reply.arrays[k].shape) == shape and reply.arrays[k].dtype == dtype
    # each base trained on its own: both moved away from what the client received
    for i in messages[c].meta["bases"]:
        key = f"{base_prefix(i)}/head.weight"
        assert not torch.equal(reply.arrays[key], messages[c].arrays[key])


def test_aggregation_is_a_per_base_weighted_mean_and_untrained_bases_keep_their_values():
    fed = federation("algorithm.base_ratio=0.25", "budget.widths=[0.25,0.5,1.0]")
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    key = "head.weight"
    shape = state.arrays[f"base0/{key}"].shape

    def reply(bases, n, value):
        arrays = {}
        for i in bases:
            for k, v in state.arrays.items():
                if k.startswith(base_prefix(i) + "/"):
                    arrays[k] = torch.full_like(v, value) if v.is_floating_point() else v.clone()
        return Message(arrays=arrays, meta={"num_examples": n, "loss": 0.0, "steps": 1})

    replies = {0: reply([0, 1], 10, 1.0), 1: reply([1], 30, 5.0), 2: reply([0, 2], 20, -2.0)}
    new, metrics = algo.aggregate(state, replies, 1)
    assert torch.allclose(new.arrays[f"base0/{key}"], torch.full(shape, (10 * 1.0 + 20 * -2.0) / 30))
    assert torch.allclose(new.arrays[f"base1/{key}"], torch.full(shape, (10 * 1.0 + 30 * 5.0) / 40))
    assert torch.allclose(new.arrays[f"base2/{key}"], torch.full(shape, -2.0))
    assert torch.equal(new.arrays[f"base3/{key}"], state.arrays[f"base3/{key}"])
    assert metrics["splitmix"]["base_counts"] == [2, 2, 1, 0]
    one_base = sum(v.numel() * v.element_size() for k, v in state.arrays.items() if k.startswith("base0/"))
    assert metrics["splitmix"]["upload_bytes_mean"] == pytest.approx((2 + 1 + 2) * one_base / 3)


def test_the_mixed_model_of_width_w_averages_the_logits_of_the_first_w_over_r_bases():
    fed = federation()
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    preds = algo.predictors(state)
    assert list(preds) == ["x1", "x0.5", "x0.25", "x0.125"]
    x = algo.ctx.normalize(fed.data.train.x[:32])
    bases = []
    for i in range(8):
        b = algo.new_base()
        b.load_state_dict(state.prefixed(base_prefix(i)))
        bases.append(b.eval())
    with torch.no_grad():
        for name, n in (("x0.25", 2), ("x1", 8)):
            want = torch.stack([b(x) for b in bases[:n]]).mean(0)
            assert torch.allclose(preds[name].eval()(x), want, atol=1e-5), name
    shape = tuple(fed.data.train.x.shape[1:])
    p1, m1 = model_cost(preds["x0.125"], shape)
    p8, m8 = model_cost(preds["x1"], shape)
    assert p8 == 8 * p1 and m8 == pytest.approx(8 * m1, rel=0.01)
    full = algo.ctx.new_model()
    assert p8 < 0.5 * sum(p.numel() for p in full.parameters())  # 8 bases of r = 1/8 cost far less than 1 net


def test_cost_evaluator_logs_params_and_macs_per_width(tmp_path):
    import fedtrust

    res = fedtrust.run(None, [*BASE, "rounds=1", "eval.every=1", "eval.metrics=[accuracy,cost]",
                              f"out={tmp_path}", "checkpoint_every=0"], progress=False, report=False)
    by = res.summary["by_predictor"]
    assert by["x1"]["cost"]["params"] == 8 * by["x0.125"]["cost"]["params"]
    assert by["x0.5"]["cost"]["macs"] == 4 * by["x0.125"]["cost"]["macs"]


@pytest.mark.parametrize("overrides, message", [
    (["model.norm=bn_static", "algorithm.base_ratio=0.3"], "1/K"),
    (["model.norm=bn_static", "algorithm.widths=[0.2,1.0]"], "not a multiple of base_ratio"),
    (["model.norm=bn_static", "algorithm.base_ratio=0.25"], "below one base net"),
    (["model.name=cnn2"], "width_ratio"),
    (["model.norm=bn"], "rescale_layer"),
])
def test_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_federation(build_config({}, [*(o for o in BASE if not o.startswith("model.norm")), *overrides]))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_one_training_serves_every_width_on_digits_domains(tmp_path):
    """Split-Mix on digits domains with block budgets (budget tied to domain, as in the paper): after one run
    every width predicts well, and accuracy does not fall as width grows (tolerance 2 points)."""
    import fedtrust

    res = fedtrust.run(None, [*BASE, "data.dataset=digits_domains", "data.partition=domains", "data.num_clients=10",
                              "data.clients_per_round=10", "model.width=32", "rounds=8", "eval.every=8",
                              "train.lr=0.05", "checkpoint_every=0", f"out={tmp_path}", "seed=0"],
                       progress=False, report=False)
    by = res.summary["by_predictor"]
    accs = [by[f"x{w:g}"]["test_acc"] for w in (0.125, 0.25, 0.5, 1.0)]
    assert accs[0] > 0.35, accs  # 5 domains of 8x8 digits, 8 rounds: ~0.48 at x1/8, ~0.53 at x1 (seed 0)
    for narrow, wide in zip(accs, accs[1:]):
        assert wide >= narrow - 0.02, accs
    assert accs[-1] > accs[0], accs
