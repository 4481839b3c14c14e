"""Backdoor benchmark (issue 15): FLIP and eight robust aggregators against DBA and Neurotoxin backdoors.

Every defense × {no attack, single-shot scaled DBA, continuous DBA, continuous Neurotoxin} on digits, MNIST and
Fashion-MNIST.

Reproduce (from the repository root; the exact command of a results file is in its header):

    python benchmarks/backdoor.py --seeds 0,1,2 --jobs 2

Smoke test (not the benchmark: 5 attack rounds, a few inversion steps, four defenses, seed 0):

    python benchmarks/backdoor.py --quick --jobs 1

Per (data set, seed), three phases of runs (``runpool.run_jobs``; a phase starts when the one before is done):

1. **Pre-training**: FedAvg from scratch (digits: ``configs/fedavg-digits.yaml rounds=20``, as the FLIP presets
   say), its final checkpoint kept; every attack run of that seed starts from it (``init_from``).
2. **Calibration** (first seed only): the no-attack run with ``norm_clipping`` at clip 1e9 (clips nothing), whose
   ``aggregator/model`` metrics hold every client's update norm; norm clipping's bound comes from it.
3. **Attack runs**: the data set's FLIP preset (``configs/flip-<data>-single.yaml`` or ``-continuous.yaml``) with
   the defense's and the attack's overrides (no new YAML).

Attacks (4 attackers, clients 1, 5, 9, 13, each stamping its 1×2 DBA piece, target 2; spec flip.md §1):

- no attack: the continuous preset with ``attack.rounds=[]`` (the attackers never attack; the ASR of the clean
  model, its natural misclassification to 2, is still measured);
- single-shot scaled DBA: the single preset (one attacker in each of rounds 2, 4, 6, 8, forced into its round,
  its update scaled by γ = n/η = 10, model replacement); ``attack.force=true`` is repeated here for presets
  written without it (a scheduled attacker not forced in attacks only when the sampler happens to pick it);
- continuous DBA: the continuous preset (all 4 attackers forced into every round: 4 of the 10 replies);
- continuous Neurotoxin: the continuous preset plus ``attack.neurotoxin=0.05``: the attackers' gradient leaves
  alone the 5 % of coordinates the global model moved most since their last visit (Zhang et al., ICML 2022;
  the authors' ``--gradmask_ratio 0.95``).

Defenses (rows). The non-FLIP ones run the FLIP preset with ``algorithm.invert=false``: FLIP off is FedAvg bit
for bit (tests/algorithms/test_flip.py::test_invert_false_reproduces_fedavg_exactly) with the configured
aggregator, so every row of a table comes from the same config file and differs only in the keys named here.
``algorithm.name=fedavg`` is not possible on the presets: their ``algorithm`` section carries FLIP's keys
(``max_mask_frac``, ``warmup_steps``, ...), which FedAvg's params reject (extra keys are errors), so it would
need a second, FLIP-free copy of every preset. Aggregator parameters are sized for the continuous attacks, 4
attackers among the n = 10 replies of a round, and kept for the other attacks (what a defense ready for them
costs when they do not come):

- none: the mean (FedAvg);
- ``norm_clipping`` (Sun et al. 2019, "weak DP"): clip M = the 90th percentile of the clean calibration run's
  client update norms (digits, seed 0: 3.8; quantiles 10/50/90 %: 1.2 / 2.0 / 3.8; the continuous attackers'
  unscaled updates have median 1.6, so only the scaled single-shot update, norm ≈ 33, is clipped); noise
  σ = 0.81·M/√d (d: the model's floating entries, digits 94,634), i.e. a noise norm σ√d of 0.81·M. The ratio
  comes from digits: σ = 0.01 was the largest of 0.001, 0.003, 0.01, 0.025 that kept the clean final accuracy
  within about 1 point (0.978 at each of the first three; 0.958 at 0.025, Sun et al.'s EMNIST value, with dips
  to 0.41 on the way);
- ``multikrum``: f = 3 (``defense.num_byzantine=3``: Krum needs n > 2f + 2, so 3 is the most it allows at
  n = 10, one short of the 4 attackers), averaging m = 6 = n − 4 (``defense.m=6``, the honest count);
- ``median``: coordinate-wise, no parameters;
- ``trimmed_mean``: k = 4 from each side (``defense.beta=4``, a count), the 2 middle values kept;
- ``fltrust``: a 100-sample root set (``defense.root_size=100``, held out of the clients' data);
- ``foolsgold``: κ = 1 (default);
- ``rlr``: θ = 5 (``defense.threshold=5``, a count), inside [f + 1, n − f] = [5, 6] for f = 4 (the sign sum of
  10 non-zero signs is even, so 5 and 6 act alike); the default 0.4·n = 4 lets the 4 attackers alone pass;
- ``flame``: λ = 0.001 (default), HDBSCAN min cluster size 6;
- FLIP: the preset as it is (``algorithm.name=flip``), read twice: without rejection (``asr``, ``test_acc``:
  FLIP with τ = 0) and with τ = 0.4 (``asr_tau``, ``acc_tau``). τ only changes evaluation
  (``eval.reject_tau`` is read by the backdoor evaluator alone), so every run evaluates with
  ``eval.reject_tau=0.4`` and the two FLIP rows share one run; the same τ-reading of the other defenses is the
  control column "final ASR, τ 0.4" (what rejection alone does without FLIP's hardening).
- ``flip_gentle`` (not in the default list): FLIP with its hardening Adam lr times ``GENTLE`` = 0.1 (MNIST:
  0.001 for the preset's 0.01). The scaled-down MNIST runs use server lr η = 1 where FLIP's server has 0.1, so
  the benign clients' Adam steps reach the global model 10× as hard as in the paper (the round-1 dip of clean
  accuracy, session 28); ×0.1 restores the paper's step on the global model for the benign clients while the
  attackers keep η = 1. A side study runs it under its own results name, so the main table stays:
  ``--results backdoor_mnist_long`` writes ``results/backdoor_mnist_long.md`` with runs under
  ``runs/bench-backdoor_mnist_long`` and its analysis from ``benchmarks/backdoor_mnist_long_analysis.md``.
- ``flip_warm`` (not in the default list): FLIP with only its warm-up's Adam lr times ``GENTLE``
  (``algorithm.warmup_lr``; the pair hardening keeps the preset's lr): ``flip_gentle`` softened the first
  selections' dip and the defense with it (session 29), this softens the warm-up alone.

Metrics (``metrics.jsonl`` rows with ``test_acc``), mean ± std over seeds, in %: clean accuracy (final round;
``acc_tau`` for FLIP + τ), peak ASR (largest over the evaluated rounds), final ASR, lifespan and seconds per
round. Lifespan is :func:`fedtrust.metrics.backdoor.lifespan`: rounds after the last attack round until the ASR
falls below twice its pre-attack level. GUESS (pre-attack level): the median ASR of the same defense's no-attack
run of the same seed (same τ reading), floored at 2.5 % (``LIFESPAN_FLOOR``): the clean digits models' ASR is 0,
and twice 0 is a bar no ASR goes under. For the continuous attacks the last attack round is the last round, so
their lifespan is 0 (the backdoor is out at the end) or "> 0" (it outlives the run); "> L" means it never fell
within the L rounds that followed. Seconds per round: median of the per-round durations (``time_s`` is
cumulative), rounds 2 … R − 1, over the rounds without an evaluation where there are any (MNIST, FMNIST) and
including it otherwise (digits evaluates every round, ≈ 0.02 s).

Speed (last section): one inversion (Neural Cleanse, K = 2 triggers as FLIP's symmetric pairs, 8 source + 8
target images, 50 Adam steps) on each of 6 clients' models of one architecture, as the vectorised executor runs
them (``InversionJob.solve_batch`` with the 6 jobs: one ``vmap``-ed step) and as the per-client loop does
(``solve_batch`` with one job at a time); digits ``cnn`` (8×8), MNIST ``cnn`` (28×28) and ``lenet`` where
registered; ``torch.set_num_threads`` 1 and 2, median of 3 repeats after an untimed warm-up. GUESS: random
[0, 1] images and freshly initialised models (the step count is fixed, so content does not change the cost).
Plus FLIP's seconds per round against FedAvg's (the "none" row) from the runs.

Data sets:

- digits: the presets as they are (20 clients, Dirichlet 0.5, 10 per round, 16 attack rounds after 20 FedAvg
  rounds, model ``cnn``), evaluation every round (for the ASR-per-round plots).
- MNIST and Fashion-MNIST: the presets ``configs/flip-mnist-{single,continuous}.yaml`` and
  ``configs/flip-fmnist-{single,continuous}.yaml`` (their data and model sections also set up the FedAvg
  pre-training, ``configs/fedavg-mnist.yaml`` with them laid over), data from ../shared/data. A data set whose
  presets or data are absent is skipped with a printed note. Scaled down for 2 CPU cores (GUESS: sized from the
  per-step costs below, not from runs, as the presets did not exist when this was written): pre-training 10
  rounds of 10 local steps; 8 attack rounds (single-shot: at least 4 after its last scheduled attack; FLIP:
  100 MNIST rounds); benign FedAvg clients 5 local steps (``train.steps=5``; the attackers keep the preset's
  epochs); FLIP's hardening 5 batches a round (``train.steps``, below ``algorithm.max_steps`` = 10; FLIP 110)
  with 100 / 100 / 25 inversion steps (warm-up / pair / refine, ``--flip-steps-mnist``; FLIP 400 / 200 / 50);
  evaluation every 2 rounds, batch 500; server
  lr η = 1 (``defense.server_lr=1``; FLIP's 0.1 kept the uniform mean): at η = 0.1 eight rounds move neither
  the model nor the backdoor (session 28, continuous DBA, 3 seeds: FedAvg's final ASR 2.2 ± 0.5 % at 87.8 %
  clean accuracy, every defense alike), while at η = 1 FedAvg's ASR reaches 98.8 % by round 8 (seed 0).
  MNIST_STEPS (session 29): FLIP starts a mask at m ≈ 0.5 everywhere (L1 ≈ 392 px of 784) and a trigger
  reaches τ_inv long before it is small, so the step count decides whether a trigger gets under the skip size
  H·W/8 = 98 px. Measured on the seed-0 pre-trained lenet (89 % clean), warm-up trigger of 9 exemplars to
  target 2 / 7: 150 / 249 px after 30 steps, 45 / 84 after 100, 42 / 81 after 200, 41 / 81 after 400. With
  session 28's 30 / 15 / 5 every hardening batch was skipped (``flip_skipped`` = all 50 of a round, 0 Adam
  steps): FLIP's benign clients sent null updates and the MNIST FLIP rows of results/backdoor.md (measured
  with ``--flip-steps-mnist 30,15,5``) are the attackers' updates averaged with zeros, not FLIP.

Measured on this machine (2 cores shared with other work at load 3–5; one torch thread per run; seed 0, the
runs' own wall time): digits pre-training 8 s; a non-FLIP attack run (16 rounds of 4 local epochs, evaluation
every round) 19–20 s at load 3 (mean, FoolsGold, FLAME, FLTrust alike) and 30–37 s at load 4–5; FLIP 310 s under
the continuous attacks (6 benign clients harden each round) and 466 s without attack (10; the single-shot runs
have 9–10), with the sequential executor. The vectorised executor took 450 s for the continuous FLIP run at the
same CPU time (user 5 min 8 s against 4 min 56 s sequential), so every run uses ``executor=sequential``: at one
thread the vmapped inversion step is no faster (6 clients' K = 2 jobs of 16 images: ≈ 35–60 ms on digits
``cnn``, ≈ 180–280 ms on MNIST ``cnn``, loop and vmap alike). Full digits grid, 3 seeds: 3 pre-trainings +
1 calibration (< 1 min) + 9 non-FLIP defenses × 4 attacks × 3 seeds (108 runs × 19–37 s ≈ 35–65 min) + FLIP
× 4 attacks × 3 seeds (3 × (2 × 466 + 2 × 310) s ≈ 78 min) ≈ 2–2.5 h of run time, ≈ 1–1.25 h of wall time with
``--jobs 2`` on 2 otherwise idle cores (more on a busy one), plus ≈ 3 min for the speed section (idle machine).

Results: ``benchmarks/results/backdoor.md`` (one table and one ASR-per-round PNG per data set and attack, the
FLIP-vs-FedAvg cost and the inversion speed, then ``benchmarks/backdoor_analysis.md``, written by a person from
the results); runs under ``--work``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runpool import (benchmark_parser, Job, machine_note, md_table, mean_std, REPO, RESULTS, run_header, run_jobs,
                     SHARED_DATA, shared_data_available, with_analysis, write_results)

TAU = 0.4  # FLIP's rejection threshold in its continuous runs (spec flip.md §3); every run evaluates with it
LIFESPAN_FLOOR = 0.025  # pre-attack ASR level used when the clean run's is lower (module docstring)
NEUROTOXIN_TOP = 0.05  # fraction of coordinates the Neurotoxin attacker leaves alone
ROOT_SIZE = 100  # FLTrust's root data set, held out of the training set
CLIP_QUANTILE = 0.9  # norm clipping's M: this quantile of the clean calibration run's update norms
GENTLE = 0.1  # flip_gentle: the preset's algorithm.harden_lr times this (flip_warm: its warm-up lr)
NOISE_RATIO = 0.81  # norm clipping's noise: σ·√d = NOISE_RATIO · M (digits: σ = 0.01 at M = 3.8, d = 94,634)
RUNS_PER_PROCESS = 4
COMMON = ("checkpoint_every=0", "executor=sequential", "eval.personalized=false", f"eval.reject_tau={TAU}")

# ---------------------------------------------------------------- defenses and attacks

FEDAVG = "algorithm.invert=false"  # FLIP off: FedAvg with the configured aggregator
RUNS: dict[str, tuple[str, ...]] = {
    "fedavg": (FEDAVG,),
    "norm_clipping": (FEDAVG, "defense.aggregator=norm_clipping"),  # + clip and noise from the calibration
    "multikrum": (FEDAVG, "defense.aggregator=multikrum", "defense.num_byzantine=3", "defense.m=6"),
    "median": (FEDAVG, "defense.aggregator=median"),
    "trimmed_mean": (FEDAVG, "defense.aggregator=trimmed_mean", "defense.beta=4"),
    "fltrust": (FEDAVG, "defense.aggregator=fltrust", f"defense.root_size={ROOT_SIZE}"),
    "foolsgold": (FEDAVG, "defense.aggregator=foolsgold"),
    "rlr": (FEDAVG, "defense.aggregator=rlr", "defense.threshold=5"),
    "flame": (FEDAVG, "defense.aggregator=flame"),
    "flip": (),  # the preset: algorithm.name=flip, invert=true, the mean
    "flip_gentle": (),  # the preset with its hardening lr × GENTLE (set in plan_for from the preset's value)
    "flip_warm": (),  # the preset with its warm-up lr = hardening lr × GENTLE (set in plan_for)
}
"""Run key (``--defenses``) → its overrides on the preset."""


@dataclass(frozen=True)
class Row:
    """A row of the tables: which run it reads, and whether with τ-rejection (``asr_tau``, ``acc_tau``)."""

    label: str
    run: str
    tau: bool = False


ROWS = (Row("none (FedAvg)", "fedavg"), Row("norm clipping + weak DP", "norm_clipping"),
        Row("Multi-Krum", "multikrum"), Row("median", "median"), Row("trimmed mean", "trimmed_mean"),
        Row("FLTrust", "fltrust"), Row("FoolsGold", "foolsgold"), Row("RLR", "rlr"), Row("FLAME", "flame"),
        Row("FLIP (τ = 0)", "flip"), Row(f"FLIP + τ {TAU}", "flip", tau=True),
        Row(f"FLIP, hardening lr × {GENTLE:g} (τ = 0)", "flip_gentle"),
        Row(f"FLIP, hardening lr × {GENTLE:g} + τ {TAU}", "flip_gentle", tau=True),
        Row(f"FLIP, warm-up lr × {GENTLE:g} (τ = 0)", "flip_warm"),
        Row(f"FLIP, warm-up lr × {GENTLE:g} + τ {TAU}", "flip_warm", tau=True))


@dataclass(frozen=True)
class Attack:
    title: str
    preset: str  # "single" or "continuous"
    overrides: tuple[str, ...] = ()


ATTACKS = {
    "none": Attack("no attack", "continuous", ("attack.rounds=[]",)),
    "single": Attack("single-shot scaled DBA", "single", ("attack.force=true",)),
    "dba": Attack("continuous DBA", "continuous"),
    "neurotoxin": Attack("continuous Neurotoxin", "continuous", (f"attack.neurotoxin={NEUROTOXIN_TOP}",)),
}

# ---------------------------------------------------------------- data sets


@dataclass(frozen=True)
class Setting:
    name: str
    title: str
    presets: dict[str, str]  # "single" / "continuous" → preset file in configs/
    pretrain: str  # FedAvg config of the pre-training; the continuous preset's data and model are laid over it
    pretrain_rounds: int
    folder: str | None  # ../shared/data/<folder> (None: bundled with fedtrust)
    pretrain_overrides: tuple[str, ...]
    overrides: tuple[str, ...]  # every attack run: the scale-down
    single_tail: int  # single-shot: at least this many rounds after the last scheduled attack
    single_overrides: tuple[str, ...] = ()
    description: str = ""


def _scaled(rounds: int, steps: tuple[int, int, int]) -> tuple[str, ...]:
    warmup, pair, refine = steps
    return (f"rounds={rounds}", "defense.server_lr=1", "train.steps=5", "algorithm.max_steps=10",
            f"algorithm.warmup_steps={warmup}", f"algorithm.pair_steps={pair}", f"algorithm.refine_steps={refine}",
            "eval.every=2", "eval.batch_size=500")


def settings(quick: bool, rounds_mnist: int, steps_mnist: tuple[int, int, int],
             mnist_set: Sequence[str] = ()) -> dict[str, Setting]:
    quick_digits = ("rounds=5", "train.epochs=1", "algorithm.max_steps=6", "algorithm.warmup_steps=20",
                    "algorithm.pair_steps=10", "algorithm.refine_steps=5")
    digits = Setting(
        name="digits", title="digits (20 clients, Dirichlet 0.5)",
        presets={"single": "flip-digits-single.yaml", "continuous": "flip-digits-continuous.yaml"},
        pretrain="fedavg-digits.yaml", pretrain_rounds=5 if quick else 20, folder=None, pretrain_overrides=(),
        overrides=("eval.every=1", *(quick_digits if quick else ())), single_tail=2 if quick else 8,
        single_overrides=("attack.schedule={2: [1], 3: [5]}",) if quick else (),
        description="sklearn digits 8×8, 20 clients, Dirichlet 0.5, 10 per round, model `cnn` (width 32, BN); "
        f"FedAvg pre-trained {5 if quick else 20} rounds (1 local epoch, cosine); {5 if quick else 16} attack "
        f"rounds of {1 if quick else 4} local epoch(s) of batch 16 (SGD lr 0.05, momentum 0.9), attackers 2 "
        f"epochs; FLIP: {'20 / 10 / 5' if quick else '100 / 50 / 20'} inversion steps, hardening Adam lr 0.02, "
        "skip rule at H·W/2 (the presets' comments give the reasons); evaluation every round")
    quick_mnist = ("algorithm.max_steps=3", "algorithm.warmup_steps=5", "algorithm.pair_steps=5",
                   "algorithm.refine_steps=2")
    # The paper attacks from round 10 on MNIST and from round 200 on Fashion-MNIST (spec §1): 10 rounds of
    # 10 local steps leave Fashion-MNIST at 61-68 % (session 30), where a weak model's natural flips to the target
    # look like a backdoor (no-attack ASR spikes of 9-46 %); 200 rounds reach 87.2 % (seed 0, 2.6 min).
    pre_rounds = {"mnist": 2 if quick else 10, "fmnist": 2 if quick else 200}

    harden = ("3 hardening batches a round with 5 / 5 / 2" if quick else
              f"5 hardening batches a round (train.steps; max_steps 10 does not bind) with "
              f"{' / '.join(map(str, steps_mnist))}")

    def mnist_like(name: str, title: str, tag: str, folder: str) -> Setting:
        pre = pre_rounds[name]
        return Setting(
            name=name, title=title,
            presets={"single": f"flip-{tag}-single.yaml", "continuous": f"flip-{tag}-continuous.yaml"},
            pretrain="fedavg-mnist.yaml", pretrain_rounds=pre, folder=folder,
            pretrain_overrides=("train.steps=10",),
            overrides=(*_scaled(rounds_mnist, steps_mnist), *(quick_mnist if quick else ()), *mnist_set),
            single_tail=2 if quick else 4,
            description=f"{title} from ../shared/data, the presets' clients, partition and model; FedAvg pre-trained "
            f"{pre} rounds of 10 local steps (configs/fedavg-mnist.yaml with the preset's data and model); "
            f"{rounds_mnist} attack rounds (single-shot: at least {2 if quick else 4} after its last scheduled "
            f"attack), benign FedAvg clients 5 local steps, FLIP {harden} inversion steps; server lr 1 "
            "(the presets' 0.1 moves nothing in so few rounds); evaluation every 2 rounds"
            + (f"; then this side study's `{' '.join(mnist_set)}` (last in the overrides, so they win)"
               if mnist_set else ""))

    return {"digits": digits, "mnist": mnist_like("mnist", "MNIST", "mnist", "mnist"),
            "fmnist": mnist_like("fmnist", "Fashion-MNIST", "fmnist", "fashion_mnist")}


SIDE_RUNS = ("flip_gentle", "flip_warm")  # side-study run keys, only when asked for by --defenses
DEFAULTS = {"seeds": "0,1,2", "datasets": "digits,mnist,fmnist",
            "defenses": ",".join(r for r in RUNS if r not in SIDE_RUNS),
            "attacks": ",".join(ATTACKS), "rounds_mnist": 8, "flip_steps_mnist": "100,100,25"}
QUICK = {"seeds": "0", "datasets": "digits", "defenses": "fedavg,norm_clipping,fltrust,flip",
         "attacks": ",".join(ATTACKS), "rounds_mnist": 3, "flip_steps_mnist": "100,100,25"}


def missing(s: Setting) -> str | None:
    """Why a data set cannot run here (its presets or its data are absent), else None."""
    absent = [p for p in s.presets.values() if not (REPO / "configs" / p).is_file()]
    if absent:
        return f"configs/{absent[0]} is absent"
    if s.folder is not None and not shared_data_available(s.folder):
        return f"../shared/data/{s.folder}/train.npz is absent"
    return None


def preset_sections(preset: Path, sections: Sequence[str]) -> list[str]:
    """The preset's ``sections`` as dotted ``key=value`` overrides (values in YAML flow style)."""
    import yaml

    tree = yaml.safe_load(preset.read_text()) or {}

    def flat(prefix: str, node: Any) -> list[str]:
        if isinstance(node, dict) and node:
            return [o for k, v in node.items() for o in flat(f"{prefix}.{k}", v)]
        return [f"{prefix}={yaml.safe_dump(node, default_flow_style=True).strip().removesuffix('...').strip()}"]

    return [o for name in sections if name in tree for o in flat(name, tree[name])]


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """One data set's part of the benchmark: its pre-trainings, calibration and attack runs."""

    setting: Setting
    seeds: list[int]
    pretrain: dict[int, Job]
    calibration: Job
    runs: dict[tuple[str, str, int], Job]  # (attack, run key, seed)
    work: Path

    @property
    def attacks(self) -> list[str]:
        """The attacks this data set runs, in the order given."""
        return list(dict.fromkeys(a for a, _, _ in self.runs))

    def norm_clip(self) -> tuple[float, float]:
        """Norm clipping's (M, σ) from the calibration run (module docstring)."""
        import numpy as np

        norms = [v for row in _rows(self.calibration.out) for v in row["aggregator/model"]["norms"].values()]
        clip = float(f"{float(np.quantile(norms, CLIP_QUANTILE)):.2g}")
        d = model_size(self.pretrain[self.seeds[0]].out)
        return clip, float(f"{NOISE_RATIO * clip / math.sqrt(d):.2g}")


