"""FedLoGe (spec fedloge.md §3-5): GLA-FR maths on hand-built heads, the declarative client,
local heads that never leave the client, executor parity and the long-tail effect on digits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from fedtrust.algorithms.fedloge import FedLoGe, absent_class_mask, ga_fr, la_fr, la_fr_logits
from fedtrust.fl.executor import ClientStore, SequentialExecutor
from fedtrust.fl.local import train_locally
from fedtrust.fl.protocol import ClientContext, Message
from fedtrust.fl.vectorized import VectorizedExecutor
from fedtrust.objectives import CrossEntropy
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = ["algorithm.name=fedloge", "algorithm.refine_steps=20", "algorithm.norm_target=1.0"]


def federation(*overrides):
    cfg = build_config({}, ["data.num_clients=12", "data.clients_per_round=3", "data.min_size=10", "train.steps=3",
                            "train.momentum=0.5", "eval.personalized=false", *FAST, *overrides])
    return build_federation(cfg)


def ctx_of(fed, c, rnd=1):
    return ClientContext(c, rnd, torch.Generator().manual_seed(100 * rnd + c), fed.device)


# ----------------------------------------------------------------------------- GLA-FR (spec §5)


def test_ga_fr_rescales_rows_to_the_constant_and_flips_a_head_biased_prediction():
    g = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # head class 0 has the larger row norm
    f = torch.tensor([[0.4, 1.0]])
    assert (f @ g.T).argmax().item() == 0  # raw: 0.8 vs 0.5
    g_tilde = ga_fr(g, 1.7)
    assert torch.allclose(g_tilde, torch.tensor([[1.7, 0.0], [0.0, 1.7]]))
    assert (f @ g_tilde.T).argmax().item() == 1  # realigned: 0.68 vs 1.7
    assert torch.allclose(ga_fr(torch.tensor([[3.0, 4.0]]), 1.7), torch.tensor([[1.02, 1.36]]))


def test_la_fr_transfers_local_row_norms_onto_the_raw_global_head():
    local_w = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # norms 2 and 0.5
    global_w = torch.tensor([[1.0, 1.0], [3.0, -1.0]])
    assert torch.allclose(la_fr(local_w, global_w), torch.tensor([[2.0, 2.0], [1.5, -0.5]]))
    f = torch.tensor([[1.0, 2.0]])
    lb, gb = torch.tensor([0.1, 0.2]), torch.tensor([-0.5, 0.5])
    # L f + b_L = [2.1, 1.2]; P f + b_G = [6 - 0.5, 0.5 + 0.5] = [5.5, 1.0]
    z = la_fr_logits(f, local_w, lb, global_w, gb)
    assert torch.allclose(z, torch.tensor([[7.6, 2.2]]))
    masked = la_fr_logits(f, local_w, lb, global_w, gb, mask=torch.tensor([True, False]))
    assert masked.argmax().item() == 1 and masked[0, 0] < -1e9


def test_absent_class_mask_marks_classes_with_fewer_than_two_samples():
    assert absent_class_mask(torch.tensor([0.0, 1.0, 2.0, 9.0])).tolist() == [True, True, False, False]


def test_predictors_apply_ga_fr_and_la_fr_to_the_state_heads():
    fed = federation()
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    state.arrays["head_g/weight"] = torch.randn_like(state.arrays["head_g/weight"])
    own = Message(arrays={"head_l/weight": torch.randn_like(state.arrays["head_g/weight"]),
                          "head_l/bias": torch.randn(10)})
    preds = algo.predictors(state, own)
    assert list(preds) == ["universal", "global", "personalized"]
    x = algo.ctx.normalize(fed.data.train.x[:5])
    for p in preds.values():
        p.eval()
    f = preds["universal"].features(x)
    g_w, g_b = state.arrays["head_g/weight"], state.arrays["head_g/bias"]
    assert torch.allclose(preds["global"](x), f @ ga_fr(g_w, 1.7).T + g_b, atol=1e-5)
    expect = la_fr_logits(f, own.arrays["head_l/weight"], own.arrays["head_l/bias"], g_w, g_b)
    assert torch.allclose(preds["personalized"](x), expect, atol=1e-5)
    sse = state.arrays["sse_c/weight"]
    assert torch.allclose(preds["universal"](x), f @ sse.T + state.arrays["sse_c/bias"], atol=1e-5)


# ----------------------------------------------------------------------------- the client (spec §4)


def test_one_optimizer_on_the_summed_loss_equals_the_reference_three_optimizers():
    """The docstring's claim: with shared lr/momentum the stop-gradients make one SGD = three SGDs."""
    fed = federation("train.steps=3", "train.batch_size=8", "data.augment=none")
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    msg = algo.configure(state, 1, [0])[0]
    plan = algo.local_training(msg, Message(), ctx_of(fed, 0))
    assert not any(n.startswith("sse_c.") for n in plan.trainable)
    ours = train_locally(plan, fed.data.client(0), ctx_of(fed, 0), algo.ctx.normalize).state

    net = plan.model
    net.load_state_dict(plan.init)
    net.train()
    opt = {part: torch.optim.SGD(getattr(net, part).parameters(), lr=msg.meta["lr"], momentum=0.5)
           for part in ("backbone", "head_g", "head_l")}
    data, gen = fed.data.client(0), ctx_of(fed, 0).generator
    from fedtrust.fl.local import client_schedule
    for idx in client_schedule(plan, len(data), gen).batches:
        x, y = algo.ctx.normalize(data.x[idx]), data.y[idx]
        f = net.features(x)
        for part, logits in (("backbone", net.sse_c(f)), ("head_g", net.head_g(f.detach())),
                             ("head_l", net.head_l(f.detach()))):
            opt[part].zero_grad()
            F.cross_entropy(logits, y).backward()
            opt[part].step()
    for k, v in net.state_dict().items():
        assert torch.allclose(ours[k], v, atol=1e-5), k


