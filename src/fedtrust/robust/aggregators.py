"""Byzantine-robust aggregators over flattened client updates, registered under the ``"aggregator"`` kind.

Every aggregator is a class with a frozen pydantic ``Params`` model and is
called as ``agg(updates, state, generator, root=None) -> (Aggregate, state)``:

* ``updates``: the round's :class:`~fedtrust.robust.types.Updates` (deltas, sample weights, ids);
* ``state``: the aggregator's own server-side tensors across rounds (FoolsGold's
  histories, centered clipping's previous aggregate); never mutated, a new dict is returned;
* ``generator``: the only source of randomness (norm clipping's and FLAME's noise);
* ``root``: the server's update on its root data set, (d,); only FLTrust reads it.

``Aggregate.delta`` is the (d,) update the server *adds* to the global weights.

Sample weights: aggregators built on the client mean (mean, geomedian,
centered clipping, norm clipping, RLR, FLAME) weight it by the sample weights,
which is the paper's rule when all clients hold as many samples. Order
statistics and selection rules (median, trimmed mean, Krum, Multi-Krum) and
score-weighted rules (FLTrust, FoolsGold) use their papers' weights and ignore
the sample weights: a Byzantine client can claim any ``num_examples``.

Metrics (JSON-able) always hold ``"weights"`` {client id: relative weight of
the client in the aggregate, summing to 1 (all 0 when nothing is aggregated)}
and ``"rejected"`` [ids with weight 0], plus the method's own scores.

==================  ===========================================================  ==============================
name                rule                                                         reference
==================  ===========================================================  ==============================
mean                Σ w_i Δ_i / Σ w_i                                            McMahan et al., AISTATS 2017
median              coordinate-wise median                                       Yin et al., ICML 2018
trimmed_mean        coordinate-wise mean after dropping k lowest and k highest   Yin et al., ICML 2018
krum                the update with least Σ of squared distances to n−f−2 NN     Blanchard et al., NeurIPS 2017
multikrum           mean of the m updates with the least Krum scores             Blanchard et al., NeurIPS 2017
geomedian           weighted geometric median, smoothed Weiszfeld (RFA)          Pillutla et al., IEEE TSP 2022
centered_clipping   v ← v + mean_i clip_τ(Δ_i − v), from last round's aggregate  Karimireddy et al., ICML 2021
norm_clipping       mean of norm-clipped updates + N(0, σ²)                      Sun et al., arXiv 2019
fltrust             ReLU-cosine trust to the root update, norms rescaled         Cao et al., NDSS 2021
foolsgold           down-weights clients with similar update histories           Fung et al., RAID 2020
rlr                 server lr −η on coordinates with weak sign agreement         Ozdayi et al., AAAI 2021
flame               HDBSCAN on cosine distances, median-norm clipping, noise     Nguyen et al., USENIX Sec 2022
==================  ===========================================================  ==============================
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from torch import Tensor

from fedtrust.errors import ConfigError, FedTrustError
from fedtrust.registry import get, register
from fedtrust.robust.types import Aggregate, Updates

# ---------------------------------------------------------------- shared helpers


def _whole_or_fraction(value: float) -> float:
    if value >= 1 and value != math.floor(value):
        raise ValueError(f"{value} is neither a fraction in [0, 1) nor a whole count >= 1")
    return value


FractionOrCount = Annotated[float, AfterValidator(_whole_or_fraction)]
"""A value in [0, 1) is a fraction of the n updates of the round; a whole number >= 1 is a count."""


def resolve_count(value: float, n: int) -> int:
    """``floor(value · n)`` for a fraction ``value`` in [0, 1), else ``int(value)`` (a count)."""
    return int(math.floor(value * n)) if value < 1 else int(value)


def _by_id(ids: tuple[int, ...], values: Tensor) -> dict[int, float]:
    return {cid: float(v) for cid, v in zip(ids, values.tolist())}


def _normalised(c: Tensor) -> Tensor:
    """``c / Σ c``, or zeros when the sum is 0."""
    total = c.sum()
    return c / total if float(total) > 0 else torch.zeros_like(c)


def _metrics(ids: tuple[int, ...], weights: Tensor, **extra: Any) -> dict[str, Any]:
    """The common metrics: relative weights by id, the ids with weight 0, then ``extra``."""
    return {"weights": _by_id(ids, weights), "rejected": [cid for cid, w in zip(ids, weights.tolist()) if w == 0],
            **extra}


def _combine(coefficients: Tensor, deltas: Tensor) -> Tensor:
    """Σ_i c_i Δ_i as one matrix-vector product in the deltas' dtype."""
    return coefficients.to(deltas.dtype) @ deltas


