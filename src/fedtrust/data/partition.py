"""Client partitioners: split a training set's labels into per-client index arrays.

Every partitioner is registered with ``@register("partitioner", name)`` and has
the signature ``fn(labels, num_clients, rng, **params) -> list[np.ndarray]``.
It returns ``num_clients`` sorted ``int64`` index arrays into ``labels`` that are
disjoint and together cover every index exactly once (DESIGN principle 1: a
client is an index array into the in-memory training set).

``partition(labels, name, num_clients, seed, **params)`` is the entry point the
runner uses: it looks the partitioner up, checks its params, and seeds a fresh
``numpy.random.Generator`` from ``seed`` so a partition is reproducible.

A long-tailed federated set (FedLoGe §1, RNA §3) is built by applying a
partitioner to the subset kept by :func:`fedtrust.data.longtail.make_longtail`
and mapping the client indices back through that subset.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any

import numpy as np

from fedtrust.errors import ConfigError, DataError
from fedtrust.registry import get, register

logger = logging.getLogger(__name__)

Partitioner = Callable[..., list[np.ndarray]]

# Arguments every partitioner takes positionally; everything after them is a param.
_FIXED_ARGS = ("labels", "num_clients", "rng")


# --------------------------------------------------------------------------- helpers


def _check_inputs(labels: np.ndarray, num_clients: int) -> np.ndarray:
    """Validate ``labels`` (1-D, non-negative integers) and ``num_clients`` (≥ 1); return labels as int64."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise DataError(f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}")
    if labels.size and int(labels.min()) < 0:
        raise DataError(f"labels must be non-negative, got minimum {int(labels.min())}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer ≥ 1, got {num_clients!r}")
    return labels.astype(np.int64, copy=False)


def _parts_from_owner(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Turn ``owner[i]`` (the client of sample ``i``) into sorted int64 index arrays, one per client."""
    order = np.argsort(owner, kind="stable")  # stable: indices stay ascending within a client
    sizes = np.bincount(owner, minlength=num_clients)
    return [part.astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]


def label_histogram(parts: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-client label counts, an int64 array of shape ``(num_clients, num_classes)``."""
    labels = np.asarray(labels, dtype=np.int64)
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for k, part in enumerate(parts):
        hist[k] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)[:num_classes]
    return hist


# --------------------------------------------------------------------------- iid


@register("partitioner", "iid")
def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into ``num_clients`` near-equal parts (sizes differ by at most 1)."""
    labels = _check_inputs(labels, num_clients)
    if len(labels) < num_clients:
        raise DataError(f"iid partition needs at least one sample per client: {len(labels)} samples < {num_clients} clients")
    perm = rng.permutation(len(labels))
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_clients)]


# --------------------------------------------------------------------------- dirichlet


def _dirichlet_counts(class_sizes: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """One draw of the proportional cut: counts ``[num_clients, C]``.

    For each class c, p ~ Dir(alpha·1) over clients and the class's n_c samples
    are cut at ``floor(n_c · cumsum(p))`` (Hsu et al. 2019; Yurochkin et al. 2019).
    """
    counts = np.zeros((num_clients, len(class_sizes)), dtype=np.int64)
    for c, n_c in enumerate(class_sizes):
        if n_c == 0:
            continue
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.minimum((np.cumsum(p)[:-1] * n_c).astype(np.int64), n_c)
        counts[:, c] = np.diff(np.concatenate(([0], cuts, [n_c])))
    return counts


def _repair_min_size(counts: np.ndarray, min_size: int) -> np.ndarray:
    """Move samples from the largest clients to those below ``min_size`` (deterministic).

    Deficient clients are served in index order. Each move takes, from the
    currently largest client (lowest index on ties), samples of the class it
    holds most of, never leaving the donor below ``min_size``. Requires
    ``counts.sum() >= num_clients · min_size``, which makes a donor with
    surplus exist while any client is short, so the loop terminates.
    """
    counts = counts.copy()
    sizes = counts.sum(axis=1)
    for k in np.flatnonzero(sizes < min_size):
        while sizes[k] < min_size:
            donor = int(np.argmax(sizes))
            cls = int(np.argmax(counts[donor]))
            moved = int(min(min_size - sizes[k], sizes[donor] - min_size, counts[donor, cls]))
            counts[donor, cls] -= moved
            counts[k, cls] += moved
            sizes[donor] -= moved
            sizes[k] += moved
    return counts


def _assign_by_counts(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle each class's indices and hand client k the next ``counts[k, c]`` of them."""
    num_clients = counts.shape[0]
    owner = np.empty(len(labels), dtype=np.int64)
    for c in range(counts.shape[1]):
        idx_c = np.flatnonzero(labels == c)
        if idx_c.size:
            owner[rng.permutation(idx_c)] = np.repeat(np.arange(num_clients), counts[:, c])
    return _parts_from_owner(owner, num_clients)


