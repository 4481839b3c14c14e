"""FLIP (Zhang et al., ICLR 2023): benign clients harden their model with triggers inverted from it.

Spec ``shared/specs/flip.md`` §2 (the client, FLIP's ``trigger_fast_train``) and §3 (the server).

**Server** (§3): unchanged FedAvg. FLIP's rule ``G ← G + (η/n)·Σ_i Δ_i`` is fedtrust's defense with the
mean aggregator, ``defense.uniform=true`` (every reply weighted 1/n: FLIP ignores the sample counts) and
``defense.server_lr`` = η (FLIP: 0.1); aggregation goes through ``self.ctx.defense.merge`` so every
configured aggregator applies (the backdoor benchmark puts FLIP's clients behind each). The paper-setting
presets (MNIST, Fashion-MNIST, CIFAR-10) use the uniform mean; the digits presets keep the default
sample-weighted mean, so a FLIP digits run differs from its FedAvg baseline only in the clients' training.

**Client** (§2, ``invert=true``): local SGD is replaced by hardening. Adam (betas (0.5, 0.9), lr
``harden_lr``) on the client's data, re-batched with ``train.batch_size`` and shuffled with the client's
generator, as the configured schedule draws its batches (``train.epochs`` passes, or ``train.steps``
batches, ``train.drop_last``), at most ``max_steps`` of them:

* Phase A, warm-up (first selection of the client only), batch k = 0..K−1, target t = k: one universal
  trigger (:func:`~fedtrust.robust.inversion.invert_trigger`, ``warmup_steps`` steps) flipping one exemplar
  per class ≠ t to t; stamped on ``warmup_portion`` of the batch's non-target images, true labels kept, one
  Adam step (at ``warmup_lr`` when set, a fedtrust extension: :meth:`_Hardening.warmup`). Its L1 becomes the
  initial distance of every pair (i, t); ``mat_diff`` is then normalised by its maximum.
* Phase B, pair hardening: a new pair (s, t) every 2 batches, random with probability
  ``random_pair_prob`` else the argmax of ``mat_diff`` (source present, ≠ the previous source). Both
  classes in the batch: :func:`~fedtrust.robust.inversion.invert_pair` (s→t stamped on the source images,
  t→s on the target's, ``portion``·min(n_s, n_t) each); only the source: one s→t trigger on ``portion`` of
  the source images. Masks warm-start from the pair's cache. No step when a mask's L1 exceeds
  ``max_mask_frac``·H·W (FLIP: H·W/8; here also in warm-up: an oversized universal trigger replaces the
  image, and training its true label on it teaches the model nothing but noise), else
  one Adam step, CE on the true labels over the whole batch. ``mat_diff[s, t]`` ← (mat_diff[s, t] + g)/2
  with g = (new − old)/old the relative growth of the pair's mask L1.

``keep_cache=false`` (a fedtrust option; FLIP keeps the cache): a pair's cached trigger serves only the
later batches of the same visit, and the first inversion of a pair in a visit starts at random (the last
visit's triggers are still stored, for the report's masks, but warm-start nothing). A client
is revisited every ~16 rounds (6 benign slots of 96 clients), and a trigger cached on an old global model
is a poor start on the new one: on MNIST's continuous DBA (seed 0, round 69, s → 2 for the 9 sources, 200
steps), random starts found masks of median 29 px with 33 % of their mass within 2 px of the trigger, cached
starts 48 px and 10 % (``benchmarks/flip_warm_start.py``, ``benchmarks/results/flip_warm_start_paper_cpu.md``).
``mat_diff`` and the reference L1 persist.

A received model whose eval-mode logits are not finite (a γ-scaled model replacement can leave negative BN
running variances) is not inverted on: the client takes plain Adam steps on its clean batches that round
(``flip_unsound`` in the reply's meta), a step whose loss is not finite is skipped, and a non-finite trigger is
never cached (:meth:`_Hardening.sound`).

The hardening is a client program (:mod:`fedtrust.fl.programs`): each inversion is an
:class:`~fedtrust.robust.inversion.InversionJob` request (the primitive of ``invert_trigger`` and
``invert_pair``), so the vectorised executor solves a round's inversions of one shape together, and every
client has its own model copy. Inversions start at random (spec §7.3: no knowledge of the trigger's
location); all randomness (batches, exemplars, pairs, inversions) comes from the client's generator
``ctx.generator``. The per-client state
(``flip/…`` keys of the executor-held client state: ``mat_diff``, ``l1``, ``seen`` and the per-pair cache
``cache/<s>_<t>/a|b``) is checkpointed with the client store and never replied. With ``invert=false`` the
client is FedAvg's (the configured optimizer and schedule), so FLIP off reproduces the undefended run.

GUESS (spec silent): the warm-up's exemplar of each class is the first of that class in a permutation of
the client's data drawn from its generator (classes the client lacks have none; a target with no other
class is skipped, untrained); the image counts stamped are ⌊portion·n⌋, the first images of the class in
batch order; "present" means ≥ 1 image for the argmax pair and > 1 for a random source; the random target
is any class ≠ source; the second batch of a pair is "after success" when every trigger of the first
batch reached τ_inv; ``mat_diff`` and the reference L1 of a pair move only when its trigger reached τ_inv
(an unreached trigger is all zeros, its size unmeasured); in the symmetric case both (s, t) and (t, s) are
updated; a pair covers the 2 batches after it is drawn, and its second batch is not trained on when it lacks the source.

Attackers: the runtime trains a malicious client whose attack sets its own training (``attack.lr`` /
``epochs`` / ...) with :meth:`local_training`, FedAvg's plan here, rewritten by the attack (spec §1: SGD);
other malicious clients run this client on their poisoned data.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Generator
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from fedtrust.algorithms.fedavg import FedAvg
from fedtrust.data.types import ImageSet
from fedtrust.fl.local import load_state, local_batches
from fedtrust.fl.programs import ClientProgram, run_program
from fedtrust.fl.protocol import ClientContext, LocalTraining, Message, TrainResult
from fedtrust.fl.sampling import seed_global_rngs
from fedtrust.registry import register
from fedtrust.robust.inversion import InversionJob, InversionParams, Raw, Trigger

PREFIX = "flip"
"""Prefix of FLIP's per-client state in the client's persistent state (never replied)."""
COUNTS = ("flip_warmup", "flip_pairs", "flip_skipped", "flip_unsound")
"""Per-client hardening counts in the reply's meta: warm-up triggers, pairs drawn, batches not trained on,
visits that found an unsound global model (no inversion, plain steps: see :meth:`_Hardening.sound`)."""
SOUND_CHECK_IMAGES = 64
"""Images of the client's data forwarded in eval mode to check the global model before inverting on it."""
REFINE_LAM = 1e-2
"""λ of the second batch of a pair after the first succeeded (spec §2)."""