def _shares(updates: Updates) -> Tensor:
    """Sample-weight shares w_i / Σ w_j (float64)."""
    return updates.weights / updates.weights.sum()


def _row_norms(deltas: Tensor) -> Tensor:
    return torch.linalg.vector_norm(deltas, dim=1).double()


def _clip_scale(norms: Tensor, bound: float | Tensor) -> Tensor:
    """min(1, bound / ‖x‖) per row; a zero row keeps scale 1."""
    return torch.where(norms > bound, bound / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.ones_like(norms))


def _cosine_matrix(x: Tensor) -> Tensor:
    """(n, n) cosine similarities of the rows of ``x`` in float64; a zero row has cosine 0 with every row."""
    norms = _row_norms(x)
    unit = x.double() / norms.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    return (unit @ unit.T).clamp(-1.0, 1.0)


def _pairwise_sq_dists(x: Tensor) -> Tensor:
    """(n, n) squared Euclidean distances, computed directly (no ‖a‖²+‖b‖²−2ab cancellation)."""
    return torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0].double() ** 2


def _gaussian(d: int, std: float, generator: torch.Generator, like: Tensor) -> Tensor:
    """N(0, std² I_d) drawn from ``generator`` (on its device), returned on ``like``'s device and dtype."""
    noise = torch.randn(d, generator=generator, device=generator.device, dtype=torch.float64)
    return (std * noise).to(device=like.device, dtype=like.dtype)


def _check_root(root: Tensor | None, updates: Updates, name: str) -> Tensor:
    if root is None:
        raise ConfigError(f"aggregator {name!r} needs the server's root-data update (root=None); "
                          f"configure a root data set or choose another aggregator")
    if root.shape != (updates.d,) or not bool(torch.isfinite(root).all()):
        raise FedTrustError(f"root update must be a finite ({updates.d},) tensor; got shape {tuple(root.shape)}")
    return root


def _state_tensor(state: dict[str, Tensor], key: str, d: int, like: Tensor) -> Tensor | None:
    value = state.get(key)
    if value is None:
        return None
    if value.shape != (d,):
        raise FedTrustError(f"aggregator state {key!r} has shape {tuple(value.shape)}; expected ({d},)")
    return value.to(device=like.device, dtype=like.dtype)


class Aggregator:
    """Base class: subclasses set ``name``, ``Params`` and ``__call__``, and are registered with
    ``@register("aggregator", name)``."""

    name: ClassVar[str] = "base"
    needs_root: ClassVar[bool] = False
    """True when ``__call__`` needs the server's root-data update."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = self.Params() if params is None else params

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        raise NotImplementedError


def build_aggregator(name: str, params: dict[str, Any] | None = None) -> Aggregator:
    """The registered aggregator ``name`` with ``params`` validated by its ``Params`` model."""
    cls = get("aggregator", name)
    return cls(cls.Params(**(params or {})))


# ---------------------------------------------------------------- mean and order statistics


@register("aggregator", "mean")
class Mean(Aggregator):
    """Sample-weighted mean Σ_i w_i Δ_i / Σ_i w_i (FedAvg, McMahan et al. 2017, Alg. 1); not robust.

    With ``defense.uniform`` every w_i is 1: the plain mean (1/n)·Σ_i Δ_i (FLIP's server, spec flip.md §3,
    which ignores the sample counts)."""

    name = "mean"

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        shares = _shares(updates)
        return Aggregate(_combine(shares, updates.deltas), _metrics(updates.ids, shares)), dict(state)


def _coordinate_influence(indices: Tensor, rows: slice, n: int, per_row: float) -> Tensor:
    """Each client's share of the coordinates it enters, from the sort indices of the rows kept."""
    counts = torch.bincount(indices[rows].reshape(-1), minlength=n).double()
    return counts * per_row / indices.shape[1]


