"""The run configuration: one YAML file plus ``key=value`` overrides, validated by a schema.

Precedence is CLI overrides > file > defaults. Every section is a frozen
pydantic model with ``extra="forbid"``; components named in the config
(algorithm, objective, model, partitioner, data set) validate their own
parameters. Any error is a one-line :class:`~fedtrust.errors.ConfigError`
that names the key and what is valid.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedtrust.adversarial.robust import RobustEvalParams
from fedtrust.data.augment import parse_augment
from fedtrust.errors import ConfigError
from fedtrust.registry import get, names


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Named(BaseModel):
    """A section naming a registered component; its other keys are that component's params."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(Section):
    dataset: str = Field("digits", description="registered data set (`fedtrust list`)")
    root: str | None = Field(None, description="data directory for file-based sets; null: $FEDTRUST_DATA, else ./data")
    id_classes: list[int] | None = Field(
        None, description="keep only these classes of the data set, relabelled 0..k−1 in the order given (null: all)")
    num_clients: int = Field(20, ge=1, description="number of clients the training set is split into")
    clients_per_round: int | float = Field(
        10, description="clients sampled per round: an int is a count, a float in (0, 1] a fraction")
    dataset_params: dict[str, Any] = Field(
        default_factory=dict, description="the data set loader's own options (e.g. image_size of domainnet; "
                                          "`fedtrust.data.datasets.dataset_params`)")
    partition: str = Field("dirichlet", description="partitioner: iid, dirichlet, shards, domains")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition=dirichlet)")
    min_size: int = Field(10, ge=0, description="minimum samples per client (partition=dirichlet)")
    classes_per_client: int = Field(2, ge=1, description="label shards per client (partition=shards)")
    imbalance_ratio: float = Field(1.0, ge=1.0, description="long-tail n_max/n_min of the training set (1 = as is)")
    longtail_order: Literal["first", "random"] = Field(
        "first", description="which images the long tail keeps of each class: first (file order), random "
                             "(drawn from the partition seed)")
    augment: str = Field("auto", description="training augmentation: auto (the data set's default), none, crop_flip, "
                                             "or primitives crop, flip, color_jitter, grayscale joined by '+' in that "
                                             "order")
    normalize: Literal["dataset", "none"] = Field(
        "dataset", description="input normalisation: dataset (its per-channel mean/std), none (x/255 only)")
    partition_seed: int | None = Field(None, description="seed of the partition (null: the run seed)")
    sampler: str = Field("uniform", description="registered client sampler (`fedtrust list sampler`)")
    outliers: str | list[str] | None = Field(
        None, description="training-outlier source for objectives that need outliers (`fedtrust list outliers`; "
                          "`npz:PATH` for your own); a list: the union, data.num_outliers split evenly")
    num_outliers: int = Field(5000, ge=1, description="size of the server's outlier pool")

    @field_validator("clients_per_round")
    @classmethod
    def _cpr(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("a float is a fraction and must lie in (0, 1]; use an int for a count")
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("id_classes")
    @classmethod
    def _id_classes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(v) < 2:
            raise ValueError("expected at least 2 classes (or null: all)")
        if v is not None and len(set(v)) != len(v):
            raise ValueError("classes repeat; expected distinct classes")
        return v

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: str) -> str:
        if v != "auto":
            try:
                parse_augment(v)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _names(self) -> "DataConfig":
        from fedtrust.data.datasets import dataset_params

        get("dataset", self.dataset)
        valid = dataset_params(self.dataset)
        unknown = sorted(set(self.dataset_params) - set(valid))
        if unknown:
            raise ConfigError(f"unknown config key {_key(f'data.dataset_params.{unknown[0]}')} for data set "
                              f"{self.dataset!r}; valid: {', '.join(valid) or 'none'}")
        get("partitioner", self.partition)
        get("sampler", self.sampler)
        if isinstance(self.clients_per_round, int) and self.clients_per_round > self.num_clients:
            raise ConfigError(f"config key 'data.clients_per_round': {self.clients_per_round} exceeds "
                              f"data.num_clients={self.num_clients}")
        return self