@register("algorithm", "flip")
class Flip(FedAvg):
    """FedAvg whose benign clients train by FLIP's trigger-inversion hardening (spec flip.md §2)."""

    name = "flip"
    declarative = False
    train_options = frozenset()

    class Params(FedAvg.Params):
        invert: bool = Field(True, description="harden by trigger inversion (false: a plain FedAvg client "
                                               "with the configured optimizer)")
        harden_lr: float = Field(0.01, gt=0.0, description="Adam lr of the model while hardening "
                                                           "(FLIP: 0.01 MNIST/FMNIST, 0.001 CIFAR)")
        warmup_lr: float | None = Field(None, gt=0.0, description="Adam lr of the warm-up batches (default: "
                                                                  "harden_lr, as FLIP; fedtrust extension)")
        max_steps: int = Field(110, ge=1, description="most batches per round, warm-up included (10 + 100)")
        warmup_steps: int = Field(400, ge=0, description="inversion steps of each warm-up trigger")
        pair_steps: int = Field(200, ge=0, description="inversion steps on a pair's first batch (and on its "
                                                       "second after a failure)")
        refine_steps: int = Field(50, ge=0, description="inversion steps on a pair's second batch after the "
                                                        "first succeeded (at λ = 1e-2)")
        portion: float = Field(0.5, ge=0.0, le=1.0, description="fraction of the source images stamped in "
                                                                "pair hardening")
        warmup_portion: float = Field(0.5, ge=0.0, le=1.0, description="fraction of the non-target images "
                                                                       "stamped in warm-up")
        tau_inv: float = Field(0.9, gt=0.0, le=1.0, description="attack accuracy an inversion must reach (τ_inv)")
        random_pair_prob: float = Field(0.3, ge=0.0, le=1.0, description="probability of a random pair "
                                                                         "instead of mat_diff's argmax")
        max_mask_frac: float = Field(0.125, gt=0.0, le=1.0, description="skip rule: no step on a batch whose "
                                                                        "trigger's L1 exceeds this fraction of "
                                                                        "H·W (FLIP: 1/8)")
        keep_cache: bool = Field(True, description="keep each pair's last trigger across the client's visits and "
                                                   "warm-start from it (FLIP); false: the cache warm-starts "
                                                   "only within a visit, so a pair's first inversion of a "
                                                   "round starts at random (fedtrust option, module docstring)")

    # ---------------------------------------------------------------- client

    def local_training(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining:
        """FedAvg's plan: the client with ``invert=false``, and attackers that bring their own training."""
        return super().local_training(message, client_state, ctx)

    def client_update(self, message: Message, data: ImageSet, client_state: Message,
                      ctx: ClientContext) -> tuple[Message, Message]:
        """Harden the global model on ``data`` (module docstring); FedAvg's client with ``invert=false``."""
        program = self.client_program(message, data, client_state, ctx)
        if program is None:
            return super().client_update(message, data, client_state, ctx)
        return run_program(program)

    def client_program(self, message: Message, data: ImageSet, client_state: Message,
                       ctx: ClientContext) -> ClientProgram | None:
        """The hardening as a program whose inversions the vectorised executor batches across clients
        (:mod:`fedtrust.fl.programs`); None with ``invert=false`` (FedAvg's declarative client)."""
        if not self.params.invert:
            return None
        return self._harden(message, data, client_state, ctx)

    def _harden(self, message: Message, data: ImageSet, client_state: Message,
                ctx: ClientContext) -> ClientProgram:
        p, sched, k = self.params, self.ctx.schedule, self.ctx.num_classes
        # the global RNG leaves every client as a function of (seed, round, client), as after train_locally,
        # so a checkpoint's RNG state is the same after a resume (nothing drawn from ctx.generator for it)
        seed_global_rngs(ctx.generator.initial_seed())
        model = copy.deepcopy(self.template)  # its own copy: programs of several clients interleave
        load_state(model, message.prefixed("model"), self.ctx.device)
        model.train()
        for q in model.parameters():
            q.requires_grad_(True)
        opt = torch.optim.Adam(model.parameters(), lr=p.harden_lr, betas=(0.5, 0.9))
        batches = local_batches(len(data), sched.batch_size, sched.epochs, sched.steps, ctx.generator,
                                sched.drop_last)[:p.max_steps]
        st = _State.load(client_state, k, data.x.device)
        if not p.keep_cache:  # the stored triggers stay for the report's masks, but start nothing
            st.cache.clear()
        run = _Hardening(self, model, opt, data, ctx, st)
        if not run.sound():
            run.plain(batches)  # no inversion on a model whose eval-mode logits are not finite
        else:
            if not st.seen and batches:
                batches = yield from run.warmup(batches)
            yield from run.pairs(batches)
            st.seen = True
        result = TrainResult(state={n: v.detach().to("cpu", copy=True) for n, v in model.state_dict().items()},
                             num_examples=len(data), steps=run.steps, mean_loss=run.mean_loss())
        reply, _ = self.finish(message, result, client_state, ctx)
        reply.meta.update(run.counts)
        return reply, st.save(client_state)

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> tuple[Message, dict[str, Any]]:
        """FedAvg's aggregate, plus the round's hardening counts summed over the replies (``flip`` metrics)."""
        new, metrics = super().aggregate(state, replies, round)
        keys = ("steps", *COUNTS)
        sums = {k: sum(int(r.meta.get(k, 0)) for r in replies.values()) for k in keys}
        if any(sums[k] for k in COUNTS):
            metrics = {**metrics, "flip": sums}
        self._warn_if_all_skipped(replies)
        return new, metrics

    def _warn_if_all_skipped(self, replies: dict[int, Message]) -> None:
        """Warn when no hardening client of a round took a step because the skip rule refused
        every batch: they reply null updates, FLIP is off in all but name (session 29: MNIST inversions of 30
        steps left every mask at 150–250 px, above H·W/8 = 98). Attackers (no FLIP counts) are left out."""
        hardened = [r.meta for r in replies.values() if "flip_skipped" in r.meta]
        if hardened and all(int(m.get("steps", 0)) == 0 and int(m["flip_skipped"]) > 0 for m in hardened):
            warnings.warn(
                f"FLIP skipped every hardening batch of a round's {len(hardened)} benign client(s): each inverted "
                f"mask was larger than algorithm.max_mask_frac = {self.params.max_mask_frac:g} of the image, so "
                "they sent null updates; give the inversions more steps (algorithm.warmup_steps, pair_steps) or "
                "raise max_mask_frac (round metrics: flip.flip_skipped)", RuntimeWarning, stacklevel=2)

    def normalize01(self, x01: Tensor) -> Tensor:
        """The model's input for [0, 1] pixels: ``ctx.normalize`` of ``255·x`` (it divides by 255)."""
        return self.ctx.normalize(x01 * 255.0)


class _State:
    """FLIP's per-client state (spec §2 ``local_mat``), kept under ``flip/`` in the client state."""

    def __init__(self, mat_diff: Tensor, l1: Tensor, seen: bool, cache: dict[tuple[int, int], Raw]) -> None:
        self.mat_diff, self.l1, self.seen, self.cache = mat_diff, l1, seen, cache

    @classmethod
    def load(cls, client_state: Message, k: int, device: torch.device) -> "_State":
        """The state kept in ``client_state`` (on the CPU, as the executor keeps it), on ``device``."""
        own = {key: v.to(device) for key, v in client_state.prefixed(PREFIX).items()}
        if "mat_diff" not in own:
            z = torch.zeros(k, k, dtype=torch.float64, device=device)
            return cls(z, z.clone(), False, {})
        cache: dict[tuple[int, int], Raw] = {}
        for key in own:
            if key.startswith("cache/") and key.endswith("/a"):
                s, t = map(int, key.split("/")[1].split("_"))
                cache[(s, t)] = (own[key], own[key[:-1] + "b"])
        return cls(own["mat_diff"].clone(), own["l1"].clone(), bool(own["seen"]), cache)

    def save(self, client_state: Message) -> Message:
        rest = {k: v for k, v in client_state.arrays.items() if not k.startswith(PREFIX + "/")}
        mine = {"mat_diff": self.mat_diff, "l1": self.l1, "seen": torch.tensor(self.seen)}
        for (s, t), (a, b) in sorted(self.cache.items()):
            mine[f"cache/{s}_{t}/a"], mine[f"cache/{s}_{t}/b"] = a.detach().clone(), b.detach().clone()
        return Message(rest | {f"{PREFIX}/{k}": v for k, v in mine.items()}, dict(client_state.meta))


class _Hardening:
    """One client's hardening run: the batches, the inversions, the Adam steps (spec §2)."""

    def __init__(self, algo: Flip, model: torch.nn.Module, opt: torch.optim.Optimizer, data: ImageSet,
                 ctx: ClientContext, st: _State) -> None:
        self.algo, self.p, self.model, self.opt, self.ctx, self.st = algo, algo.params, model, opt, ctx, st
        self.x01 = data.x.to(torch.get_default_dtype()) / 255.0
        self.y = data.y
        self.k = algo.ctx.num_classes
        self.max_l1 = data.x.shape[-2] * data.x.shape[-1] * self.p.max_mask_frac  # skip rule (FLIP: H·W/8)
        self.inv = InversionParams(tau_inv=self.p.tau_inv)
        self.dropout = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in model.modules())
        self.losses: list[Tensor] = []
        self.steps = 0
        self.counts = dict.fromkeys(COUNTS, 0)

    def job(self, images: Tensor, group: Tensor, targets: list[int], steps: int, lam0: float,
            inits: list[Raw | None]) -> InversionJob:
        """An inversion of ``len(targets)`` triggers on the current model (trigger i stamps the images of
        ``group`` i and aims at ``targets[i]``), for the program's driver to solve."""
        group = group.to(images.device)
        weights = {n: v.detach().clone() for n, v in [*self.model.named_parameters(), *self.model.named_buffers()]}
        return InversionJob(self.algo.template, weights, images, group,
                            torch.tensor(targets, device=images.device)[group], len(targets), steps,
                            self.ctx.generator, lam0, inits, self.algo.normalize01, self.inv)

    def step(self, x01: Tensor, y: Tensor) -> None:
        """One Adam step, CE on the true labels over the whole (stamped) batch.

        A model with dropout draws it from the global RNG, seeded here from the client's generator: programs
        of several clients interleave, so the global RNG's state must not carry from one client to another."""
        self.model.train()
        if self.dropout:
            seed_global_rngs(int(torch.randint(0, 2**62, (1,), generator=self.ctx.generator)))
        loss = F.cross_entropy(self.model(self.algo.normalize01(x01.clamp(0, 1))), y)
        if not torch.isfinite(loss):  # a NaN step would make the whole reply non-finite (and rejected)
            self.counts["flip_skipped"] += 1
            return
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.losses.append(loss.detach())
        self.steps += 1

    def sound(self) -> bool:
        """Whether the received model's eval-mode logits on (up to) 64 of the client's images are finite.

        A model-replacement attack scales every entry of its update by γ (spec §1), BN running variances
        included: the replaced global model can hold negative variances, and its eval-mode forward (the one
        every inversion runs) is then NaN. Inverting on it yields NaN triggers whose patterns poison the
        stamped images (0·NaN = NaN) and, cached, every later visit of the client; the replies are rejected
        as non-finite and the server keeps the broken model for ever (the backdoor benchmark's single-shot
        DBA, seed 1). An unsound model is instead trained by plain steps (:meth:`plain`): train-mode BN uses
        batch statistics and the running ones recover, and the next round inverts again."""
        x = self.x01[:SOUND_CHECK_IMAGES]
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            ok = bool(torch.isfinite(self.model(self.algo.normalize01(x))).all())
        self.model.train(was)
        return ok

    def plain(self, batches: list[Tensor]) -> None:
        """Hardening's Adam steps on the clean batches, true labels, nothing stamped (an unsound model)."""
        self.counts["flip_unsound"] += 1
        for idx in batches:
            self.step(self.x01[idx], self.y[idx])

    def mean_loss(self) -> float:
        return float(torch.stack(self.losses).mean()) if self.losses else float("nan")

    # ---- phase A
    def warmup(self, batches: list[Tensor]) -> Generator[InversionJob, list[Trigger], list[Tensor]]:
        """Batches 0..K−1 with targets t = 0..K−1; returns the batches left for phase B.

        Their Adam steps take ``warmup_lr`` when it is set (``harden_lr`` again from phase B on, same
        optimizer state): a fedtrust extension for server lr 1, where every client's first selection sends its
        whole warm-up displacement into the global model instead of FLIP's η = 0.1 share of it."""
        self.set_lr(self.p.warmup_lr if self.p.warmup_lr is not None else self.p.harden_lr)
        perm = torch.randperm(len(self.y), generator=self.ctx.generator).to(self.y.device)
        ys = self.y[perm]
        first = {int(c): int(perm[(ys == c).nonzero()[0, 0]]) for c in torch.unique(ys)}
        dist = torch.zeros(self.k, dtype=torch.float64, device=self.st.mat_diff.device)
        done = min(self.k, len(batches))
        for t, idx in enumerate(batches[:done]):
            ex = [i for c, i in sorted(first.items()) if c != t]
            if not ex:
                continue
            images = self.x01[ex]
            (trig,) = yield self.job(images, torch.zeros(len(ex), dtype=torch.int64), [t], self.p.warmup_steps,
                                     1e-3, [None])
            self.counts["flip_warmup"] += 1
            dist[t] = trig.l1
            if trig.l1 > self.max_l1:  # skip rule, here too (module docstring)
                self.counts["flip_skipped"] += 1
                continue
            x, y = self.x01[idx].clone(), self.y[idx]
            others = (y != t).nonzero().flatten()
            chosen = others[:int(self.p.warmup_portion * len(others))]
            x[chosen] = trig.stamp(x[chosen])
            self.step(x, y)
        mat = dist.expand(self.k, self.k).clone()
        mat.fill_diagonal_(0)
        self.st.l1 = mat.clone()
        top = mat.max()
        self.st.mat_diff = mat / top if top > 0 else mat
        self.set_lr(self.p.harden_lr)
        return batches[done:]

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    # ---- phase B
    def pick(self, counts: Tensor, prev: int | None) -> tuple[int, int] | None:
        """A new pair (source, target) for a batch with class ``counts``, or None if no source fits."""
        g = self.ctx.generator
        if float(torch.rand((), generator=g)) < self.p.random_pair_prob:
            sources = (counts > 1).nonzero().flatten().tolist()
            if sources:
                s = sources[int(torch.randint(len(sources), (), generator=g))]
                t = int(torch.randint(self.k - 1, (), generator=g))
                return s, t + (t >= s)
        score = self.st.mat_diff.clone()
        score.fill_diagonal_(-math.inf)
        valid = counts > 0
        if prev is not None:
            valid[prev] = False
        score[~valid.to(score.device)] = -math.inf
        if not torch.isfinite(score).any():
            return None
        flat = int(score.flatten().argmax())
        return flat // self.k, flat % self.k

    def pairs(self, batches: list[Tensor]) -> Generator[InversionJob, list[Trigger], None]:
        pair, used, prev, ok_first = None, 0, None, False
        for idx in batches:
            y = self.y[idx]
            counts = torch.bincount(y, minlength=self.k).cpu()
            if pair is None or used == 2:
                pair, used = self.pick(counts, prev), 0
                if pair is None:
                    self.counts["flip_skipped"] += 1
                    continue
                prev = pair[0]
                self.counts["flip_pairs"] += 1
            s, t = pair
            used += 1
            if counts[s] == 0:  # a batch without the source is not trained on (the pair's 2nd batch)
                self.counts["flip_skipped"] += 1
                continue
            steps, lam = ((self.p.refine_steps, REFINE_LAM) if used == 2 and ok_first
                          else (self.p.pair_steps, 1e-3))
            reached = yield from self.harden(idx, s, t, counts, steps, lam)
            ok_first = reached if used == 1 else ok_first

    def harden(self, idx: Tensor, s: int, t: int, counts: Tensor, steps: int,
               lam: float) -> Generator[InversionJob, list[Trigger], bool]:
        """Invert the pair on this batch, update the pair's state, stamp and step; whether all reached τ_inv."""
        x, y = self.x01[idx].clone(), self.y[idx]
        src, tgt = (y == s).nonzero().flatten(), (y == t).nonzero().flatten()
        if counts[t] > 0:  # symmetric: s→t on the source images, t→s on the target's (FLIP's TriggerCombo)
            group = torch.cat([torch.zeros(len(src), dtype=torch.int64), torch.ones(len(tgt), dtype=torch.int64)])
            st_, ts_ = yield self.job(torch.cat([x[src], x[tgt]]), group, [t, s], steps, lam,
                                      [self.st.cache.get((s, t)), self.st.cache.get((t, s))])
            n = int(self.p.portion * min(len(src), len(tgt)))
            plan = [((s, t), st_, src[:n]), ((t, s), ts_, tgt[:n])]
        else:
            (trig,) = yield self.job(x[src], torch.zeros(len(src), dtype=torch.int64), [t], steps, lam,
                                     [self.st.cache.get((s, t))])
            plan = [((s, t), trig, src[:int(self.p.portion * len(src))])]
        for key, trig, chosen in plan:
            self.record(key, trig)
            x[chosen] = trig.stamp(x[chosen])
        if any(trig.l1 > self.max_l1 for _, trig, _ in plan):  # skip rule: trigger too large
            self.counts["flip_skipped"] += 1
        else:
            self.step(x, y)
        return all(trig.reached for _, trig, _ in plan)

    def record(self, key: tuple[int, int], trig: Trigger) -> None:
        """Cache the pair's raw variables (not non-finite ones: they would poison every later warm start);
        move ``mat_diff`` by the relative growth of its mask L1."""
        if all(bool(torch.isfinite(r).all()) for r in trig.raw):
            self.st.cache[key] = trig.raw
        else:
            self.st.cache.pop(key, None)
        if not trig.reached:
            return
        old = float(self.st.l1[key])
        growth = (trig.l1 - old) / old if old > 0 else 0.0
        self.st.mat_diff[key] = (self.st.mat_diff[key] + growth) / 2
        self.st.l1[key] = trig.l1


def flip_state(client_state: Message) -> dict[str, Any]:
    """FLIP's part of a client state, prefix stripped (for inspection and tests)."""
    return client_state.prefixed(PREFIX)