def test_local_heads_never_appear_in_replies_and_stay_in_the_client_store():
    fed = federation()
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    seen: list[dict[int, Message]] = []
    aggregate = algo.aggregate

    def spy(state, replies, round):
        seen.append(replies)
        return aggregate(state, replies, round)

    algo.aggregate = spy
    store = ClientStore()
    final = SequentialExecutor(algo, fed.data, 0, fed.device, 3).run(state, store, 0, 3)
    assert seen and store.states
    heads = [s.arrays["head_l/weight"] for s in store.states.values()]
    for replies in seen:
        for reply in replies.values():
            assert all(k.split("/")[0] in ("backbone", "head_g") for k in reply.arrays), sorted(reply.arrays)
            for v in reply.arrays.values():  # not even under another name
                assert not any(v.shape == h.shape and torch.equal(v, h) for h in heads)
    assert torch.equal(final.arrays["sse_c/weight"], state.arrays["sse_c/weight"])  # SSE-C never changes
    assert not any(k.startswith("head_l/") for k in final.arrays)
    assert all(set(s.arrays) == {"head_l/weight", "head_l/bias"} for s in store.states.values())


def test_aggregate_is_the_sample_weighted_mean_of_backbone_and_global_head():
    fed = federation()
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    msgs = algo.configure(state, 1, [0, 1])
    replies = {c: algo.client_update(msgs[c], fed.data.client(c), Message(), ctx_of(fed, c))[0] for c in (0, 1)}
    new, _ = algo.aggregate(state, replies, 1)
    n = {c: len(fed.data.indices[c]) for c in replies}
    for key in ("head_g/weight", "backbone/body.0.0.weight"):
        expect = sum(n[c] * replies[c].arrays[key] for c in replies) / sum(n.values())
        assert torch.allclose(new.arrays[key], expect, atol=1e-6), key


def test_a_client_never_sampled_is_scored_with_the_common_initial_local_head():
    fed = federation()
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    p = algo.predictors(state, Message())["personalized"].head
    assert torch.equal(p.lw, state.arrays["head_l_init/weight"])
    torch.manual_seed(0)
    again = algo.init()
    assert all(torch.equal(state.arrays[k], again.arrays[k]) for k in state.arrays)  # seeded: SSE-C included


def test_other_objectives_train_the_backbone_through_sse_c():
    fed = federation()
    algo = fed.algorithm

    class Scaled(CrossEntropy):  # not plain CE: the general path
        pass

    other = FedLoGe(algo.params, dataclasses.replace(algo.ctx, objective=Scaled(CrossEntropy.Params(), 10, None)))
    torch.manual_seed(0)
    state = algo.init()
    plan = algo.local_training(algo.configure(state, 1, [0])[0], Message(), ctx_of(fed, 0))
    net = plan.model
    net.load_state_dict(plan.init)
    net.eval()
    batch = {"x": algo.ctx.normalize(fed.data.train.x[:16]), "y": fed.data.train.y[:16]}
    assert torch.allclose(other.local_loss(net, {}, batch, {}), algo.local_loss(net, {}, batch, {}))


def test_mask_option_records_label_counts_and_masks_absent_classes():
    fed = federation("algorithm.mask_absent=true", "data.alpha=0.1", "data.min_size=5")
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    msg = algo.configure(state, 1, [0])[0]
    assert algo.local_training(msg, Message(), ctx_of(fed, 0)) is None  # first visit: general path records the counts
    _, own = algo.client_update(msg, fed.data.client(0), Message(), ctx_of(fed, 0))
    counts = fed.data.client(0).class_counts().float()
    assert torch.equal(own.arrays["label_counts"], counts)
    assert algo.local_training(msg, own, ctx_of(fed, 0)) is not None
    absent = counts < 2
    assert absent.any(), "the test needs a client lacking some class"
    logits = algo.predictors(state, own)["personalized"].eval()(algo.ctx.normalize(fed.data.train.x[:4]))
    assert (logits[:, absent] < -1e9).all() and (logits[:, ~absent] > -1e9).all()