class BudgetConfig(Section):
    """Section ``budget``: each client's maximum model width (Split-Mix spec §1; ``fedtrust.data.budgets``)."""

    distribution: Literal["none", "blocks", "random", "lognormal"] = Field(
        "none", description="none (no budgets), blocks (contiguous blocks in client order), random (a seeded "
                            "draw per client), lognormal (contiguous groups sized by a lognormal)")
    widths: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0],
                                description="the allowed widths, strictly increasing in (0, 1]")
    sigma: float = Field(0.5, gt=0, description="lognormal: shape σ of ln W")
    median: float = Field(0.4, gt=0, description="lognormal: median of W (scipy's scale)")
    shuffle: bool = Field(False, description="permute the budgets over clients (seeded), untying them from "
                                             "client order and so from domain")

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[float]) -> list[float]:
        from fedtrust.data.budgets import check_widths

        return list(check_widths(v))


class ModelConfig(Named):
    name: str = Field("cnn", description="registered model; other keys are the builder's keyword arguments")

    @model_validator(mode="after")
    def _kwargs(self) -> "ModelConfig":
        builder = get("model", self.name)
        _check_kwargs("model", self.name, builder, self.params(),
                      skip={"num_classes", "in_shape"})
        return self


class AlgorithmConfig(Named):
    name: str = Field("fedavg", description="registered algorithm; other keys are its params")

    @model_validator(mode="after")
    def _params(self) -> "AlgorithmConfig":
        _check_params("algorithm", self.name, get("algorithm", self.name).Params, self.params())
        return self


class ObjectiveConfig(Named):
    name: str = Field("ce", description="registered local objective; other keys are its params")

    @model_validator(mode="after")
    def _params(self) -> "ObjectiveConfig":
        _check_params("objective", self.name, get("objective", self.name).Params, self.params())
        return self


class TrainConfig(Section):
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="client optimizer, rebuilt each round")
    keep_optimizer: bool = Field(False, description="keep each client's optimizer state (momentum, Adam moments "
                                                    "and step) across rounds in its persistent state; centralised "
                                                    "runs (one client, a round per epoch) then train with one "
                                                    "optimizer, as the papers' code (fedavg, fedprox)")
    trainable: list[str] | None = Field(None, description="train only the parameters matching these fnmatch "
                                                          "patterns over parameter names (`head.*`), or `<norm>` "
                                                          "for normalisation layers; null: all (fedavg, fedprox)")
    lr: float = Field(0.05, gt=0, description="client learning rate (round 1, before the schedule)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="SGD Nesterov momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay of the client optimizer")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas")
    epochs: int = Field(1, ge=1, description="local epochs per round")
    steps: int | None = Field(None, ge=1, description="local steps per round; overrides epochs when set")
    batch_size: int = Field(16, ge=1, description="local minibatch size")
    drop_last: bool = Field(False, description="drop the final short batch of each local pass (a client with "
                                               "fewer samples than one batch keeps its one batch)")
    outlier_ratio: float = Field(1.0, gt=0, le=16, description="outliers per ID image in a batch, for objectives "
                                                               "with outliers (fine-tuned OE baselines: 2, i.e. "
                                                               "128 ID + 256 outliers)")
    lr_schedule: Literal["constant", "cosine", "step", "exponential"] = Field(
        "cosine", description="learning-rate schedule across rounds")
    lr_min: float = Field(0.0, ge=0, description="final lr of the cosine schedule")
    lr_step_rounds: int = Field(10, ge=1, description="rounds between decays (step)")
    lr_gamma: float = Field(0.1, gt=0, le=1, description="decay factor (step: per lr_step_rounds; exponential: per round)")

    @model_validator(mode="after")
    def _nesterov(self) -> "TrainConfig":
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer=sgd and momentum > 0")
        return self

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("Adam betas must lie in [0, 1)")
        return v


