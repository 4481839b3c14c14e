"""Build everything a run needs from a validated config: data, partition, model, algorithm.

This is the only place that turns config sections into objects; below it,
functions take typed arguments (STYLE.md, "Config is parsed once").
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtrust.data.augment import normalize
from fedtrust.data.budgets import assign_budgets
from fedtrust.data.class_subsets import select_classes
from fedtrust.data.datasets import load_dataset
from fedtrust.data.outliers import load_outliers
from fedtrust.data.longtail import cumulative_groups, make_longtail, shot_groups
from fedtrust.data.partition import domain_histogram, partition, partition_stats
from fedtrust.data.types import Dataset, ImageSet
from fedtrust.errors import ConfigError
from fedtrust.fl.context import AlgorithmContext, LocalSchedule
from fedtrust.fl.defense import Defense, RootUpdate, server_generator
from fedtrust.robust.aggregators import build_aggregator
from fedtrust.robust.attacks import Attack, build_attack
from fedtrust.robust.backdoor import REPLACE, replacement_scale
from fedtrust.robust.triggers import Stamper
from fedtrust.evaluation import EvalSetup, EvaluatesClients
from fedtrust.evaluation.evaluate import evaluators
from fedtrust.fl.executor import ClientData, Executor
from fedtrust.fl.faults import Faults
from fedtrust.fl.update_privacy import UpdatePrivacy
from fedtrust.fl.protocol import Algorithm, ClientContext, Message, OptimizerSpec
from fedtrust.fl.sampling import clients_per_round
from fedtrust.fl.schedule import lr_at
from fedtrust.fl.vectorized import executor_choice
from fedtrust.metrics.accuracy import local_test_indices
from fedtrust.models import create_model
from fedtrust.objectives import build_objective
from fedtrust.registry import get, names
from fedtrust.runner.config import RunConfig, outlier_sources

_LOCAL_TEST_STREAM = 3
_LONGTAIL_STREAM = 5
_BUDGET_STREAM = 7


@dataclass
class Federation:
    """A run's assembled parts."""

    config: RunConfig
    dataset: Dataset
    data: ClientData
    partition: dict[str, Any]
    algorithm: Algorithm
    executor: Executor
    eval_setup: EvalSetup
    device: torch.device
    executor_reason: str = ""
    """Why this executor runs: ``auto``'s reason, or that the config named it."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; an unavailable device is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {name!r} requested but CUDA is not available; use device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("config key 'device': 'mps' requested but not available; use device=cpu")
    return torch.device(name)


def resolve_data_root(root: str | None) -> Path:
    """``data.root``, else ``$FEDTRUST_DATA``, else ``./data``."""
    return Path(root or os.environ.get("FEDTRUST_DATA") or "data")


def build_partition(cfg: RunConfig, labels: np.ndarray, domain_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Split the (possibly long-tailed) training labels over the clients; ``domain_ids`` (one per sample, for a
    multi-domain set) go to partitioners that take them (``domains``)."""
    d = cfg.data
    fn = get("partitioner", d.partition)
    accepted = set(inspect.signature(fn).parameters)
    params = {k: getattr(d, k) for k in ("alpha", "min_size", "classes_per_client") if k in accepted}
    if "domain_ids" in accepted:
        params["domain_ids"] = domain_ids
    return partition(labels, d.partition, d.num_clients, partition_seed(cfg), **params)


def build_budgets(cfg: RunConfig) -> tuple[float, ...] | None:
    """Each client's maximum width (section ``budget``), None without budgets; seeded by (partition seed,
    stream 7), so a run's budgets follow its partition seed."""
    b = cfg.budget
    rng = np.random.default_rng([partition_seed(cfg), _BUDGET_STREAM])
    return assign_budgets(b.distribution, cfg.data.num_clients, b.widths, rng, sigma=b.sigma, median=b.median,
                          shuffle=b.shuffle)


def partition_seed(cfg: RunConfig) -> int:
    """``data.partition_seed``, else the run seed."""
    return cfg.data.partition_seed if cfg.data.partition_seed is not None else cfg.seed


def build_dataset(cfg: RunConfig) -> Dataset:
    """The data set, cut to ``data.id_classes`` (relabelled 0..k−1 in that order) when set.

    The cut comes first, so the long tail, partition, model, metrics and report all see k classes.
    """
    dataset = load_dataset(cfg.data.dataset, resolve_data_root(cfg.data.root), **cfg.data.dataset_params)
    ids = cfg.data.id_classes
    if ids is None:
        return dataset
    bad = [c for c in ids if not 0 <= c < dataset.num_classes]
    if bad:
        raise ConfigError(f"config key 'data.id_classes': class {bad[0]} is out of range for {dataset.name}; "
                          f"valid: 0..{dataset.num_classes - 1} (got {ids})")
    return select_classes(dataset, ids)


