"""FLIP (spec flip.md §2): the hardening client's state, warm-up, determinism, and FLIP-off = FedAvg."""

import pytest
import torch

import fedtrust
import fedtrust.algorithms.flip  # noqa: F401  (import registers)
from fedtrust.algorithms.flip import flip_state
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import ClientContext, Message
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation

SMALL = ["algorithm.name=flip", "algorithm.warmup_steps=40", "algorithm.pair_steps=20", "algorithm.refine_steps=5",
         "algorithm.tau_inv=0.3"]


def federation(*overrides):
    cfg = build_config({}, ["data.num_clients=20", "data.clients_per_round=4", "eval.personalized=false",
                            *SMALL, *overrides])
    return build_federation(cfg)


def visit(fed, state, client, round, client_state):
    ctx = ClientContext(client, round, torch.Generator().manual_seed(100 * round + client), fed.device)
    message = fed.algorithm.configure(state, round, [client])[client]
    return fed.algorithm.client_update(message, fed.data.client(client), client_state, ctx)


def two_visits(fed, client=1):
    """Client ``client`` selected in rounds 1 and 2, its state carried by a client store."""
    torch.manual_seed(0)
    state = fed.algorithm.init()
    store = ClientStore()
    out = []
    for r in (1, 2):
        reply, new = visit(fed, state, client, r, store.get(client))
        store.set(client, new)
        out.append((reply, new))
    return out


def test_state_holds_flip_matrices_and_cache_the_reply_only_the_model(one_thread):
    """Rules out: FLIP state leaking into the reply (the server would average it), state in module globals
    (a second client store would see it), a warm-up matrix not normalised by its max or not column-wise."""
    fed = federation()
    (r1, s1), (r2, s2) = two_visits(fed)
    model_keys = {f"model/{k}" for k in fed.algorithm.template.state_dict()}
    for reply in (r1, r2):
        assert set(reply.arrays) == model_keys, "the reply must hold only the model"
        assert reply.meta["num_examples"] == len(fed.data.indices[1]) and reply.meta["steps"] >= 1
    st = flip_state(s1)
    k = fed.algorithm.ctx.num_classes
    assert st["mat_diff"].shape == (k, k) and bool(st["seen"])
    mat = st["mat_diff"]
    assert float(mat.max()) == 1.0, "warm-up distances are normalised by their maximum"
    assert torch.all(mat.diagonal() == 0)
    off = ~torch.eye(k, dtype=torch.bool)
    for t in range(k):  # the warm-up trigger of target t sets every pair (i, t) to one value
        assert len(set(mat[:, t][off[:, t]].tolist())) == 1, t
    caches = [key for key in flip_state(s2) if key.startswith("cache/")]
    assert caches and all(key.endswith(("/a", "/b")) for key in caches), "phase B caches each pair's raw (a, b)"
    a = flip_state(s2)[caches[0][:-1] + "a"]
    assert a.shape == fed.data.train.x.shape[-2:]
    # a fresh store knows nothing of the first: no module-level state
    _, fresh = visit(fed, fed.algorithm.init(), 1, 2, ClientStore().get(1))
    assert not any(key.startswith("flip/cache/") for key in fresh.arrays)