class EvalConfig(Section):
    every: int = Field(5, ge=1, description="evaluate every N rounds (and always after the last)")
    batch_size: int = Field(1024, ge=1, description="evaluation batch size")
    personalized: bool = Field(True, description="also evaluate each client on its label-matched local test set")
    ood: list[str] = Field(default_factory=list, description="OOD test sets (outlier sources) to report detection "
                                                             "metrics on; empty: none")
    num_ood: int = Field(1000, ge=1, description="images per OOD test set")
    scores: list[str] = Field(default_factory=lambda: ["msp"], description="OOD scores to report (msp, maxlogit, "
                                                                         "energy, rn)")
    reject_tau: float = Field(0.0, ge=0.0, le=1.0, description="FLIP's inference-time rejection: a prediction "
                                                               "counts only if its top-1 softmax probability "
                                                               "is at least this (0: off)")
    asr_baseline: float | None = Field(None, ge=0.0, le=1.0, description="a backdoor's ASR before the attack, "
                                                                         "for the lifespan (null: measured on "
                                                                         "the start model when the run starts, "
                                                                         "and recorded here)")
    metrics: list[str] = Field(default_factory=lambda: ["accuracy", "calibration", "ood", "backdoor"],
                               description="evaluators to run (`fedtrust list evaluator`), in this order")
    leakage_probes: int = Field(4, ge=1, le=64, description="leakage evaluator: test samples probed (the first "
                                                            "of each class in turn)")
    leakage_sigma: float = Field(1e-3, gt=0, description="leakage evaluator: std of the reference Gaussian "
                                                         "perturbation δ of a probe's gradient (I_lb scales with it)")
    ood_model: Literal["final", "init_from"] = Field(
        "final", description="the model OOD detection is scored with: the run's own (final), or the init_from "
                             "model (PASCL stage 2: OOD from stage 1, accuracy from stage 2)")
    robust: RobustEvalParams = Field(default_factory=RobustEvalParams,
                                     description="robust_acc evaluator: L∞ PGD settings, dual-BN mixes μ, subset cap")

    @model_validator(mode="after")
    def _names(self) -> "EvalConfig":
        for name in self.scores:
            get("score", name)
        for name in self.metrics:
            get("evaluator", name)
        if not self.metrics:
            raise ValueError("eval.metrics is empty; expected at least one evaluator (e.g. [accuracy])")
        for name in self.ood:
            _outlier_source(name)
        return self


class AttackConfig(BaseModel):
    """Section ``attack``: a registered attack wrapping the chosen clients; its other keys are its params."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)
    name: str | None = Field(None, description="registered attack (`fedtrust list attack`); null: no attack")
    fraction: float = Field(0.0, ge=0, le=1, description="fraction of the clients that are malicious, drawn once "
                                                         "from the seed (ignored when ids is set)")
    ids: list[int] | None = Field(None, description="fixed malicious client ids (instead of fraction)")
    rounds: list[int] | None = Field(None, description="the rounds the attackers attack; null: from..to")
    start: int = Field(1, ge=1, alias="from", description="first attack round (when rounds is null)")
    to: int | None = Field(None, ge=1, description="last attack round (when rounds is null); null: the last round")
    schedule: dict[int, list[int]] | None = Field(
        None, description="round -> the client ids that attack in it (single-shot: one attacker a round); "
                          "instead of ids/fraction and rounds/from/to")
    force: bool = Field(False, description="force the attackers into the sample of every attack round "
                                           "(else they attack when the sampler picks them)")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _check(self) -> "AttackConfig":
        if self.name is None:
            if self.params():
                first = next(iter(self.params()))
                raise ConfigError(f"unknown config key {_key(f'attack.{first}')} with no attack "
                                  f"(set attack.name; `fedtrust list attack`)")
            return self
        _check_params("attack", self.name, get("attack", self.name).Params, self.params())
        if self.schedule is not None:
            clash = [k for k, v in (("ids", self.ids), ("fraction", self.fraction or None),
                                    ("rounds", self.rounds), ("to", self.to)) if v is not None]
            if clash or self.start != 1:
                raise ConfigError(f"config key 'attack.schedule' says who attacks when; drop attack."
                                  f"{(clash or ['from'])[0]}")
            if not self.schedule or any(r < 1 or not ids for r, ids in self.schedule.items()):
                raise ConfigError("config key 'attack.schedule': expected {round >= 1: [client ids, ...]}, "
                                  "each round with at least one attacker")
            return self
        if self.ids is None and self.fraction == 0:
            raise ConfigError(f"attack {self.name!r} has no attackers: set attack.fraction (0..1] or attack.ids")
        if self.to is not None and self.to < self.start:
            raise ConfigError(f"config key 'attack.to': {self.to} is before attack.from={self.start}")
        return self


class DefenseConfig(BaseModel):
    """Section ``defense``: the server's aggregator (its params as extra keys) and reply validation."""

    model_config = ConfigDict(extra="allow", frozen=True)
    aggregator: str = Field("mean", description="registered aggregator (`fedtrust list aggregator`); other keys "
                                                "of the section are its params")
    server_lr: float = Field(1.0, gt=0, description="server learning rate η_s on the aggregated update "
                                                    "(θ ← θ + η_s·agg(Δ))")
    uniform: bool = Field(False, description="weight every reply alike (1/n) instead of by its sample count, for "
                                             "any aggregator (FLIP's server, spec flip.md §3)")
    max_update_norm: float | None = Field(None, gt=0, description="reject replies whose update norm exceeds this; "
                                                                  "null: no bound")
    min_replies: int = Field(1, ge=1, description="a round with fewer valid replies keeps the previous server state")
    root_size: int = Field(0, ge=0, description="training samples held out as the server's root data set "
                                                "(FLTrust; 0: none)")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _check(self) -> "DefenseConfig":
        cls = get("aggregator", self.aggregator)
        _check_params("defense", self.aggregator, cls.Params, self.params())
        if cls.needs_root and self.root_size == 0:
            raise ConfigError(f"defense.aggregator={self.aggregator!r} needs a server root data set: "
                              f"set defense.root_size (e.g. 100)")
        return self