def model_size(run_dir: Path) -> int:
    """d: the floating entries of the model the aggregators see (``model/…`` of the checkpoint's server state)."""
    from fedtrust.runner.checkpoint import CHECKPOINT_NAME, read_checkpoint

    state = read_checkpoint(run_dir / CHECKPOINT_NAME, clients=False, rng=False).state
    return sum(v.numel() for k, v in state.arrays.items() if k.startswith("model/") and v.is_floating_point())


def single_rounds(s: Setting, overrides: list[str]) -> list[str]:
    """The single-shot run's ``rounds`` (at least ``single_tail`` after the last scheduled attack) and
    ``attack.scale=replace``: model replacement's γ = n/η (spec flip.md §1) at the run's own server lr, so the
    scale-down's η = 1 gets γ = 10 whatever number a preset holds. (Session 30: the MNIST-like presets then said
    100, n/η for their η = 0.1, and at η = 1 that moved the model 10 times past the attacker's: FLIP seed 1's
    clean accuracy fell to 8.9 %.)"""
    from fedtrust.runner.config import load_config

    cfg = load_config(REPO / "configs" / s.presets["single"], overrides)
    last = max(cfg.attack.schedule or {0: []})
    out = [f"rounds={max(cfg.rounds, last + s.single_tail)}"] if last + s.single_tail > cfg.rounds else []
    return [*out, "attack.scale=replace"]