def test_vectorized_executor_runs_fedloge_declaratively_and_matches_sequential(float64):
    fed = federation("data.clients_per_round=4", "data.alpha=0.3")
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    vec = VectorizedExecutor(algo, fed.data, 0, fed.device, 4)
    vec.log = lambda *a: pytest.fail("FedLoGe fell back to the sequential path")
    sa, sb = ClientStore(), ClientStore()
    a = SequentialExecutor(algo, fed.data, 0, fed.device, 4).run(state, sa, 0, 2)
    b = vec.run(state, sb, 0, 2)
    for k in a.arrays:
        assert torch.allclose(a.arrays[k].double(), b.arrays[k].double(), atol=1e-9, rtol=1e-7), k
    assert sa.states.keys() == sb.states.keys()
    for c in sa.states:
        for k, v in sa.states[c].arrays.items():
            assert torch.allclose(v, sb.states[c].arrays[k], atol=1e-9, rtol=1e-7), (c, k)
    assert not torch.equal(a.arrays["head_g/weight"], state.arrays["head_g/weight"])


# ----------------------------------------------------------------------------- long tail (spec §9)


@pytest.mark.slow
def test_digits_lt_global_head_norms_follow_class_frequency_and_ga_fr_lifts_the_tail(tmp_path):
    """configs/fedloge-digits-lt.yaml (spec §9 checks 1-2), seed 0.

    Measured on seeds 0/1/2 (1 CPU thread, ~45 s each): Spearman ρ(‖G_c‖, n_c) = 0.93/0.83/0.82;
    tail (class 9) accuracy GA-FR 0.75/0.86/0.69 vs raw G 0.50/0.53/0.17; overall 0.922/0.942/0.914
    vs 0.881/0.864/0.833. The thresholds below leave room for float noise across machines.

    ρ > 0.6 rules out a global head G whose row norms do not grow with class frequency: G trained with
    class-reweighted CE (ρ = 0.10) or row-normalised on the server after averaging (ρ = 0.41, which the
    former bar of 0.3 let through). A logit-adjusted G is not ruled out (its bias absorbs the prior).
    """
    import fedtrust

    run = fedtrust.run("configs/fedloge-digits-lt.yaml", ["seed=0", "algorithm.extra_predictors=true",
                                                          f"out={tmp_path / 'run'}"], progress=False, report=False)
    part = json.loads((run.run_dir / "partition.json").read_text())
    norms = run.state.arrays["head_g/weight"].norm(dim=1)
    rho = spearmanr(norms.numpy(), part["class_counts"])[0]
    assert rho > 0.6, rho  # measured 0.93 (seed 0; 0.83/0.82 on seeds 1/2)
    by = run.summary["by_predictor"]
    assert by["global"]["hmt_acc"]["tail"] > by["global_raw"]["hmt_acc"]["tail"]
    assert by["global"]["test_acc"] >= by["global_raw"]["test_acc"]


@pytest.mark.slow
def test_rna_objective_inside_fedloge_trains_the_projection_and_reports_ood(tmp_path):
    """Long-tailed federated OOD detection by config: FedLoGe's backbone objective swapped for RNA (issue 7).

    The RN score must separate ID digits from noise clearly better than chance, which rules out an RNA term
    that shrinks instead of amplifies the ID representation norm (sign flipped, or never reaching h) and an
    ``rn`` score that ranks outliers as ID. MSP is not checked: after 2 rounds noise gets confident
    predictions (AUROC 0.07 on seed 0), which is what RN is there to fix.
    """
    import fedtrust

    run = fedtrust.run("configs/fedloge-digits-lt.yaml", [
        "objective.name=rna", "data.outliers=photos", "data.num_outliers=600", "model.bn_affine=false",
        "algorithm.bn_aggregation=pooled", "rounds=2", "eval.every=2", "eval.ood=[noise]", "eval.scores=[msp,rn]",
        f"out={tmp_path / 'run'}"], progress=False, report=False)
    state = run.state.arrays
    proj = [k for k in state if k.startswith("backbone/projection.")]
    assert proj, "the RNA projection head must travel with the backbone"
    fed = federation("objective.name=rna", "data.outliers=photos", "model.bn_affine=false")
    algo = fed.algorithm
    torch.manual_seed(0)
    plan = algo.local_training(algo.configure(algo.init(), 1, [0])[0], Message(), ctx_of(fed, 0))
    assert any(n.startswith("backbone.projection.") for n in plan.trainable)
    net = plan.model
    net.load_state_dict(plan.init)
    x = algo.ctx.normalize(fed.data.train.x[:8])
    batch = {"x": x, "y": fed.data.train.y[:8], "x_ood": torch.rand_like(x)}
    algo.local_loss(net, {}, batch, {}).backward()
    grads = [p.grad for n, p in net.named_parameters() if n.startswith("backbone.projection.")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # the RNA term reaches h
    assert not any(k.startswith("head_l/") for k in state)
    for name in ("universal", "global"):
        ood = run.summary["by_predictor"][name]["ood"]["noise/rn"]
        # measured 0.806 for both predictors (seed 0, the one used here; seeds 1/2 give 0.60/0.74)
        assert ood["auroc"] >= 0.6, (name, ood)
    assert run.summary["by_predictor"]["universal"]["feature_norm"]["id"] > 0