class FaultsConfig(Section):
    """Section ``faults``: client faults injected per (seed, round, client), and the straggler model
    (``fedtrust.fl.faults``). All off by default."""

    crash: float = Field(0.0, ge=0, le=1, description="probability that a sampled client raises before training")
    hang: float = Field(0.0, ge=0, le=1, description="probability that a sampled client gives no reply within the "
                                                     "round's deadline (a Flower node sleeps hang_seconds)")
    garbage: float = Field(0.0, ge=0, le=1, description="probability that a sampled client replies garbage")
    garbage_kinds: list[Literal["nan", "shape", "keys", "weight"]] = Field(
        default_factory=lambda: ["nan", "shape", "keys", "weight"], min_length=1,
        description="the garbage a faulty reply holds, one drawn per fault: nan, shape, keys, weight")
    hang_seconds: float = Field(30.0, gt=0, description="how long a hanging Flower node sleeps (past round_timeout)")
    round_timeout: float | None = Field(None, gt=0, description="the round's deadline in seconds: on Flower the wait "
                                                                "for replies (overrides flower.round-timeout), in the "
                                                                "straggler model the simulated deadline")
    speed: float | None = Field(None, gt=0, description="straggler model: mean examples a client processes per "
                                                        "second (null: off; needs round_timeout)")
    speed_sigma: float = Field(0.5, ge=0, description="straggler model: lognormal sigma of a client's speed per round")
    seed: int | None = Field(None, ge=0, description="seed of the fault draws (null: the run seed)")

    @model_validator(mode="after")
    def _check(self) -> "FaultsConfig":
        total = self.crash + self.hang + self.garbage
        if total > 1:
            raise ConfigError(f"config keys 'faults.crash' + 'faults.hang' + 'faults.garbage' = {total:g}; "
                              f"expected at most 1 (they are exclusive per client and round)")
        if self.speed is not None and self.round_timeout is None:
            raise ConfigError("config key 'faults.speed': the straggler model needs a deadline; set "
                              "faults.round_timeout (seconds)")
        return self