def plan_for(s: Setting, seeds: list[int], attacks: list[str], runs: list[str], work: Path) -> Plan:
    cont = REPO / "configs" / s.presets["continuous"]
    root = [f"data.root={SHARED_DATA}"] if s.folder is not None else []
    d = work / s.name
    pretrain = {seed: Job(
        f"{s.name}/pretrain/s{seed}", REPO / "configs" / s.pretrain,
        [*preset_sections(cont, ("data", "model")), *root, f"rounds={s.pretrain_rounds}",
         f"eval.every={s.pretrain_rounds}", "eval.personalized=false", "checkpoint_every=0", "executor=sequential",
         *s.pretrain_overrides, f"seed={seed}"], d / f"pretrain-s{seed}") for seed in seeds}

    def attack_job(name: str, attack: str, extra: Sequence[str], seed: int, out: Path) -> Job:
        a = ATTACKS[attack]
        over = [*COMMON, *root, *s.overrides, *a.overrides, *extra]
        if a.preset == "single":
            over += [*s.single_overrides]
            over += single_rounds(s, over)
        return Job(name, REPO / "configs" / s.presets[a.preset],
                   [*over, f"init_from={pretrain[seed].out.resolve()}", f"seed={seed}"], out, keep_checkpoint=False)

    def run_overrides(run: str) -> tuple[str, ...]:
        if run not in SIDE_RUNS:
            return RUNS[run]
        import yaml

        lr = yaml.safe_load(cont.read_text())["algorithm"]["harden_lr"]
        key = "harden_lr" if run == "flip_gentle" else "warmup_lr"
        return (f"algorithm.{key}={lr * GENTLE:g}",)

    calibration = attack_job(f"{s.name}/calibration/s{seeds[0]}", "none",
                             [FEDAVG, "defense.aggregator=norm_clipping", "defense.clip=1e9"], seeds[0],
                             d / f"calibration-s{seeds[0]}")
    jobs = {(attack, run, seed): attack_job(f"{s.name}/{attack}/{run}/s{seed}", attack, run_overrides(run), seed,
                                             d / attack / f"{run}-s{seed}")
            for run in runs for attack in attacks for seed in seeds}
    return Plan(s, seeds, pretrain, calibration, jobs, d)