def build_longtail(cfg: RunConfig, labels: np.ndarray, num_classes: int) -> np.ndarray | None:
    """Sorted indices of the long-tailed training subset (``data.imbalance_ratio`` > 1), else None.

    ``data.longtail_order``: ``first`` keeps the first n_c images of each class in file order (RNA's
    code, spec rna.md §3); ``random`` draws them from a generator seeded by (partition seed, stream 5),
    as FedLoGe's code shuffles each class before taking n_c.
    """
    if cfg.data.imbalance_ratio <= 1:
        return None
    rng = None
    if cfg.data.longtail_order == "random":
        rng = np.random.default_rng([partition_seed(cfg), _LONGTAIL_STREAM])
    return make_longtail(labels, num_classes, cfg.data.imbalance_ratio, rng=rng, order=cfg.data.longtail_order)


def build_normalize(kind: str, dataset: Dataset) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images → model input, for training and evaluation alike (``data.normalize``).

    ``dataset``: scale to [0, 1], then standardise with the data set's per-channel mean/std.
    ``none``: scale to [0, 1] only (ToTensor, as RNA's CIFAR code, spec rna.md §1).
    """
    if kind == "none":
        channels = dataset.shape[0]
        return functools.partial(normalize, mean=(0.0,) * channels, std=(1.0,) * channels)
    if kind == "dataset":
        return functools.partial(normalize, mean=dataset.mean, std=dataset.std)
    raise ConfigError(f"config key 'data.normalize': unknown {kind!r}; valid: dataset, none")


def _local_test_cells(label_hist: np.ndarray, parts: list[np.ndarray], labels: np.ndarray,
                      domain_ids: np.ndarray | None, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """What personalized evaluation matches a client's local test set on: its label histogram, or on a
    multi-domain set its (domain, class) histogram, so a client is scored on its own domain's test images
    (Split-Mix spec §1 "Test data", FedBN's local evaluation); cell = domain · C + class."""
    test = dataset.test
    if domain_ids is None or test.domains is None:
        return label_hist, test.y.cpu().numpy()
    k, cells = dataset.num_classes, len(dataset.train.domain_names) * dataset.num_classes
    train_cells = domain_ids * k + labels
    hist = np.stack([np.bincount(train_cells[p], minlength=cells) for p in parts])
    return hist, test.domains.cpu().numpy() * k + test.y.cpu().numpy()


def build_federation(cfg: RunConfig) -> Federation:
    """Load data, make it long-tailed if asked, partition it, and build the algorithm and executor."""
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg)
    train = dataset.train
    keep = build_longtail(cfg, train.y.numpy(), dataset.num_classes)
    if keep is not None:
        train = train.subset(torch.from_numpy(keep))
    train, root_set = hold_out_root(train, cfg.defense.root_size, cfg.seed)
    labels = train.y.numpy()
    domain_ids = train.domains.numpy() if train.domains is not None else None
    parts = build_partition(cfg, labels, domain_ids)
    stats = partition_stats(parts, labels, dataset.num_classes)
    class_counts = np.asarray(stats["class_counts"])
    stats.update(partition=cfg.data.partition, groups=shot_groups(class_counts),
                 hmt=cumulative_groups(class_counts))
    if domain_ids is not None:
        stats.update(domain_names=list(train.domain_names),
                     domain_hist=domain_histogram(parts, domain_ids, len(train.domain_names)).tolist())

    train, test = train.to(device), dataset.test.to(device)
    data = ClientData(train, [torch.from_numpy(p).to(device) for p in parts])
    norm = build_normalize(cfg.data.normalize, dataset)
    local_test = None
    if cfg.eval.personalized:
        rng = np.random.default_rng([cfg.seed, _LOCAL_TEST_STREAM])
        local = local_test_indices(*_local_test_cells(np.asarray(stats["label_hist"]), parts, labels, domain_ids,
                                                          dataset), rng)
        local_test = [torch.from_numpy(i).to(device) for i in local]
    root = resolve_data_root(cfg.data.root)
    ood_sets = {name: load_outliers(name, dataset.shape, cfg.eval.num_ood, cfg.seed, root).to(device)
                for name in cfg.eval.ood}
    attack = build_run_attack(cfg, dataset.num_classes)
    eval_setup = EvalSetup(test, norm, stats["groups"], stats["hmt"], local_test, cfg.eval.batch_size,
                           ood_sets=ood_sets, scores=tuple(cfg.eval.scores), metrics=tuple(cfg.eval.metrics),
                           backdoor=backdoor_test(attack, test), reject_tau=cfg.eval.reject_tau,
                           leakage_probes=cfg.eval.leakage_probes, leakage_sigma=cfg.eval.leakage_sigma,
                           robust=cfg.eval.robust)
    outliers = None
    sources = outlier_sources(cfg.data.outliers)
    if sources:  # a list: the union, num_outliers split evenly (the first sources take the remainder)
        n, k = divmod(cfg.data.num_outliers, len(sources))
        outliers = torch.cat([load_outliers(name, dataset.shape, n + (i < k), cfg.seed, root)
                              for i, name in enumerate(sources)]).to(device)

    for evaluator in evaluators(eval_setup.metrics):
        evaluator.check(eval_setup)  # e.g. domain_acc on a set without domains: fail before any round
    algorithm = build_algorithm(cfg, dataset, torch.as_tensor(class_counts), norm, device, outliers)
    stats["budgets"] = None if algorithm.ctx.budgets is None else list(algorithm.ctx.budgets)
    if root_set is not None:
        algorithm.ctx.defense.root = root_trainer(algorithm, root_set.to(device), cfg.seed, device)
    k = clients_per_round(cfg.data.clients_per_round, cfg.data.num_clients)
    name, reason = (executor_choice(algorithm, k, device, dataset.shape) if cfg.executor == "auto"
                    else (cfg.executor, "set in the config"))
    executor_cls = get("executor", name)
    extra = {"config": cfg} if "config" in inspect.signature(executor_cls).parameters else {}
    executor = executor_cls(algorithm, data, cfg.seed, device, k, attack=attack,
                            sampler=get("sampler", cfg.data.sampler), faults=build_faults(cfg, data), **extra)
    executor.runtime.privacy = build_privacy(cfg)
    if isinstance(executor, EvaluatesClients):  # client state kept off the server (Flower): scored where it lives
        eval_setup.client_evaluator = executor.evaluate_clients
    return Federation(cfg, dataset, data, stats, algorithm, executor, eval_setup, device,
                      f"auto: {reason}" if cfg.executor == "auto" else reason)


def build_faults(cfg: RunConfig, data: ClientData) -> Faults | None:
    """The ``faults`` section as a :class:`~fedtrust.fl.faults.Faults` schedule (None when all off); the
    straggler model's work is the examples a client's local training visits in a round."""
    f, t = cfg.faults, cfg.train
    sizes = [len(i) for i in data.indices]

    def work(client: int) -> float:
        return float(t.steps * t.batch_size if t.steps is not None else t.epochs * sizes[client])

    faults = Faults(f.seed if f.seed is not None else cfg.seed, f.crash, f.hang, f.garbage, tuple(f.garbage_kinds),
                    f.hang_seconds, f.round_timeout, f.speed, f.speed_sigma, work)
    return faults if faults.active else None


def build_privacy(cfg: RunConfig) -> UpdatePrivacy | None:
    """The ``privacy`` section as the clients' :class:`~fedtrust.fl.update_privacy.UpdatePrivacy` (None when off)."""
    p = cfg.privacy
    privacy = UpdatePrivacy(p.clip, p.noise, p.prune, p.seed if p.seed is not None else cfg.seed)
    return privacy if privacy.active else None


def build_algorithm(cfg: RunConfig, dataset: Dataset, class_counts: torch.Tensor, norm: Any,
                    device: torch.device, outliers: torch.Tensor | None = None) -> Algorithm:
    """The configured algorithm with its context (model factory, objective, schedule)."""
    t = cfg.train
    model_kwargs = cfg.model.params()

    objective = build_objective(cfg.objective.name, cfg.objective.params(), dataset.num_classes, class_counts, norm)

    def new_model(**overrides: Any) -> torch.nn.Module:
        return objective.wrap_model(create_model(cfg.model.name, dataset.num_classes, dataset.shape,
                                                 **{**model_kwargs, **overrides}))

    augment = dataset.augment if cfg.data.augment == "auto" else cfg.data.augment
    schedule = LocalSchedule(
        optimizer=OptimizerSpec(name=t.optimizer, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                nesterov=t.nesterov, betas=tuple(t.betas)),
        batch_size=t.batch_size, epochs=t.epochs, steps=t.steps, augment=augment, drop_last=t.drop_last,
        outlier_ratio=t.outlier_ratio, keep_optimizer=t.keep_optimizer,
        trainable=None if t.trainable is None else tuple(t.trainable))
    lr = functools.partial(lr_at, rounds=cfg.rounds, base=t.lr, schedule=t.lr_schedule, lr_min=t.lr_min,
                           step_rounds=t.lr_step_rounds, gamma=t.lr_gamma)
    ctx = AlgorithmContext(new_model=new_model, num_classes=dataset.num_classes, class_counts=class_counts,
                           objective=objective, schedule=schedule, lr=lr, normalize=norm, device=device,
                           seed=cfg.seed, outliers=outliers, defense=build_defense(cfg), budgets=build_budgets(cfg))
    cls = get("algorithm", cfg.algorithm.name)
    for option, value in (("keep_optimizer", t.keep_optimizer), ("trainable", t.trainable)):
        if value and not cls.supports(option):
            able = ", ".join(n for n in names("algorithm") if get("algorithm", n).supports(option))
            raise ConfigError(f"train.{option} is not supported by algorithm {cfg.algorithm.name!r}; "
                              f"algorithms that support it: {able}")
    params = cls.Params(**cfg.algorithm.params())
    if getattr(params, "bn_aggregation", "mean") == "pooled" and cfg.defense.aggregator != "mean":
        raise ConfigError(f"algorithm.bn_aggregation=pooled pools BN moments by the mean; it cannot combine with "
                          f"defense.aggregator={cfg.defense.aggregator!r} (use bn_aggregation=mean)")
    algorithm = cls(params, ctx)
    if t.trainable is not None:
        algorithm.trainable  # noqa: B018  (a pattern that matches nothing fails here, before any round)
    return algorithm


_ROOT_STREAM = 9


def build_defense(cfg: RunConfig) -> Defense:
    """The ``defense`` section as the server's :class:`~fedtrust.fl.defense.Defense`."""
    d = cfg.defense
    return Defense(aggregator=build_aggregator(d.aggregator, d.params()), server_lr=d.server_lr,
                   uniform=d.uniform, max_update_norm=d.max_update_norm, min_replies=d.min_replies, seed=cfg.seed)


def asr_trigger(attack: Attack | None, image_shape: tuple[int, ...]) -> tuple[Stamper, int] | None:
    """The full trigger a backdoor attack's ASR stamps on test images of ``image_shape`` (C, H, W), and its
    target class; None without a backdoor attack."""
    if attack is None or not hasattr(attack, "test_trigger"):
        return None
    return attack.test_trigger(image_shape), attack.params.target


def backdoor_test(attack: Attack | None, test: ImageSet) -> tuple[torch.Tensor, int] | None:
    """The ASR test set of a backdoor attack: non-target test images stamped with its full trigger."""
    full = asr_trigger(attack, test.shape)
    if full is None:
        return None
    trigger, target = full
    keep = test.y != target
    return trigger.stamp(test.x[keep]), target


def build_run_attack(cfg: RunConfig, num_classes: int) -> Attack | None:
    """The ``attack`` section as an :class:`~fedtrust.robust.attacks.Attack` (None without one)."""
    a = cfg.attack
    if a.name is None:
        return None
    params = a.params()
    if params.get("scale") == REPLACE:  # the backdoor's model replacement at this run's n and η
        n = clients_per_round(cfg.data.clients_per_round, cfg.data.num_clients)
        params["scale"] = replacement_scale(n, cfg.defense.server_lr)
    return build_attack(a.name, params, ids=a.ids, fraction=a.fraction, rounds=a.rounds, first=a.start,
                        last=a.to, num_clients=cfg.data.num_clients, num_classes=num_classes, seed=cfg.seed,
                        force=a.force, schedule=a.schedule)


def hold_out_root(train: ImageSet, size: int, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """``(clients' training set, the server's root set)``: ``size`` samples drawn from the run seed are
    held out for the server (FLTrust's root data set, Cao et al. 2021 §3); none when ``size`` is 0."""
    if size == 0:
        return train, None
    if size >= len(train):
        raise ConfigError(f"config key 'defense.root_size': {size} leaves no training data "
                          f"(the training set has {len(train)} samples)")
    perm = torch.from_numpy(np.random.default_rng([seed, _ROOT_STREAM]).permutation(len(train)))
    return train.subset(perm[size:].sort().values), train.subset(perm[:size].sort().values)


ROOT_CLIENT = -1
"""The client id of the server's own training on its root data (never a real client)."""


def root_trainer(algorithm: Algorithm, root: ImageSet, seed: int, device: torch.device) -> RootUpdate:
    """``root(state, round) -> reply``: the server trains the algorithm's client update on its root
    data from the current global state (FLTrust's server model update g_0, Cao et al. 2021 Alg. 1)."""

    def root_update(state: Message, round: int) -> Message:
        message = algorithm.configure(state, round, [ROOT_CLIENT])[ROOT_CLIENT]
        ctx = ClientContext(ROOT_CLIENT, round, server_generator(seed, round, _ROOT_STREAM), device)
        return algorithm.client_update(message, root, Message(), ctx)[0].to("cpu")  # messages live on the CPU

    return root_update