class PrivacyConfig(Section):
    """Section ``privacy``: the benign clients' defense of their shared update against gradient leakage
    (``fedtrust.fl.update_privacy``: prune, clip, then noise Δ before it is sent). All off by default."""

    clip: float | None = Field(None, gt=0, description="L2 bound C on a client's update Δ (null: no clipping)")
    noise: float = Field(0.0, ge=0, description="std σ of the Gaussian noise added to each entry of Δ (with clip, "
                                                "σ = z·C for noise multiplier z; 0: none)")
    prune: float = Field(0.0, ge=0, lt=1, description="fraction of Δ's smallest-magnitude entries set to 0")
    seed: int | None = Field(None, ge=0, description="seed of the noise draws (null: the run seed)")


class InitFrom(Section):
    """Where a run's initial server weights come from (``init_from``); see ``fedtrust.runner.run``."""

    path: str = Field(min_length=1, description="run directory or checkpoint file; resolved to the checkpoint file")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                               description="SHA-256 of the checkpoint file; null: recorded when the run starts")


class RunConfig(Section):
    seed: int = Field(0, ge=0, description="seed of everything: init, partition, sampling, batches")
    rounds: int = Field(30, ge=1, description="communication rounds")
    executor: str = Field("auto", description="how clients run: auto (vectorized when possible and faster, see README), or `fedtrust list executor`")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:N, or auto")
    out: str | None = Field(None, description="run directory; null: a new folder under runs/")
    checkpoint_every: int = Field(1, ge=0, description="checkpoint every N rounds (0: only at the end)")
    init_from: InitFrom | None = Field(None, description="start from another run's final server weights: its run "
                                                         "directory or checkpoint file (resolved: {path, sha256})")
    data: DataConfig = Field(default_factory=DataConfig, description="data set, long tail and partition")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="client budgets: each client's "
                                                                           "maximum model width")
    model: ModelConfig = Field(default_factory=ModelConfig, description="architecture")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="federated algorithm")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="local training objective")
    train: TrainConfig = Field(default_factory=TrainConfig, description="client optimizer and local schedule")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation")
    attack: AttackConfig = Field(default_factory=AttackConfig, description="attack wrapping malicious clients")
    defense: DefenseConfig = Field(default_factory=DefenseConfig, description="server-side aggregation and "
                                                                              "reply validation")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="injected client faults and the "
                                                                         "straggler model (reliability tests)")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="client-side update defense "
                                                                            "against gradient leakage")

    @model_validator(mode="after")
    def _outliers(self) -> "RunConfig":
        from fedtrust.data.outliers import check_disjoint

        train_sources = outlier_sources(self.data.outliers)
        for name in train_sources:
            _outlier_source(name)
        if get("objective", self.objective.name).needs_outliers and self.data.outliers is None:
            raise ConfigError(f"objective {self.objective.name!r} needs outliers: set data.outliers "
                              f"(e.g. photos, openclipart; `fedtrust list outliers`)")
        check_disjoint(train_sources, self.eval.ood, self.data.dataset,
                       self.data.id_classes)
        return self

    @model_validator(mode="after")
    def _needs_source(self) -> "RunConfig":
        if self.init_from is not None:
            return self
        if self.eval.ood_model == "init_from":
            raise ConfigError("config key 'eval.ood_model': init_from scores OOD with the init_from model; set "
                              "init_from (a run directory or checkpoint)")
        for key in get("objective", self.objective.name).from_pretrained:
            if self.objective.params().get(key) == "pretrained":
                raise ConfigError(f"config key 'objective.{key}': 'pretrained' is measured on the init_from model "
                                  f"when the run starts; set init_from (or give a value)")
        return self

    @model_validator(mode="after")
    def _hang_on_flower(self) -> "RunConfig":
        f = self.faults
        if self.executor == "flower" and f.hang > 0 and (f.round_timeout is None or f.round_timeout >= f.hang_seconds):
            raise ConfigError(f"config key 'faults.hang' on executor=flower: a hanging node sleeps faults.hang_seconds="
                              f"{f.hang_seconds:g}; set faults.round_timeout below it so the server stops waiting")
        return self

    @field_validator("init_from", mode="before")
    @classmethod
    def _init_from(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"path": v}
        if v is not None and not isinstance(v, (dict, InitFrom)):
            raise ValueError("expected a run directory or checkpoint file path (or {path, sha256})")
        return v

    @field_validator("executor")
    @classmethod
    def _executor(cls, v: str) -> str:
        if v != "auto":
            get("executor", v)
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", v):
            raise ValueError("valid: cpu, cuda, cuda:N, mps, auto")
        return v