@register("aggregator", "median")
class Median(Aggregator):
    """Coordinate-wise median (Yin et al., ICML 2018, Def. "median-based GD"): for each j, med{Δ_{1j}, ..., Δ_{nj}}.

    For even n it is the mean of the two middle values (not the lower one).
    Sample weights are ignored. Metrics: ``weights`` = the share of coordinates
    at which a client's value enters the median (a middle value of an even n
    counts 1/2).
    """

    name = "median"

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        n = updates.n
        values, indices = updates.deltas.sort(dim=0)
        mid = slice(n // 2, n // 2 + 1) if n % 2 else slice(n // 2 - 1, n // 2 + 1)
        delta = values[mid].mean(dim=0)
        weights = _coordinate_influence(indices, mid, n, 1.0 / (mid.stop - mid.start))
        return Aggregate(delta, _metrics(updates.ids, weights)), dict(state)


@register("aggregator", "trimmed_mean")
class TrimmedMean(Aggregator):
    """Coordinate-wise β-trimmed mean (Yin et al., ICML 2018, Def. 2).

    For each coordinate j, the k = ⌊β·n⌋ largest and k smallest of
    Δ_{1j}, ..., Δ_{nj} are dropped and the remaining n − 2k averaged
    (``beta`` >= 1 is the count k itself). Needs 2k < n. Sample weights are
    ignored. Metrics: ``weights`` = the share of coordinates a client's value is
    kept at; ``trimmed`` = k.
    """

    name = "trimmed_mean"

    class Params(Aggregator.Params):
        beta: FractionOrCount = Field(0.1, ge=0, description="trimmed from EACH side per coordinate: "
                                      "a fraction β in [0, 1) of the n updates, or a whole count k >= 1")

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        n, k = updates.n, resolve_count(self.params.beta, updates.n)
        if 2 * k >= n:
            raise ConfigError(f"trimmed_mean trims k={k} from each side of n={n} updates; needs 2k < n (lower beta)")
        values, indices = updates.deltas.sort(dim=0)
        kept = slice(k, n - k)
        weights = _coordinate_influence(indices, kept, n, 1.0 / (n - 2 * k))
        return Aggregate(values[kept].mean(dim=0), _metrics(updates.ids, weights, trimmed=k)), dict(state)


# ---------------------------------------------------------------- Krum, Multi-Krum


@register("aggregator", "krum")
class Krum(Aggregator):
    """Krum (Blanchard et al., NeurIPS 2017, §4): the update with the least score
    s(i) = Σ_{i→j} ‖Δ_i − Δ_j‖², summed over the n − f − 2 updates closest to Δ_i.

    ``num_byzantine`` is f (a count, or a fraction of n, floored); Krum needs
    n > 2f + 2. Ties go to the lower row. Sample weights are ignored. Metrics:
    ``scores`` {id: s(i)}, ``selected`` [ids].
    """

    name = "krum"

    class Params(Aggregator.Params):
        num_byzantine: FractionOrCount = Field(0.0, ge=0, description="f, the Byzantine updates tolerated: "
                                               "a fraction in [0, 1) of the n updates (floored) or a whole count")

    def _num_selected(self, n: int, f: int) -> int:
        return 1

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        n, f = updates.n, resolve_count(self.params.num_byzantine, updates.n)
        if n <= 2 * f + 2:
            raise ConfigError(f"{self.name} with f={f} Byzantine updates needs n > 2f + 2 = {2 * f + 2} updates; got n={n}")
        m = self._num_selected(n, f)
        dists = _pairwise_sq_dists(updates.deltas)
        dists.fill_diagonal_(math.inf)
        scores = dists.topk(n - f - 2, dim=1, largest=False).values.sum(dim=1)
        selected = torch.sort(scores, stable=True).indices[:m]
        weights = torch.zeros(n, dtype=torch.float64, device=scores.device)
        weights[selected] = 1.0 / m
        metrics = _metrics(updates.ids, weights, scores=_by_id(updates.ids, scores),
                           selected=[updates.ids[i] for i in selected.tolist()])
        return Aggregate(updates.deltas[selected].mean(dim=0), metrics), dict(state)


@register("aggregator", "multikrum")
class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al., NeurIPS 2017, §4 "Multi-Krum"): the plain mean of the m updates with the
    least Krum scores s(i); m = 1 is Krum, m = n is the plain mean.

    GUESS (default m): ``m`` unset selects m = n − f, the honest count
    (El Mhamdi et al., ICML 2018 use the same).
    """

    name = "multikrum"

    class Params(Krum.Params):
        m: int | None = Field(None, ge=1, description="updates selected then averaged; null: n − f")

    def _num_selected(self, n: int, f: int) -> int:
        m = n - f if self.params.m is None else self.params.m
        if m > n:
            raise ConfigError(f"multikrum selects m={m} of only n={n} updates; needs m <= n")
        return m


# ---------------------------------------------------------------- geometric median (RFA)


@register("aggregator", "geomedian")
class GeoMedian(Aggregator):
    """Weighted geometric median argmin_z Σ_i α_i ‖z − Δ_i‖, α_i = w_i / Σ w_j, by the smoothed
    Weiszfeld algorithm (RFA: Pillutla, Kakade & Harchaoui, IEEE TSP 2022, Alg. 2):

        β_i ← α_i / max(ν, ‖v − Δ_i‖),   v ← Σ_i β_i Δ_i / Σ_i β_i       (``iters`` times, ν = ``eps``)

    GUESS (start, stopping): v starts at the weighted mean and runs exactly
    ``iters`` steps (no tolerance test, so no host sync per step). Metrics:
    ``weights`` = β_i / Σ β of the last step; ``objective`` = Σ α_i ‖v − Δ_i‖ at the result.
    """

    name = "geomedian"

    class Params(Aggregator.Params):
        iters: int = Field(10, ge=1, le=10_000, description="smoothed Weiszfeld iterations")
        eps: float = Field(1e-6, gt=0, description="smoothing ν: distances below ν count as ν (guards division by 0)")

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        deltas, alpha = updates.deltas, _shares(updates)
        v = _combine(alpha, deltas)
        beta = alpha
        for _ in range(self.params.iters):
            dist = torch.linalg.vector_norm(deltas - v, dim=1).double()
            beta = alpha / dist.clamp_min(self.params.eps)
            v = _combine(beta / beta.sum(), deltas)
        objective = float((alpha * torch.linalg.vector_norm(deltas - v, dim=1).double()).sum())
        metrics = _metrics(updates.ids, beta / beta.sum(), objective=objective)
        return Aggregate(v, metrics), dict(state)


# ---------------------------------------------------------------- clipping


@register("aggregator", "centered_clipping")
class CenteredClipping(Aggregator):
    """Centered clipping (Karimireddy, He & Jaggi, ICML 2021, Eq. (CC) / Alg. 2):

        v_{l+1} = v_l + Σ_i α_i (Δ_i − v_l) · min(1, τ / ‖Δ_i − v_l‖),   l = 0, ..., L − 1

    with L = ``iters``, τ = ``tau`` and v_0 the previous round's aggregate
    (``state["previous"]``, zero in the first round); the result is stored back
    as ``state["previous"]``. One outlier moves v by at most α_i·τ per step.

    GUESS (weights): α_i are the sample-weight shares (the paper's 1/n when
    clients hold as many samples). GUESS (τ default 1.0): the radius depends on
    the update scale (lr × local steps); tune it. Metrics: ``scale`` {id: min(1,
    τ/‖Δ_i − v‖)} of the last step, ``clipped`` [ids with scale < 1],
    ``weights`` = α_i·scale_i normalised.
    """

    name = "centered_clipping"

    class Params(Aggregator.Params):
        tau: float = Field(1.0, gt=0, description="clipping radius τ around the current centre v (update-norm units)")
        iters: int = Field(1, ge=1, le=1000, description="clipping iterations L per round (the paper uses 1)")

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        deltas, alpha = updates.deltas, _shares(updates)
        v = _state_tensor(state, "previous", updates.d, deltas)
        v = torch.zeros_like(deltas[0]) if v is None else v
        scale = torch.ones_like(alpha)
        for _ in range(self.params.iters):
            diff = deltas - v
            scale = _clip_scale(_row_norms(diff), self.params.tau)
            v = v + _combine(alpha * scale, diff)
        clipped = [cid for cid, s in zip(updates.ids, scale.tolist()) if s < 1]
        metrics = _metrics(updates.ids, _normalised(alpha * scale), scale=_by_id(updates.ids, scale), clipped=clipped)
        return Aggregate(v, metrics), {**state, "previous": v.detach().clone()}


@register("aggregator", "norm_clipping")
class NormClipping(Aggregator):
    """Norm clipping with weak DP noise (Sun et al., "Can you really backdoor federated learning?", 2019, §4):

        Δ = Σ_i α_i Δ_i / max(1, ‖Δ_i‖ / M) + N(0, σ² I),   α_i = w_i / Σ w_j

    with M = ``clip`` and σ = ``noise`` (the noise is drawn from ``generator``).
    Metrics: ``norms`` {id: ‖Δ_i‖}, ``clipped`` [ids], ``weights`` = α_i·min(1, M/‖Δ_i‖) normalised.
    """

    name = "norm_clipping"

    class Params(Aggregator.Params):
        clip: float = Field(1.0, gt=0, description="norm bound M: each update is scaled to norm <= M before the mean")
        noise: float = Field(0.0, ge=0, description="std σ of the Gaussian noise added to each coordinate of the mean")

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        norms = _row_norms(updates.deltas)
        coefficient = _shares(updates) * _clip_scale(norms, self.params.clip)
        delta = _combine(coefficient, updates.deltas)
        if self.params.noise > 0:
            delta = delta + _gaussian(updates.d, self.params.noise, generator, delta)
        clipped = [cid for cid, nrm in zip(updates.ids, norms.tolist()) if nrm > self.params.clip]
        metrics = _metrics(updates.ids, _normalised(coefficient), norms=_by_id(updates.ids, norms), clipped=clipped)
        return Aggregate(delta, metrics), dict(state)


# ---------------------------------------------------------------- trust and similarity


@register("aggregator", "fltrust")
class FLTrust(Aggregator):
    """FLTrust (Cao et al., NDSS 2021, §III-C, Eqs. (3)–(5)), with g_0 = ``root``, the server's update on its root data:

        TS_i = ReLU(cos(g_i, g_0)),   ḡ_i = ‖g_0‖ / ‖g_i‖ · g_i,   g = Σ_i TS_i ḡ_i / Σ_j TS_j

    An update with negative (or zero) cosine, or zero norm, gets trust 0.
    GUESS: when every TS_i is 0 the aggregate is the zero update. Sample weights
    are ignored. Metrics: ``trust`` {id: TS_i}, ``cosine`` {id}, ``weights`` = TS_i / Σ TS.
    """

    name = "fltrust"
    needs_root = True

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        g0 = _check_root(root, updates, self.name).to(updates.deltas)
        g0_norm = float(torch.linalg.vector_norm(g0.double()))
        norms = _row_norms(updates.deltas)
        tiny = torch.finfo(torch.float64).tiny
        cosine = (updates.deltas.double() @ g0.double()) / (norms * g0_norm).clamp_min(tiny)
        trust = cosine.clamp_min(0.0)
        weights = _normalised(trust)
        delta = _combine(weights * g0_norm / norms.clamp_min(tiny), updates.deltas)
        metrics = _metrics(updates.ids, weights, trust=_by_id(updates.ids, trust), cosine=_by_id(updates.ids, cosine))
        return Aggregate(delta, metrics), dict(state)


@register("aggregator", "foolsgold")
class FoolsGold(Aggregator):
    """FoolsGold (Fung, Yoon & Beschastnikh, RAID 2020, Alg. 1), on the clients' accumulated histories
    H_i = Σ_t Δ_{i,t} (``state["history/<id>"]``, l. 4–5):

        cs_ij = cos(H_i, H_j),  v_i = max_{j≠i} cs_ij                      (l. 8–9)
        cs_ij ← cs_ij · v_i / v_j  if v_j > v_i   (pardoning)              (l. 10–13)
        α_i = 1 − max_{j≠i} cs_ij, clipped to [0, 1];  α ← α / max_j α_j   (l. 14–16)
        α_i ← clip(κ · (ln(α_i / (1 − α_i)) + 0.5), 0, 1)                   (l. 17, κ = ``confidence``)

    Sybils sending the same direction get α ≈ 0. GUESS (logit at α = 1): α is
    capped at 0.99 before the logit, as in the authors' code. GUESS (update):
    Alg. 1 l. 18 adds Σ α_i Δ_i; we return the normalised Σ α_i Δ_i / Σ α_i so
    the step does not grow with n (zero when every α is 0). GUESS: no
    feature-importance weighting (the flat update has no output layer marked);
    pardoning only divides by v_j > 0. Sample weights are ignored.
    Metrics: ``alpha`` {id: α_i}, ``max_similarity`` {id: v_i}, ``weights`` = α_i / Σ α.
    """

    name = "foolsgold"

    class Params(Aggregator.Params):
        confidence: float = Field(1.0, gt=0, description="κ, the slope of the logit that maps α to a weight")

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        new_state = dict(state)
        histories = []
        for cid, delta in zip(updates.ids, updates.deltas):
            key = f"history/{cid}"
            old = _state_tensor(state, key, updates.d, delta)
            new_state[key] = (delta if old is None else old + delta).detach().clone()
            histories.append(new_state[key])
        alpha, v = self._alpha(torch.stack(histories))
        weights = _normalised(alpha)
        metrics = _metrics(updates.ids, weights, alpha=_by_id(updates.ids, alpha), max_similarity=_by_id(updates.ids, v))
        return Aggregate(_combine(weights, updates.deltas), metrics), new_state

    def _alpha(self, histories: Tensor) -> tuple[Tensor, Tensor]:
        n = histories.shape[0]
        if n == 1:
            one = torch.ones(1, dtype=torch.float64, device=histories.device)
            return one, torch.zeros_like(one)
        cs = _cosine_matrix(histories)
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=cs.device)
        v = cs.masked_fill(~off_diagonal, -math.inf).amax(dim=1)
        pardon = (v[None, :] > v[:, None]) & (v[None, :] > 0) & off_diagonal
        cs = torch.where(pardon, cs * v[:, None] / v[None, :].clamp_min(torch.finfo(torch.float64).tiny), cs)
        alpha = (1 - cs.masked_fill(~off_diagonal, -math.inf).amax(dim=1)).clamp(0.0, 1.0)
        alpha = _normalised_by_max(alpha).clamp_max(0.99)
        logit = torch.log(alpha) - torch.log1p(-alpha)  # −inf at α = 0, clipped to 0 below
        return (self.params.confidence * (logit + 0.5)).clamp(0.0, 1.0), v


def _normalised_by_max(x: Tensor) -> Tensor:
    top = x.max()
    return x / top if float(top) > 0 else torch.zeros_like(x)


# ---------------------------------------------------------------- sign agreement, clustering


@register("aggregator", "rlr")
class RobustLR(Aggregator):
    """Robust learning rate (Ozdayi, Kantarcioglu & Gel, AAAI 2021, Eq. (4)–(5)):

        η_j = η if |Σ_i sgn(Δ_{ij})| >= θ else −η,   Δ = η ⊙ Σ_i w_i Δ_i / Σ_i w_i

    per coordinate j, with η = ``lr`` and θ = ``threshold`` (a count of
    clients, or a fraction of n multiplied by n). sgn(0) = 0.
    GUESS (default θ = 0.4·n): the paper tunes θ to the number of attackers.
    Metrics: ``flipped_fraction`` (coordinates with −η), ``threshold`` θ, ``weights`` = sample shares.
    """

    name = "rlr"

    class Params(Aggregator.Params):
        threshold: FractionOrCount = Field(0.4, ge=0, description="θ: the least |Σ_i sign(Δ_ij)| for +lr on coordinate "
                                           "j; a fraction in [0, 1) of n (θ = fraction·n) or a whole count")
        lr: float = Field(1.0, gt=0, description="server learning rate η applied to the mean update")

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        p, n = self.params, updates.n
        theta = p.threshold * n if p.threshold < 1 else p.threshold
        agreement = torch.sign(updates.deltas).sum(dim=0).abs()
        lr = torch.where(agreement >= theta, p.lr, -p.lr).to(updates.deltas.dtype)
        shares = _shares(updates)
        delta = lr * _combine(shares, updates.deltas)
        flipped = float((lr < 0).double().mean()) if updates.d else 0.0
        return Aggregate(delta, _metrics(updates.ids, shares, flipped_fraction=flipped, threshold=theta)), dict(state)


@register("aggregator", "flame")
class Flame(Aggregator):
    """FLAME (Nguyen et al., USENIX Security 2022, Alg. 1):

        1. c_ij = 1 − cos(Δ_i, Δ_j); HDBSCAN(min_cluster_size = ⌊n/2⌋ + 1, min_samples = 1) on c (l. 4–6);
           the largest cluster is admitted, the others (noise) rejected;
        2. S = median_i ‖Δ_i‖ over all n updates (l. 8), admitted Δ_i ← Δ_i · min(1, S / ‖Δ_i‖) (l. 9–10);
        3. Δ = Σ_{admitted} w_i Δ_i / Σ w_i + N(0, (λ·S)² I), λ = ``noise_lambda`` (l. 11–13).

    GUESS (input): cosines of the updates, not of the local models (on whole
    models every cosine is ≈ 1). GUESS (mean): weighted by samples (the paper's
    plain mean for equal samples). GUESS (no cluster): if HDBSCAN labels every
    update noise, all are admitted (``no_cluster`` true) and still clipped and
    noised. S is the median of an even n as the mean of the middle two.
    Metrics: ``labels`` {id: cluster, −1 = noise}, ``admitted`` [ids],
    ``clip_bound`` S, ``noise_std`` λS, ``norms`` {id}, ``weights`` = admitted share × clip scale, normalised.
    """

    name = "flame"

    class Params(Aggregator.Params):
        noise_lambda: float = Field(0.001, ge=0, description="λ: the noise std is λ times the clipping bound S")

    def __call__(self, updates: Updates, state: dict[str, Tensor], generator: torch.Generator,
                 root: Tensor | None = None) -> tuple[Aggregate, dict[str, Tensor]]:
        labels = self._cluster(updates.deltas)
        clustered = labels[labels >= 0]
        no_cluster = clustered.size == 0
        admitted = np.ones_like(labels, dtype=bool) if no_cluster else labels == np.bincount(clustered).argmax()
        admitted_t = torch.as_tensor(admitted, device=updates.deltas.device)
        norms = _row_norms(updates.deltas)
        bound = torch.quantile(norms, 0.5)
        coefficient = _normalised(torch.where(admitted_t, updates.weights, 0.0)) * _clip_scale(norms, bound)
        delta = _combine(coefficient, updates.deltas)
        std = self.params.noise_lambda * float(bound)
        if std > 0:
            delta = delta + _gaussian(updates.d, std, generator, delta)
        metrics = _metrics(updates.ids, _normalised(coefficient),
                           labels={cid: int(lab) for cid, lab in zip(updates.ids, labels)},
                           admitted=[cid for cid, a in zip(updates.ids, admitted) if a],
                           no_cluster=bool(no_cluster), clip_bound=float(bound), noise_std=std,
                           norms=_by_id(updates.ids, norms))
        return Aggregate(delta, metrics), dict(state)

    @staticmethod
    def _cluster(deltas: Tensor) -> np.ndarray:
        """HDBSCAN labels of the updates on cosine distances (−1 = noise); one update is its own cluster."""
        from sklearn.cluster import HDBSCAN

        n = deltas.shape[0]
        if n < 2:
            return np.zeros(n, dtype=np.int64)
        distance = (1.0 - _cosine_matrix(deltas)).clamp(0.0, 2.0).cpu().numpy()
        distance = (distance + distance.T) / 2
        np.fill_diagonal(distance, 0.0)
        clusterer = HDBSCAN(metric="precomputed", min_cluster_size=n // 2 + 1, min_samples=1,
                            allow_single_cluster=True, copy=True)
        return clusterer.fit_predict(distance).astype(np.int64)