@register("partitioner", "dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    alpha: float = 0.5,
    min_size: int = 10,
    max_redraws: int = 100,
) -> list[np.ndarray]:
    """Dirichlet label skew by the proportional cut (Hsu et al. 2019; Yurochkin et al. 2019).

    For each class c, draw p_c ~ Dir(alpha·1_K) over the K clients and cut the
    class's shuffled indices proportionally to p_c. Smaller ``alpha`` gives more
    skew. FedLoGe (spec fedloge.md §1) sends each sample to a client drawn from
    Categorical(p_c) instead; both give the same expected label shares.

    Minimum client size: the usual reference code redraws until every client
    holds ``min_size`` samples, which never ends for e.g. 1,000 clients with
    alpha 0.1 on MNIST. Here at most ``max_redraws`` draws are tried; if none
    meets ``min_size``, the last draw is repaired deterministically by moving
    samples from the largest clients to the deficient ones (``_repair_min_size``).
    The repair slightly flattens the largest clients' shares; it is logged.
    No per-client cap (the ``len < N/K`` trick of some codebases) is applied.
    """
    labels = _check_inputs(labels, num_clients)
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not (0 < alpha < float("inf")):
        raise ConfigError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    _check_int_param("dirichlet", "min_size", min_size, minimum=0)
    _check_int_param("dirichlet", "max_redraws", max_redraws, minimum=1)
    if num_clients * min_size > len(labels):
        raise DataError(
            f"dirichlet min_size={min_size} is infeasible: {num_clients} clients × {min_size} > {len(labels)} samples; "
            f"use min_size ≤ {len(labels) // num_clients} or fewer clients"
        )
    class_sizes = np.bincount(labels) if labels.size else np.zeros(0, dtype=np.int64)
    for _ in range(max_redraws):
        counts = _dirichlet_counts(class_sizes, num_clients, float(alpha), rng)
        if counts.sum(axis=1).min() >= min_size:
            break
    else:
        short = int((counts.sum(axis=1) < min_size).sum())
        logger.info(
            "dirichlet: %d of %d clients below min_size=%d after %d draws; repairing",
            short, num_clients, min_size, max_redraws,
        )
        counts = _repair_min_size(counts, min_size)
    return _assign_by_counts(labels, counts, rng)