def add_norm_clip(plan: Plan) -> tuple[float, float]:
    clip, noise = plan.norm_clip()
    for (_, run, _), job in plan.runs.items():
        if run == "norm_clipping" and not any(o.startswith("defense.clip=") for o in job.overrides):
            job.overrides[-2:-2] = [f"defense.clip={clip:g}", f"defense.noise={noise:g}"]  # before init_from, seed
    return clip, noise


# ---------------------------------------------------------------- reading the runs


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def asr_curve(run_dir: Path, tau: bool) -> dict[int, float]:
    """Round → ASR (``asr_tau`` when ``tau``) over the evaluated rounds."""
    key = "asr_tau" if tau else "asr"
    return {r["round"]: r[key] for r in _rows(run_dir) if "test_acc" in r and r.get(key) is not None}


def clean_accuracy(run_dir: Path, tau: bool) -> float | None:
    last = [r for r in _rows(run_dir) if "test_acc" in r][-1]
    return last.get("acc_tau" if tau else "test_acc")


def last_attack_round(run_dir: Path) -> int | None:
    """The run's last attack round from its resolved config (None: it never attacks)."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    a = cfg["attack"]
    if a.get("schedule"):
        return max(int(r) for r in a["schedule"])
    if a.get("rounds") is not None:
        return max(a["rounds"]) if a["rounds"] else None
    return a.get("to") or cfg["rounds"]


def seconds_per_round(run_dir: Path) -> float | None:
    """Median duration of rounds 2 … R − 1 (``time_s`` is cumulative), over the rounds without an evaluation
    when there are any (evaluation every round: with it)."""
    rows = _rows(run_dir)
    steps = [(b["time_s"] - a["time_s"], "test_acc" in b) for a, b in zip(rows[:-2], rows[1:-1])]
    plain = [t for t, evaluated in steps if not evaluated]
    chosen = plain or [t for t, _ in steps]
    return statistics.median(chosen) if chosen else None


@dataclass
class Cell:
    """One (row, attack, seed): the numbers of a table cell."""

    clean: float | None
    peak: float | None
    final: float | None
    final_tau: float | None
    lifespan: int | None
    window: int | None  # rounds evaluated after the last attack round (None: no attack)
    seconds: float | None


def cell(plan: Plan, row: Row, attack: str, seed: int) -> Cell:
    from fedtrust.metrics.backdoor import lifespan

    out = plan.runs[attack, row.run, seed].out
    curve = asr_curve(out, row.tau)
    final = curve[max(curve)] if curve else None
    tau_curve = asr_curve(out, True)
    last = last_attack_round(out)
    span = window = None
    if last is not None and curve:
        clean_run = plan.runs.get(("none", row.run, seed))
        level = statistics.median(asr_curve(clean_run.out, row.tau).values()) if clean_run else 0.0
        span = lifespan(curve, last, max(level, LIFESPAN_FLOOR))
        window = max(curve) - last
    return Cell(clean_accuracy(out, row.tau), max(curve.values()) if curve else None, final,
                tau_curve[max(tau_curve)] if tau_curve else None, span, window, seconds_per_round(out))


def lifespan_text(cells: list[Cell]) -> str:
    """Mean ± std of the lifespans where the ASR fell; ``> L`` for the seeds where it never did."""
    if cells[0].window is None:
        return "—"
    fell = [c.lifespan for c in cells if c.lifespan is not None]
    outlived = len(cells) - len(fell)
    window = min(c.window for c in cells)
    if not outlived:
        return mean_std(fell, scale=1)
    if not fell:
        return f"> {window}"
    return f"{mean_std(fell, scale=1)} ({outlived} of {len(cells)} > {window})"


def table(plan: Plan, attack: str, rows: list[Row]) -> list[str]:
    body = []
    for row in rows:
        cells = [cell(plan, row, attack, seed) for seed in plan.seeds]
        body.append([row.label, mean_std([c.clean for c in cells]), mean_std([c.peak for c in cells]),
                     mean_std([c.final for c in cells]), lifespan_text(cells), mean_std([c.final_tau for c in cells]),
                     mean_std([c.seconds for c in cells], scale=1, digits=2)])
    return md_table(["defense", "clean acc", "peak ASR", "final ASR", "lifespan (rounds)", f"final ASR, τ {TAU}",
                     "s / round"], body)


def mean_curve(plan: Plan, row: Row, attack: str) -> tuple[list[int], list[float]]:
    """Rounds evaluated in every seed and the mean ASR (%) over seeds there."""
    curves = [asr_curve(plan.runs[attack, row.run, seed].out, row.tau) for seed in plan.seeds]
    rounds = sorted(set.intersection(*(set(c) for c in curves)))
    return rounds, [100 * statistics.mean(c[r] for c in curves) for r in rounds]


def asr_plot(plan: Plan, attack: str, rows: list[Row], path: Path) -> None:
    """ASR per round, mean over seeds, one line per defense; attack rounds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9.6, 4.4))
    colors = plt.get_cmap("tab20").colors
    first = plan.runs[attack, rows[0].run, plan.seeds[0]].out
    last = last_attack_round(first)
    schedule = yaml.safe_load((first / "config.yaml").read_text())["attack"].get("schedule")
    if schedule:
        for r in schedule:
            ax.axvline(int(r), color="0.6", linestyle=":", linewidth=1)
    elif last is not None:
        ax.axvspan(0.5, last + 0.5, color="0.93", zorder=0)
    for i, row in enumerate(rows):
        rounds, values = mean_curve(plan, row, attack)
        flip = row.run.startswith("flip")
        color = {"flip": "black", "flip_gentle": "tab:purple", "flip_warm": "tab:green"}.get(
            row.run, colors[2 * i % 20])
        ax.plot(rounds, values, label=row.label, color=color,
                linestyle="--" if row.tau else "-", linewidth=2.2 if flip else 1.2, marker="o", markersize=2.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (after pre-training)")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-3, 103)
    marks = "dotted lines: attack rounds" if schedule else (
        "shaded: attack rounds" if last is not None else "no attack: the clean model's ASR")
    ax.set_title(f"{plan.setting.title}, {ATTACKS[attack].title}: ASR per round, mean of {len(plan.seeds)} "
                 f"seed(s)\n({marks})", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cost_lines(plans: dict[str, Plan], runs: list[str]) -> list[str]:
    """FLIP's seconds per round against FedAvg's (the "none" row), per data set and attack."""
    if "flip" not in runs or "fedavg" not in runs:
        return []
    body = []
    for d, p in plans.items():
        for attack in p.attacks:
            avg = [seconds_per_round(p.runs[attack, "fedavg", s].out) for s in p.seeds]
            flip = [seconds_per_round(p.runs[attack, "flip", s].out) for s in p.seeds]
            ratio = statistics.mean(x for x in flip if x) / statistics.mean(x for x in avg if x)
            body.append([d, ATTACKS[attack].title, mean_std(avg, scale=1, digits=2), mean_std(flip, scale=1, digits=2),
                         f"{ratio:.1f}"])
    return ["", "## FLIP's cost per round against FedAvg's", "",
            "Seconds per round inside the runs (module docstring: median of rounds 2 … R − 1), mean ± std over "
            "seeds; both with the sequential executor and one torch thread. FedAvg's clients train by local SGD; "
            "FLIP's benign clients replace it by hardening (inversions plus Adam steps), its attackers train as "
            "FedAvg's.", "",
            *md_table(["data set", "attack", "FedAvg (s / round)", "FLIP (s / round)", "FLIP / FedAvg"], body, 2)]


# ---------------------------------------------------------------- inversion speed


def speed_models() -> list[tuple[str, str, tuple[int, int, int]]]:
    from fedtrust.registry import names

    models = [("digits `cnn` (8×8)", "cnn", (1, 8, 8)), ("MNIST `cnn` (28×28)", "cnn", (1, 28, 28))]
    if "lenet" in names("model"):
        models.append(("MNIST `lenet` (28×28)", "lenet", (1, 28, 28)))
    return models


def inversion_jobs(model: str, shape: tuple[int, int, int], clients: int, steps: int, seed: int) -> list:
    """``clients`` K = 2 inversion jobs (8 source + 8 target images each) on as many differently initialised
    models of one architecture, each with its own generator (as FLIP's clients)."""
    import torch

    from fedtrust.models import create_model
    from fedtrust.robust.inversion import InversionJob, InversionParams

    shell = create_model(model, 10, shape)
    jobs = []
    for i in range(clients):
        torch.manual_seed(seed * 1000 + i)
        net = create_model(model, 10, shape)
        weights = {k: v.detach() for k, v in [*net.named_parameters(), *net.named_buffers()]}
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        images = torch.rand((16, *shape), generator=gen)
        group = torch.tensor([0] * 8 + [1] * 8)
        target = torch.where(group == 0, 2, 5)
        jobs.append(InversionJob(shell, weights, images, group, target, 2, steps, gen, 1e-3, [None, None], None,
                                 InversionParams()))
    return jobs


def time_inversions(model: str, shape: tuple[int, int, int], steps: int, repeats: int,
                    clients: int = 6) -> tuple[float, float]:
    """Median seconds of the per-client loop and of the vmapped batch, ``repeats`` interleaved repeats after an
    untimed warm-up of each."""
    from fedtrust.robust.inversion import InversionJob

    def loop(jobs: list) -> None:
        for job in jobs:
            InversionJob.solve_batch([job])

    modes = {"loop": loop, "vmap": InversionJob.solve_batch}
    for run in modes.values():
        run(inversion_jobs(model, shape, clients, 2, seed=99))
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(repeats):
        for m, run in modes.items():
            jobs = inversion_jobs(model, shape, clients, steps, seed=rep)
            start = time.perf_counter()
            run(jobs)
            times[m].append(time.perf_counter() - start)
    return statistics.median(times["loop"]), statistics.median(times["vmap"])


def speed_lines(steps: int, repeats: int, threads: Sequence[int] = (1, 2)) -> list[str]:
    import torch

    before = torch.get_num_threads()
    body = []
    try:
        for label, model, shape in speed_models():
            for n in threads:
                torch.set_num_threads(n)
                load = os.getloadavg()[0]
                loop, vmap = time_inversions(model, shape, steps, repeats)
                body.append([label, str(n), f"{load:.1f}", f"{loop:.2f}", f"{vmap:.2f}", f"{1000 * loop / steps:.0f}",
                             f"{1000 * vmap / steps:.0f}", f"{loop / vmap:.2f}"])
                print(f"speed: {label}, {n} thread(s): loop {loop:.2f} s, vmap {vmap:.2f} s", flush=True)
    finally:
        torch.set_num_threads(before)
    return ["", "## Vectorised inversion against the per-client loop", "",
            f"6 clients' inversions (K = 2 triggers, 8 + 8 images each, {steps} Adam steps, each on its own "
            "model of the architecture): `InversionJob.solve_batch` with the 6 jobs (one `vmap`-ed step, the "
            "vectorised executor) against one job at a time (the per-client loop, the sequential executor); "
            f"median of {repeats} interleaved repeats after an untimed warm-up, `torch.set_num_threads` as "
            "given, in the benchmark's own process once no run is left. Load: the machine's 1-minute load "
            "average when the row started; with 2 threads on 2 cores any other load makes OpenMP threads wait "
            "for each other, so only rows at a load well below the core count are the code's own speed.", "",
            *md_table(["model", "threads", "load", "loop (s)", "vmap (s)", "loop (ms / step)", "vmap (ms / step)",
                       "loop / vmap"], body, 3)]


# ---------------------------------------------------------------- main


def parse_args():
    parser = benchmark_parser(__doc__, "backdoor")
    parser.set_defaults(seeds=None, datasets=None)
    parser.add_argument("--defenses", help=f"run keys, comma-separated (default {DEFAULTS['defenses']}; `flip` "
                                           "gives both FLIP rows)")
    parser.add_argument("--attacks", help=f"comma-separated (default {DEFAULTS['attacks']})")
    parser.add_argument("--attacks-mnist", help="attacks on MNIST and Fashion-MNIST, comma-separated (default: "
                                                "those of --attacks)")
    parser.add_argument("--rounds-mnist", type=int, help=f"attack rounds on MNIST and Fashion-MNIST (default "
                                                         f"{DEFAULTS['rounds_mnist']})")
    parser.add_argument("--flip-steps-mnist", help="FLIP's warm-up, pair and refine inversion steps on MNIST and "
                                                   f"Fashion-MNIST (default {DEFAULTS['flip_steps_mnist']}; "
                                                   "MNIST_STEPS in the module docstring)")
    parser.add_argument("--mnist-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every MNIST / Fashion-MNIST attack run, after the scale-down "
                             "(repeatable; e.g. attack.epochs=1 for a side study)")
    parser.add_argument("--runs-per-process", type=int, default=RUNS_PER_PROCESS,
                        help="runs one process does in turn (1: a fresh `fedtrust run` process per run)")
    parser.add_argument("--speed-steps", type=int, help="inversion steps timed (default 50; --quick 10)")
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--no-speed", action="store_true", help="skip the inversion-speed section")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the inversion-speed section, to backdoor-speed.md (no runs)")
    parser.add_argument("--results", default="backdoor",
                        help="results name: benchmarks/results/<name>.md and its plots, analysis from "
                             "benchmarks/<name>_analysis.md unless --analysis says otherwise (default backdoor; "
                             "a side study keeps the main table)")
    parser.add_argument("--quick", action="store_true", help="smoke test, not the benchmark: " + ", ".join(
        f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + "; digits 5 pre-training and 5 attack rounds "
        "(single-shot attacks in rounds 2 and 3), 1 local epoch, FLIP at most 6 batches with 20 / 10 / 5 inversion "
        "steps; 10 timed inversion steps; results in backdoor-quick.md")
    args = parser.parse_args()
    for key in ("seeds", "datasets", "defenses", "attacks", "rounds_mnist", "flip_steps_mnist"):  # explicit > --quick > default
        if getattr(args, key) is None:
            setattr(args, key, (QUICK if args.quick else DEFAULTS)[key])
    if args.attacks_mnist is None:
        args.attacks_mnist = args.attacks
    if args.speed_steps is None:
        args.speed_steps = 10 if args.quick else 50
    if args.work == "runs/bench-backdoor" and args.results != "backdoor":
        args.work = f"runs/bench-{args.results}"
    if args.quick and args.work == "runs/bench-backdoor":
        args.work = "runs/bench-backdoor-quick"
    if args.analysis == "benchmarks/backdoor_analysis.md":
        args.analysis = f"benchmarks/{args.results}_analysis.md"
    return args


def chosen(value: str, known: Sequence[str], what: str) -> list[str]:
    picked = [x for x in value.split(",") if x]
    unknown = [x for x in picked if x not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown[0]!r}; this benchmark knows {', '.join(known)}")
    return picked


def attacker_ids(plans: dict[str, Plan]) -> str:
    """The attackers of each data set's continuous preset, for the header ("MNIST: clients 41, 73, 51, 74")."""
    import yaml

    def ids(plan: Plan) -> str:
        preset = yaml.safe_load((REPO / "configs" / plan.setting.presets["continuous"]).read_text())
        return ", ".join(map(str, preset["attack"]["ids"]))
    return "; ".join(f"{p.setting.title.split(' (')[0]}: clients {ids(p)}" for p in plans.values())


def header_lines(args, plans: dict[str, Plan], every: list[Job], todo: int, elapsed_min: float, cmd: str,
                 notes: list[str], clips: dict[str, tuple[float, float]]) -> list[str]:
    quick = " — QUICK SMOKE TEST, not the benchmark" if args.quick else ""
    study = f" — side study `{args.results}`" if args.results != "backdoor" else ""
    lines = run_header(f"Backdoor defenses: FLIP against robust aggregation (issue 15){study}{quick}", cmd, args,
                       every, todo, elapsed_min)
    for d, p in plans.items():
        walls = [j.summary()["wall_time_s"] for j in p.runs.values()]
        lines.append(f"- {p.setting.title}: {p.setting.description}. Median attack run "
                     f"{statistics.median(walls):.1f} s (inside the process). Overrides on every attack run: "
                     f"`{' '.join([*COMMON, *p.setting.overrides])}`.")
    lines += [
        f"- Attacks: the presets' 4 attackers ({attacker_ids(plans)}), DBA pieces, target 2. No attack: "
        "`attack.rounds=[]` (the clean model's ASR). Single-shot: the single preset (one attacker a round, update scaled by γ = 10) with "
        "each attacker forced into its round (`attack.force=true`). "
        "Continuous DBA: "
        f"the continuous preset (4 of 10 replies every round). Continuous Neurotoxin: plus "
        f"`attack.neurotoxin={NEUROTOXIN_TOP}`.",
        *defense_lines(args.defenses.split(","), clips),
        "- Accuracies and ASRs in %, mean ± std over seeds. Clean acc: final round (FLIP + τ: refusals count as "
        "errors). Peak "
        "ASR: the largest over the evaluated rounds. Lifespan: rounds after the last attack round until the ASR "
        "is below twice the same defense's no-attack level (median over its rounds, at least "
        f"{LIFESPAN_FLOOR:.1%}); `> L`: it never fell in the L rounds after. "
        f"Final ASR, τ {TAU}: every defense read with FLIP's rejection (the control: rejection without "
        "hardening). s / round: median round duration inside the run.",
        *notes]
    return lines


def defense_lines(runs: list[str], clips: dict[str, tuple[float, float]]) -> list[str]:
    """The header's notes on the defenses this invocation ran."""
    lines = []
    if set(runs) - {"fedavg", "flip", *SIDE_RUNS}:
        lines.append(
            "- Defenses, sized for 4 attackers of n = 10 (all attacks): Multi-Krum f = 3 (the most Krum allows at "
            "n = 10), m = 6; trimmed mean k = 4 a side; RLR θ = 5; FLTrust root set of "
            f"{ROOT_SIZE} samples held out of training; norm clipping M = the {CLIP_QUANTILE:.0%} quantile of a "
            f"clean run's update norms, noise σ = {NOISE_RATIO}·M/√d ("
            + "; ".join(f"{d}: M = {c:g}, σ = {n:g}" for d, (c, n) in clips.items())
            + "); median, FoolsGold, FLAME at their defaults.")
    lines.append("- Non-FLIP rows run the preset with `algorithm.invert=false` (FedAvg bit for bit). FLIP (τ = 0) and "
                 f"FLIP + τ read the same run without and with τ-rejection at {TAU}."
                 + (f" FLIP, hardening lr × {GENTLE:g}: the preset's `algorithm.harden_lr` times {GENTLE:g} "
                    "(module docstring, `flip_gentle`)." if "flip_gentle" in runs else "")
                 + (f" FLIP, warm-up lr × {GENTLE:g}: `algorithm.warmup_lr` = the preset's `harden_lr` times "
                    f"{GENTLE:g}, pair hardening at the preset's (module docstring, `flip_warm`)."
                    if "flip_warm" in runs else ""))
    return lines


def main() -> None:
    args = parse_args()
    name = f"{args.results}-quick" if args.quick else args.results
    if args.speed_only:
        lines = [f"# Backdoor benchmark: inversion speed only{' (quick)' if args.quick else ''}", "",
                 f"Reproduce: `python benchmarks/backdoor.py --speed-only --speed-steps {args.speed_steps} "
                 f"--speed-repeats {args.speed_repeats}`.", "", f"- Hardware: {machine_note()}.",
                 f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
                 *speed_lines(args.speed_steps, args.speed_repeats)]
        write_results(f"{name}-speed.md", lines)
        return
    seeds = [int(x) for x in args.seeds.split(",")]
    runs = chosen(args.defenses, list(RUNS), "defense")
    attacks = chosen(args.attacks, list(ATTACKS), "attack")
    attacks_mnist = chosen(args.attacks_mnist, list(ATTACKS), "attack")
    rows = [r for r in ROWS if r.run in runs]
    try:
        steps = tuple(int(x) for x in args.flip_steps_mnist.split(","))
    except ValueError:
        steps = ()
    if len(steps) != 3 or min(steps) < 1:
        raise SystemExit(f"--flip-steps-mnist takes three positive step counts (warm-up,pair,refine), got "
                         f"{args.flip_steps_mnist!r}")
    bad = [o for o in args.mnist_set if "=" not in o]
    if bad:
        raise SystemExit(f"--mnist-set takes KEY=VALUE, got {bad[0]!r}")
    all_settings = settings(args.quick, args.rounds_mnist, steps, args.mnist_set)
    notes, plans = [], {}
    for d in chosen(args.datasets, list(all_settings), "data set"):
        why = missing(all_settings[d])
        if why:
            note = f"- {all_settings[d].title} skipped: {why} on this machine."
            print(note[2:], flush=True)
            notes.append(note)
            continue
        plans[d] = plan_for(all_settings[d], seeds, attacks if d == "digits" else attacks_mnist, runs,
                            Path(args.work))
    if not plans:
        raise SystemExit("no data set to run")

    start = time.time()
    pretrain = [j for p in plans.values() for j in p.pretrain.values()]
    calibration = [p.calibration for p in plans.values()] if "norm_clipping" in runs else []
    every = [*pretrain, *calibration]
    todo = sum(not j.done() for j in every)
    run_jobs(pretrain, args.jobs)
    run_jobs(calibration, args.jobs)
    clips = {d: add_norm_clip(p) for d, p in plans.items()} if calibration else {}
    # the long runs first (FLIP, then MNIST-like before digits), so the pool ends evenly
    attack_runs = sorted((j for p in plans.values() for j in p.runs.values()),
                         key=lambda j: ("/flip" not in j.name, j.name.startswith("digits")))
    every += attack_runs
    todo += sum(not j.done() for j in attack_runs)
    run_jobs(attack_runs, args.jobs, args.runs_per_process)
    elapsed_min = (time.time() - start) / 60

    cmd = (f"python benchmarks/backdoor.py --seeds {args.seeds} --jobs {args.jobs} --datasets {args.datasets} "
           f"--defenses {','.join(runs)} --attacks {','.join(attacks)} --rounds-mnist {args.rounds_mnist}"
           + (f" --attacks-mnist {','.join(attacks_mnist)}" if attacks_mnist != attacks else "")
           + (f" --flip-steps-mnist {args.flip_steps_mnist}" if args.flip_steps_mnist != DEFAULTS["flip_steps_mnist"]
              else "")
           + "".join(f" --mnist-set {o}" for o in args.mnist_set)
           + (f" --results {args.results}" if args.results != "backdoor" else "")
           + (" --quick" if args.quick else ""))
    lines = header_lines(args, plans, every, todo, elapsed_min, cmd, notes, clips)
    for d, p in plans.items():
        lines += ["", f"## {p.setting.title}"]
        for attack in p.attacks:
            png = f"{name}-{d}-{attack}.png"
            asr_plot(p, attack, rows, RESULTS / png)
            lines += ["", f"### {ATTACKS[attack].title}", "", *table(p, attack, rows), "",
                      f"![{d}, {ATTACKS[attack].title}: ASR per round]({png})"]
    lines += cost_lines(plans, runs)
    if not args.no_speed:
        lines += speed_lines(args.speed_steps, args.speed_repeats)
    write_results(f"{name}.md", lines if args.quick else with_analysis(lines, args.analysis))


if __name__ == "__main__":
    main()