# ---------------------------------------------------------------- helpers


def outlier_sources(outliers: str | list[str] | None) -> list[str]:
    """``data.outliers`` as a list of source names (empty: none)."""
    if outliers is None:
        return []
    return [outliers] if isinstance(outliers, str) else list(outliers)


def _outlier_source(name: str) -> None:
    from fedtrust.data.outliers import get_source

    get_source(name)


def _check_params(kind: str, name: str, params_model: type[BaseModel], params: dict[str, Any]) -> None:
    try:
        params_model(**params)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            valid = ", ".join(["name", *params_model.model_fields]) or "name"
            raise ConfigError(f"unknown config key {_key(f'{kind}.{key}')} for {kind} {name!r}; "
                              f"valid: {valid}") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"config key {_key(f'{kind}.{key}')}: {msg} (got {err.get('input')!r})") from None


def _check_kwargs(kind: str, name: str, builder: Any, kwargs: dict[str, Any], skip: set[str]) -> None:
    sig = inspect.signature(builder)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        accepted = None
    else:
        accepted = [p for p in sig.parameters if p not in skip]
    for key in kwargs:
        if key in skip or (accepted is not None and key not in accepted):
            valid = ", ".join(["name", *(accepted or [])])
            raise ConfigError(f"unknown config key {_key(f'{kind}.{key}')} for {kind} {name!r}; "
                              f"valid: {valid}")


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the section that ``loc`` points into."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            break
        current = next((a for a in get_args(field.annotation) if hasattr(a, "model_fields")), field.annotation)
    return list(getattr(current, "model_fields", {}))


def _key(dotted: str) -> str:
    """A config key as error messages quote it: ``'data.alpha'``, with any control character escaped (a key
    read from YAML or the command line can hold a newline, and an error stays one line)."""
    return repr(dotted)


def format_validation_error(e: ValidationError, root: type[BaseModel] = RunConfig) -> str:
    """One line for the first error of a pydantic ValidationError."""
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if not isinstance(p, int) or True)
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        section = _key(".".join(str(p) for p in loc[:-1]))[1:-1] or "top level"  # escaped, unquoted
        return f"unknown config key {_key(key)}; valid keys at {section}: {', '.join(_valid_keys(root, loc))}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    return f"config key {_key(key)}: {msg} (got {got!r})" if key else f"config: {msg}"


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(t, "data.alpha", 0.1)`` sets ``t["data"]["alpha"]``."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override key {key!r} is malformed; expected dotted names like data.alpha=0.1")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"data.alpha=0.1"`` → ``("data.alpha", 0.1)``; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. rounds=10, data.alpha=0.1)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; a missing or malformed file is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; expected a YAML file (see configs/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def build_config(tree: dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Validate a config tree (from YAML) plus ``key=value`` overrides into a :class:`RunConfig`."""
    tree = _deep_copy(tree or {})
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    _check_finite(tree)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data (what ``config.yaml`` holds)."""
    return cfg.model_dump(mode="json", by_alias=True)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """File (optional) + overrides → validated config."""
    return build_config(load_yaml(path) if path else {}, overrides)


def _check_finite(tree: Any, where: str = "") -> None:
    """A NaN or infinite number is a one-line error: the resolved config (config.yaml, the Flower run
    config) is JSON-like and would silently turn it into null."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _check_finite(v, f"{where}[{i}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise ConfigError(f"config key {where!r}: {tree} is not allowed; use a finite number")


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def section_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) of every schema key, for the README's config reference."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{field.alias or name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append((key, None, field.description or ""))
            rows.extend(section_fields(ann, key + "."))
        else:
            rows.append((key, field.default, field.description or ""))
    return rows


__all__ = ["RunConfig", "build_config", "load_config", "config_to_dict", "names"]