def _check_int_param(partitioner: str, name: str, value: Any, minimum: int) -> None:
    """Raise a one-line ConfigError unless ``value`` is an integer ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{partitioner} {name} must be an integer ≥ {minimum}, got {value!r}")


# --------------------------------------------------------------------------- shards


def _shards_per_class(class_sizes: np.ndarray, num_shards: int) -> np.ndarray:
    """How many shards each class is cut into: one per present class, the rest by D'Hondt.

    Each further shard goes to the class whose shards would stay largest
    (max n_c / (m_c + 1)), so shard sizes stay as even as class purity allows
    and, with ``num_shards ≤ N``, no shard is empty.
    """
    shards = (class_sizes > 0).astype(np.int64)
    for _ in range(num_shards - int(shards.sum())):
        shards[int(np.argmax(class_sizes / (shards + 1)))] += 1
    return shards


@register("partitioner", "shards")
def shards(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, classes_per_client: int = 2
) -> list[np.ndarray]:
    """Pathological non-IID shards (McMahan et al. 2017, §3 "sort by digit label, 200 shards of 300").

    Samples are sorted by label and cut into ``num_clients · classes_per_client``
    shards; each client receives ``classes_per_client`` shards at random.
    Departure: McMahan's cut of the sorted array lets a shard straddle two
    classes when class sizes are not multiples of the shard size. Here each
    class is cut separately (``_shards_per_class``), so every shard holds one
    class and a client holds at most ``classes_per_client`` classes. With equal
    class sizes divisible by the shard size the two rules coincide. Within a
    class, which samples land in which shard is random.
    """
    labels = _check_inputs(labels, num_clients)
    _check_int_param("shards", "classes_per_client", classes_per_client, minimum=1)
    num_shards = num_clients * classes_per_client
    class_sizes = np.bincount(labels) if labels.size else np.zeros(0, dtype=np.int64)
    present = int((class_sizes > 0).sum())
    if len(labels) < num_shards:
        raise DataError(
            f"shards needs at least num_clients·classes_per_client = {num_shards} samples, got {len(labels)}; "
            f"use fewer clients or classes_per_client"
        )
    if present > num_shards:
        raise DataError(
            f"shards: {present} classes cannot fit in {num_shards} single-class shards "
            f"(num_clients·classes_per_client); use classes_per_client ≥ {-(-present // num_clients)}"
        )
    owner = np.empty(len(labels), dtype=np.int64)
    shard_owner = np.repeat(np.arange(num_clients), classes_per_client)[rng.permutation(num_shards)]
    next_shard = 0
    for c, m_c in enumerate(_shards_per_class(class_sizes, num_shards)):
        if m_c == 0:
            continue
        for piece in np.array_split(rng.permutation(np.flatnonzero(labels == c)), m_c):
            owner[piece] = shard_owner[next_shard]
            next_shard += 1
    return _parts_from_owner(owner, num_clients)


# --------------------------------------------------------------------------- domains


@register("partitioner", "domains")
def by_domain(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
              domain_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Each domain to a contiguous block of clients, split IID within it (Split-Mix spec §1, domain-major order).

    With D domains and N clients (N a multiple of D), domain d's samples go to
    clients d·N/D .. (d+1)·N/D − 1: a random permutation of them cut into
    near-equal parts (sizes differ by at most 1), as ``iid`` does. Client 0 is
    domain 0's first client, so ``blocks`` budgets give the narrowest width to
    the first domains, as in the paper. ``domain_ids`` (one per sample, ids
    0..D−1) is passed by the runner from the data set; D = its largest id + 1.

    Raises:
        ConfigError: no domain ids (a data set without domains) or N not a multiple of D.
        DataError: a domain with fewer samples than its clients.
    """
    labels = _check_inputs(labels, num_clients)
    if domain_ids is None:
        raise ConfigError("partitioner 'domains' needs a data set with domains (digits_domains, mnist_domains, "
                          "fashion_mnist_domains, fedbn_digits, domainnet)")
    domain_ids = np.asarray(domain_ids, dtype=np.int64)
    if domain_ids.shape != labels.shape:
        raise DataError(f"domains partition: {len(domain_ids)} domain ids for {len(labels)} samples")
    num_domains = int(domain_ids.max()) + 1 if domain_ids.size else 1
    if num_clients % num_domains:
        raise ConfigError(f"config key 'data.num_clients': partition 'domains' gives each of the {num_domains} "
                          f"domains an equal block of clients, so num_clients must be a multiple of {num_domains}, "
                          f"got {num_clients}")
    per = num_clients // num_domains
    owner = np.empty(len(labels), dtype=np.int64)
    for d in range(num_domains):
        idx = np.flatnonzero(domain_ids == d)
        if len(idx) < per:
            raise DataError(f"domains partition: domain {d} has {len(idx)} samples for its {per} clients; "
                            f"expected at least one per client")
        for j, part in enumerate(np.array_split(rng.permutation(idx), per)):
            owner[part] = d * per + j
    return _parts_from_owner(owner, num_clients)


def domain_histogram(parts: Sequence[np.ndarray], domain_ids: np.ndarray, num_domains: int) -> np.ndarray:
    """Per-client domain counts, an int64 array of shape ``(num_clients, num_domains)``."""
    return label_histogram(parts, domain_ids, num_domains)


# --------------------------------------------------------------------------- entry point


def partitioner_params(name: str) -> dict[str, Any]:
    """The params a registered partitioner accepts, with their defaults."""
    fn = get("partitioner", name)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.name not in _FIXED_ARGS
    }


def partition(
    labels: np.ndarray, name: str, num_clients: int, seed: int, **params: Any
) -> list[np.ndarray]:
    """Split ``labels`` over ``num_clients`` with the partitioner ``name``, reproducibly from ``seed``.

    Unknown ``params`` raise a one-line ConfigError listing the valid ones.
    The partitioner gets its own ``numpy.random.default_rng(seed)``.
    """
    fn: Partitioner = get("partitioner", name)
    valid = partitioner_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(
            f"partitioner {name!r} got unknown params {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"partition seed must be a non-negative integer, got {seed!r}")
    return fn(labels, num_clients, np.random.default_rng(seed), **params)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class PartitionStats:
    """JSON-able summary of a partition, saved with each run.

    ``label_hist[k][c]`` is client k's number of class-c samples;
    ``class_counts[c]`` sums it over clients.
    """

    num_clients: int
    num_classes: int
    sizes: list[int]
    label_hist: list[list[int]]
    class_counts: list[int]
    classes_per_client: list[int]

    @classmethod
    def from_parts(cls, parts: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> "PartitionStats":
        hist = label_histogram(parts, labels, num_classes)
        return cls(
            num_clients=len(parts),
            num_classes=int(num_classes),
            sizes=[int(s) for s in hist.sum(axis=1)],
            label_hist=hist.tolist(),
            class_counts=[int(s) for s in hist.sum(axis=0)],
            classes_per_client=[int(s) for s in (hist > 0).sum(axis=1)],
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def partition_stats(parts: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """:class:`PartitionStats` of ``parts`` as a plain dict (num_clients, sizes, label_hist, class_counts, ...)."""
    return PartitionStats.from_parts(parts, labels, num_classes).as_dict()