def test_warmup_runs_only_on_a_clients_first_selection(one_thread):
    """Rules out: warming up every round (or never), and phase B running before the warm-up's batches."""
    fed = federation()
    (r1, _), (r2, _) = two_visits(fed)
    k = fed.algorithm.ctx.num_classes
    batches = -(-len(fed.data.indices[1]) // fed.algorithm.ctx.schedule.batch_size)
    assert batches < k  # so the first visit is warm-up only: one inversion per batch, target = batch index
    assert r1.meta["flip_warmup"] == batches and r1.meta["flip_pairs"] == 0
    assert r2.meta["flip_warmup"] == 0 and r2.meta["flip_pairs"] > 0
    # the same round-2 visit without the stored state warms up again
    torch.manual_seed(0)
    state = fed.algorithm.init()
    again, _ = visit(fed, state, 1, 2, ClientStore().get(1))
    assert again.meta["flip_warmup"] > 0


def test_same_seed_same_numbers(one_thread):
    """Rules out: randomness outside ``ctx.generator`` (global RNG, unseeded draws)."""
    first, second = two_visits(federation()), two_visits(federation())
    for (ra, sa), (rb, sb) in zip(first, second):
        assert ra.meta == rb.meta
        assert sa.arrays.keys() == sb.arrays.keys()
        for key in ra.arrays:
            assert torch.equal(ra.arrays[key], rb.arrays[key]), key
        for key in sa.arrays:
            assert torch.equal(sa.arrays[key], sb.arrays[key]), key
    # and the hardening changed the model differently from FedAvg's client
    plain = two_visits(federation("algorithm.invert=false"))
    assert not torch.equal(first[0][0].arrays["model/head.weight"], plain[0][0].arrays["model/head.weight"])
    assert not any(k.startswith("flip/") for k in plain[1][1].arrays), "FLIP off keeps no FLIP state"


def test_invert_false_reproduces_fedavg_exactly(tmp_path, one_thread):
    """FLIP off (τ = 0) is the undefended run (spec §6): same metrics, same final weights, bit for bit.
    Rules out: FLIP off still swapping the optimizer, re-batching differently, or drawing extra numbers."""
    common = ["rounds=2", "eval.every=2", "eval.personalized=false", "executor=sequential", "data.num_clients=6",
              "data.clients_per_round=3", "checkpoint_every=0"]
    avg = fedtrust.run(None, common + [f"out={tmp_path / 'avg'}"], progress=False, report=False)
    off = fedtrust.run(None, common + ["algorithm.name=flip", "algorithm.invert=false", f"out={tmp_path / 'off'}"],
                       progress=False, report=False)
    for key in ("test_acc", "test_loss", "train_loss", "ece", "class_acc"):
        assert avg.summary[key] == off.summary[key], key
    assert avg.state.arrays.keys() == off.state.arrays.keys()
    for key, v in avg.state.arrays.items():
        assert torch.equal(v, off.state.arrays[key]), key


@pytest.mark.slow
def test_vectorized_batches_the_inversions_and_equals_sequential_in_float64(float64, one_thread, monkeypatch):
    """The vectorised executor runs the round's hardening programs in lock-step, each tick's inversions in
    one vmapped solve across clients; in float64 it equals the sequential executor (one client at a time).
    An attacker (client 1, DBA) trains on the side, as FedAvg's poisoned client.
    Rules out: batched inversions that mix clients' images, weights or generators, a client program sharing
    the template model with another, and a lock-step that reorders a client's own draws."""
    from fedtrust.fl.executor import SequentialExecutor
    from fedtrust.fl.vectorized import VectorizedExecutor
    from fedtrust.robust.inversion import InversionJob

    cfg = build_config({}, ["data.num_clients=6", "data.clients_per_round=4", "data.min_size=20",
                            "eval.personalized=false", *SMALL, "attack.name=backdoor", "attack.ids=[1]",
                            "attack.force=true"])
    fed = build_federation(cfg)
    torch.manual_seed(0)
    start = fed.algorithm.init()
    sizes = []
    solve = InversionJob.solve_batch.__func__

    def spy(cls, jobs):
        sizes.append(len(jobs))
        return solve(cls, jobs)

    monkeypatch.setattr(InversionJob, "solve_batch", classmethod(spy))
    attack = fed.executor.attack
    assert attack is not None
    seq = SequentialExecutor(fed.algorithm, fed.data, cfg.seed, fed.device, 4, attack=attack)
    a = seq.run(start, ClientStore(), 0, 2)
    assert set(sizes) == {1}
    sizes.clear()
    vec = VectorizedExecutor(fed.algorithm, fed.data, cfg.seed, fed.device, 4, attack=attack)
    b = vec.run(start, ClientStore(), 0, 2)
    assert max(sizes) >= 3, f"the 3 benign clients' inversions were not batched: batch sizes {sorted(set(sizes))}"
    for k in a.arrays:
        assert torch.allclose(a.arrays[k], b.arrays[k], atol=1e-9, rtol=1e-7), k
    assert any(not torch.equal(a.arrays[k], start.arrays[k]) for k in a.arrays), "nothing trained"


def test_a_replaced_model_with_negative_bn_variance_is_trained_plainly_not_inverted(one_thread):
    """Model replacement scales BN running variances by γ too (spec §1), so the replaced global model can hold
    negative variances and a NaN eval-mode forward. Rules out: inverting on it (NaN triggers stamped on the
    batch, a NaN reply the server rejects, NaN cached in the client's state for ever: the backdoor benchmark's
    collapsed single-shot run), and skipping the round instead of letting train-mode BN repair the model."""
    fed = federation()
    torch.manual_seed(0)
    state = fed.algorithm.init()
    key = next(k for k in state.arrays if k.endswith("running_var"))
    benign = state.arrays[key].clone()
    state.arrays[key] = benign + 10.0 * (0.8 * benign - benign)  # G + γ(X − G), γ = 10, X's variance 0.8·G: −G
    model = fed.algorithm.template
    model.load_state_dict({k[len("model/"):]: v for k, v in state.arrays.items() if k.startswith("model/")})
    model.eval()
    x = fed.data.client(1).x[:8].float()
    assert not torch.isfinite(model(fed.algorithm.normalize01(x / 255.0))).all(), "precondition: NaN in eval"
    message = fed.algorithm.configure(state, 1, [1])[1]
    ctx = ClientContext(1, 1, torch.Generator().manual_seed(101), fed.device)
    reply, new = fed.algorithm.client_update(message, fed.data.client(1), ClientStore().get(1), ctx)
    assert reply.meta["flip_unsound"] == 1 and reply.meta["flip_warmup"] == 0 and reply.meta["flip_pairs"] == 0
    assert reply.meta["steps"] >= 1, "the round trains (plain steps), it is not skipped"
    for k, v in reply.arrays.items():
        assert torch.isfinite(v).all(), k
    assert not flip_state(new) or not bool(flip_state(new)["seen"]), "no warm-up yet: the next sound visit does it"
    # a sound model next round: the client inverts again (warm-up, since it never has)
    ctx2 = ClientContext(1, 2, torch.Generator().manual_seed(201), fed.device)
    message2 = fed.algorithm.configure(fed.algorithm.init(), 2, [1])[1]
    reply2, _ = fed.algorithm.client_update(message2, fed.data.client(1), new, ctx2)
    assert reply2.meta["flip_unsound"] == 0 and reply2.meta["flip_warmup"] > 0


def test_a_round_whose_hardening_clients_all_skip_every_batch_warns(one_thread):
    """Rules out the silent failure of session 28: inversions too short for any mask to get under the skip
    size (MNIST, 30 steps), so every benign client replied a null update and the run looked like a defense.
    The warning names the knobs; a round where one hardening client stepped, or where only attackers (no FLIP
    counts) trained, does not warn."""
    import warnings

    fed = federation()
    state = fed.algorithm.init()
    model = {k: v for k, v in state.arrays.items() if k.startswith("model/")}

    def reply(**meta):
        return Message(dict(model), {"num_examples": 10, **meta})

    skipped = dict(steps=0, flip_warmup=5, flip_pairs=0, flip_skipped=5, flip_unsound=0)
    attacker = reply(steps=40)
    with pytest.warns(RuntimeWarning, match=r"FLIP skipped every hardening batch of a round's 2 benign client\(s\)"
                                            r".*algorithm\.max_mask_frac = 0\.125.*warmup_steps"):
        _, metrics = fed.algorithm.aggregate(state, {1: reply(**skipped), 2: reply(**skipped), 3: attacker}, 1)
    assert metrics["flip"]["flip_skipped"] == 10 and metrics["flip"]["steps"] == 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fed.algorithm.aggregate(state, {1: reply(**skipped), 2: reply(**{**skipped, "steps": 1})}, 1)
        fed.algorithm.aggregate(state, {3: attacker}, 1)


def test_warmup_lr_sets_the_warmup_steps_only(one_thread, monkeypatch):
    """Rules out: ``warmup_lr`` ignored, applied to the pair hardening too (lr not restored after the warm-up),
    or unset changing FLIP (its default is the hardening lr)."""
    from fedtrust.algorithms.flip import _Hardening

    seen = []
    step = _Hardening.step

    def spy(self, x01, y):
        seen.append(("pairs" if self.counts["flip_pairs"] else "warmup", self.opt.param_groups[0]["lr"]))
        step(self, x01, y)

    monkeypatch.setattr(_Hardening, "step", spy)
    fed = federation("train.steps=14", "algorithm.harden_lr=0.02", "algorithm.warmup_lr=0.0005")
    torch.manual_seed(0)
    reply, _ = visit(fed, fed.algorithm.init(), 1, 1, ClientStore().get(1))  # first visit: 10 warm-up + 4 pairs
    assert reply.meta["flip_warmup"] > 0 and reply.meta["flip_pairs"] > 0
    assert {lr for phase, lr in seen if phase == "warmup"} == {0.0005}
    assert {lr for phase, lr in seen if phase == "pairs"} == {0.02}
    seen.clear()
    fed = federation("train.steps=14", "algorithm.harden_lr=0.02")
    visit(fed, fed.algorithm.init(), 1, 1, ClientStore().get(1))
    assert seen and {lr for _, lr in seen} == {0.02}
    with pytest.raises(Exception, match="warmup_lr"):
        federation("algorithm.warmup_lr=0")


def _warm_starts(fed, monkeypatch, visits=4, client=1):
    """Per visit, each hardened pair (s, t) in order with whether its cache held a warm start for it."""
    from fedtrust.algorithms.flip import _Hardening

    harden = _Hardening.harden
    log: list[tuple[int, int, bool]] = []

    def spy(self, idx, s, t, counts, steps, lam):
        log.append((s, t, (s, t) in self.st.cache))
        return (yield from harden(self, idx, s, t, counts, steps, lam))

    monkeypatch.setattr(_Hardening, "harden", spy)
    torch.manual_seed(0)
    state, store, per_visit = fed.algorithm.init(), ClientStore(), []
    for r in range(1, visits + 1):
        log.clear()
        _, new = visit(fed, state, client, r, store.get(client))
        store.set(client, new)
        per_visit.append((list(log), new))
    return per_visit


def test_keep_cache_false_starts_each_visits_first_inversion_of_a_pair_at_random(one_thread, monkeypatch):
    """``algorithm.keep_cache=false``: the pair cache lives for one visit. Rules out: a stale trigger from an
    earlier visit warm-starting the first inversion of a pair, the cache dropped within a visit too (the
    pair's second batch must still warm-start from its first), the stored triggers dropped (the report
    shows them), and ``mat_diff`` / ``l1`` forgotten with the cache. With the default (FLIP) a later visit does warm-start."""
    kept = _warm_starts(federation("data.min_size=60"), monkeypatch)
    assert any(hit for log, _ in kept[2:] for s, t, hit in _firsts(log)), "FLIP warm-starts later visits"
    fresh = _warm_starts(federation("data.min_size=60", "algorithm.keep_cache=false"), monkeypatch)
    for log, stored in fresh[1:]:
        assert log, "phase B ran"
        assert not any(hit for s, t, hit in _firsts(log)), "a pair's first inversion of a visit starts at random"
        assert any(hit for _, _, hit in log), "within a visit the pair's next batch warm-starts from its first"
        st = flip_state(stored)
        assert any(key.startswith("cache/") for key in st), "the visit's triggers are stored (the report's masks)"
        assert float(st["l1"].sum()) > 0 and bool(st["seen"])
    assert not torch.equal(flip_state(fresh[3][1])["mat_diff"], flip_state(fresh[1][1])["mat_diff"])


def _firsts(log):
    """The entries of ``log`` for a pair none of whose orientations was hardened earlier in the visit."""
    seen, out = set(), []
    for s, t, hit in log:
        if (s, t) not in seen and (t, s) not in seen:
            out.append((s, t, hit))
        seen |= {(s, t), (t, s)}
    return out
