"""Long-tail and OOD-aware local objectives (specs/rna.md §1, §5), registered under ``"objective"``.

=================  ======================================================  ========  =====
name               loss                                                    outliers  views
=================  ======================================================  ========  =====
la                 CE(f + τ·log π, y)                                      no        1
oe                 CE + 0.5·CE(f_out, uniform)                             yes       1
energy_oe          CE + 0.1·(relu(E_in − m_in)² + relu(m_out − E_out)²)    yes       1
oecc               CE + λ1·Σ_in (conf − A_tr)² + λ2·Σ_out ‖p − 1/K‖₁         yes       1
rna                LA + λ·L_RNA on ID rows of one joint ID+OOD pass        yes       1
rna_no_outliers    the same on ID-only batches (spec §7.4 ablation)        no        1
pascl              CE(2 views) + 0.5·OE + λ2·tail SupCon (stage 1)         yes       2
bel                CE + 0.1·(relu(E_in − m_in)² + weighted balanced out)   yes       1
=================  ======================================================  ========  =====

Batch contract: ``batch["x"]`` normalised float ID images, ``batch["y"]``
labels; ``batch["x_ood"]`` normalised float outliers when ``needs_outliers``;
``batch["x2"]`` a second augmentation of the same ID images when
``num_views == 2``. Every objective with outliers forwards ``cat(x, x_ood)``
**once** in train mode, as the reference codes (OE, EnergyOE, PASCL, BEL, RNA)
do, so BN normalises with the joint batch statistics.

All losses are written for ``torch.func`` (``functional_call``, ``grad``,
``vmap``): no in-place ops on parameters, no ``.item()``, no Python branching
on tensor values (masks instead of boolean indexing). Training-accuracy
estimates and priors derived from the batch are detached tensors.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fedtrust.errors import ConfigError
from fedtrust.models.base import FedModel
from fedtrust.models.heads import PROJECTION_DIM, ProjectionWrapper
from fedtrust.objectives import Objective
from fedtrust.registry import register

# ---------------------------------------------------------------- shared terms


def log_prior(class_counts: Tensor, like: Tensor) -> Tensor:
    """``log π_c`` with ``π_c = n_c / N`` on ``like``'s device and dtype; empty classes count as 1 (no −inf)."""
    counts = class_counts.to(device=like.device, dtype=like.dtype).clamp_min(1.0)
    return torch.log(counts / counts.sum())


def logit_adjusted_ce(logits: Tensor, y: Tensor, log_pi: Tensor, tau: float) -> Tensor:
    """Logit-adjusted CE ``CE(f + τ·log π, y)`` (Menon et al., ICLR 2021; spec rna.md §1)."""
    return F.cross_entropy(logits + tau * log_pi, y)


def uniform_ce(logits: Tensor) -> Tensor:
    """Per-sample CE to the uniform distribution, ``−(mean_k f_k − logsumexp_k f_k)`` (OE, spec §5).

    Its minimum, ``log K``, is reached at constant logits (uniform softmax).
    """
    return torch.logsumexp(logits, dim=1) - logits.mean(dim=1)


def free_energy(logits: Tensor) -> Tensor:
    """Per-sample free energy ``E(x) = −logsumexp_k f_k(x)`` (Liu et al., NeurIPS 2020; spec rna.md §5)."""
    return -torch.logsumexp(logits, dim=1)


def energy_hinge(e_in: Tensor, e_out: Tensor, m_in: float, m_out: float, w_out: Tensor | None = None) -> Tensor:
    """``mean relu(E_in − m_in)² + Σ w·relu(m_out − E_out)² / Σ w`` (spec rna.md §5 EnergyOE and BEL; uniform w by default)."""
    in_term = F.relu(e_in - m_in).pow(2).mean()
    out_sq = F.relu(m_out - e_out).pow(2)
    out_term = out_sq.mean() if w_out is None else (w_out * out_sq).sum() / w_out.sum()
    return in_term + out_term


def joint_forward(model: nn.Module, x: Tensor, x_ood: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(z_id, logits_id, z_ood, logits_ood)`` from **one** forward of ``cat(x, x_ood)``.

    In train mode BN normalises with the joint batch statistics and its running
    statistics track the ID+OOD mixture (spec rna.md §1).
    """
    n = x.shape[0]
    z, logits = model.forward_features_and_logits(torch.cat([x, x_ood]))
    return z[:n], logits[:n], z[n:], logits[n:]


def _need(batch: dict[str, Tensor], key: str, objective: str) -> Tensor:
    if key not in batch:
        raise ConfigError(f"objective {objective!r} needs batch[{key!r}]; the trainer did not provide it")
    return batch[key]


def _projection(model: nn.Module, objective: str) -> nn.Module:
    head = getattr(model, "projection", None)
    if head is None:
        raise ConfigError(f"objective {objective!r} needs a model with a projection head: build it via wrap_model")
    return head


def _wrap(model: nn.Module, out_dim: int) -> nn.Module:
    if isinstance(model, ProjectionWrapper):
        return model
    if not isinstance(model, FedModel):
        raise ConfigError(f"a projection head needs a FedModel backbone, got {type(model).__name__}")
    return ProjectionWrapper(model, out_dim)


def _tau_field() -> Any:
    return Field(1.0, ge=0.0, description="logit-adjustment strength τ in CE(f + τ·log π, y); 0 = plain CE")


# ---------------------------------------------------------------- LA


@register("objective", "la")
class LogitAdjusted(Objective):
    """Logit adjustment (Menon et al., ICLR 2021; spec rna.md §1): ``CE(f(x) + τ·log π, y)``; prediction uses raw logits.

    ``π_c = n_c / N`` comes from ``self.class_counts`` (the global training
    counts in FL, spec §8 variant A).
    """

    name = "la"

    class Params(Objective.Params):
        tau: float = _tau_field()

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = model(batch["x"])
        return logit_adjusted_ce(logits, batch["y"], log_prior(self.class_counts, logits), self.params.tau)


# ---------------------------------------------------------------- OE, EnergyOE, OECC


@register("objective", "oe")
class OutlierExposure(Objective):
    """OE (Hendrycks et al., ICLR 2019): ``CE(f(x), y) + w·mean_out CE(f(x_out), U)`` with w = 0.5 (spec §5).

    Score it with MSP.
    """

    name = "oe"
    needs_outliers = True

    class Params(Objective.Params):
        weight: float = Field(0.5, ge=0.0, description="weight of the CE-to-uniform term on outliers")

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        _, logits_id, _, logits_ood = joint_forward(model, batch["x"], _need(batch, "x_ood", self.name))
        return F.cross_entropy(logits_id, batch["y"]) + self.params.weight * uniform_ce(logits_ood).mean()


@register("objective", "energy_oe")
class EnergyOE(Objective):
    """Energy-bounded fine-tuning (Liu et al., NeurIPS 2020), BEL-repo defaults (spec rna.md §5).

    ``CE + w·(mean relu(E_in − m_in)² + mean relu(m_out − E_out)²)``, ``E = −logsumexp f``.
    Score it with the energy score.
    """

    name = "energy_oe"
    needs_outliers = True

    class Params(Objective.Params):
        m_in: float = Field(-25.0, description="ID energy margin: E_in above m_in is penalised")
        m_out: float = Field(-7.0, description="OOD energy margin: E_out below m_out is penalised")
        weight: float = Field(0.1, ge=0.0, description="weight of the squared-hinge energy terms")

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        p = self.params
        _, logits_id, _, logits_ood = joint_forward(model, batch["x"], _need(batch, "x_ood", self.name))
        reg = energy_hinge(free_energy(logits_id), free_energy(logits_ood), p.m_in, p.m_out)
        return F.cross_entropy(logits_id, batch["y"]) + p.weight * reg


PRETRAINED = "pretrained"


def _unresolved(objective: str, key: str) -> ConfigError:
    return ConfigError(f"objective {objective!r}: {key}='pretrained' is measured on the init_from model when a run "
                       f"starts; set init_from (or give a number)")


@register("objective", "oecc")
class OECC(Objective):
    """OE with confidence control (Papadopoulos et al., Neurocomputing 2021), the official code's loss (spec rna.md §5).

    ``CE + λ1·Σ_id (max_k p_k − A_tr)² + λ2·Σ_ood Σ_k |p_k − 1/K|``, CE the batch mean, both regularisers
    **summed** over the batch as the official notebook (``OECC_tune_cifar.ipynb``) does, so λ1 = 0.07 and
    λ2 = 0.05 are the values tuned there for its batch sizes (128 ID, 256 outliers); with other batch sizes
    the terms' weight relative to CE changes with them, as in that code. (The paper writes the ID term as
    ``|A_tr − mean max p|``; a mean form would need λ1·B_id and λ2·B_ood to match the sums.) Score: MSP.

    ``A_tr`` is the training accuracy of the pretrained model OECC fine-tunes: ``train_accuracy:
    pretrained`` measures it on the ``init_from`` model over the training set when the run starts (and
    records the number). With ``train_accuracy`` null, GUESS: the detached accuracy of the current ID
    batch, for OECC trained from scratch.
    """

    name = "oecc"
    needs_outliers = True
    from_pretrained = ("train_accuracy",)

    class Params(Objective.Params):
        lambda1: float = Field(0.07, ge=0.0, description="λ1, weight of Σ_id (max p − A_tr)²")
        lambda2: float = Field(0.05, ge=0.0, description="λ2, weight of Σ_ood Σ_k |p_k − 1/K|")
        train_accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["pretrained"] | None = Field(
            None, description="A_tr: a number, 'pretrained' (the init_from model's training "
                                              "accuracy), or null (detached accuracy of the ID batch, GUESS)")

    def pretrained_values(self, train_logits: Tensor, train_labels: Tensor,
                          outlier_logits: Tensor | None) -> dict[str, Any]:
        if self.params.train_accuracy != PRETRAINED:
            return {}
        return {"train_accuracy": float((train_logits.argmax(1) == train_labels).double().mean())}

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        p = self.params
        y = batch["y"]
        _, logits_id, _, logits_ood = joint_forward(model, batch["x"], _need(batch, "x_ood", self.name))
        if p.train_accuracy == PRETRAINED:
            raise _unresolved(self.name, "train_accuracy")
        if p.train_accuracy is None:
            a_tr = (logits_id.argmax(dim=1) == y).to(logits_id.dtype).mean().detach()
        else:
            a_tr = torch.tensor(p.train_accuracy, dtype=logits_id.dtype, device=logits_id.device)
        conf_term = (torch.softmax(logits_id, dim=1).amax(dim=1) - a_tr).pow(2).sum()
        k = logits_ood.shape[1]
        unif_term = torch.abs(torch.softmax(logits_ood, dim=1) - 1.0 / k).sum()
        return F.cross_entropy(logits_id, y) + p.lambda1 * conf_term + p.lambda2 * unif_term


# ---------------------------------------------------------------- RNA


@register("objective", "rna")
class RNA(Objective):
    """Representation-norm amplification (Shin & Chung, TMLR 2024; spec rna.md §1).

    ``L = CE(f(x_id) + τ·log π, y) + λ·L_RNA``, ``L_RNA = −mean_i log(1 + ||h(z_i)||₂)``
    over the ID rows only, where ``h`` is the projection head
    (Linear(d,d)–ReLU–Linear(d,128), not normalised) added by :meth:`wrap_model`.
    ``z`` comes from ONE train-mode forward of ``cat(x_id, x_ood)``: outliers
    enter only through the BN batch statistics (and the running statistics
    the RN score later uses); their logits and ``z`` are discarded.
    Score it with ``rn`` (``||z||₂``).
    """

    name = "rna"
    needs_outliers = True

    class Params(Objective.Params):
        tau: float = _tau_field()
        weight: float = Field(0.5, ge=0.0, description="λ, weight of L_RNA (code default 0.5)")
        proj_dim: int = Field(PROJECTION_DIM, ge=1, description="output width of the projection head h")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """``model`` with the projection head ``h`` attached (:class:`~fedtrust.models.heads.ProjectionWrapper`)."""
        return _wrap(model, self.params.proj_dim)

    def _id_features_and_logits(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        z_id, logits_id, _, _ = joint_forward(model, batch["x"], _need(batch, "x_ood", self.name))
        return z_id, logits_id

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        p = self.params
        head = _projection(model, self.name)
        z_id, logits_id = self._id_features_and_logits(model, batch)
        ce = logit_adjusted_ce(logits_id, batch["y"], log_prior(self.class_counts, logits_id), p.tau)
        rna = -torch.log1p(torch.linalg.vector_norm(head(z_id), ord=2, dim=1)).mean()
        return ce + p.weight * rna


@register("objective", "rna_no_outliers")
class RNANoOutliers(RNA):
    """RNA with ID-only batches: the "no outliers in the BN batch" ablation (spec §6 "Ablation", §7.4)."""

    name = "rna_no_outliers"
    needs_outliers = False

    def _id_features_and_logits(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return model.forward_features_and_logits(batch["x"])


# ---------------------------------------------------------------- PASCL


def tail_supcon(f_id: Tensor, f_ood: Tensor, y: Tensor, tail: Tensor, temperature: float) -> Tensor:
    """PASCL's partial, asymmetric SupCon (Wang et al., ICML 2022; spec rna.md §5), with masks instead of indexing.

    Args:
        f_id: L2-normalised projections of the two ID views, ``cat(view1, view2)`` (2n, p).
        f_ood: L2-normalised projections of the outliers (m, p).
        y: labels of the two views, ``cat(y, y)`` (2n,).
        tail: ``y >= round((1 − k)·C)`` (2n,) bool.
        temperature: T.

    The contrast set is every tail-class ID view plus every outlier (head-class
    ID samples are left out, as in the reference code); anchors are tail views;
    positives are the other tail views of the same class; outliers are always
    negatives and never anchors. Each anchor's loss is
    ``−mean_{p ∈ P(a)} log softmax_{c ≠ a}(f_a·f_c / T)_p``; the result is the
    mean over tail anchors, and 0 when the batch has none.
    """
    two_n, m = f_id.shape[0], f_ood.shape[0]
    sim = f_id @ torch.cat([f_id, f_ood]).T / temperature  # (2n, 2n + m)
    not_self = ~torch.eye(two_n, two_n + m, dtype=torch.bool, device=f_id.device)
    in_set = torch.cat([tail, torch.ones(m, dtype=torch.bool, device=f_id.device)])
    valid = not_self & in_set.unsqueeze(0)
    same = torch.cat([y.unsqueeze(1) == y.unsqueeze(0), torch.zeros(two_n, m, dtype=torch.bool, device=f_id.device)], 1)
    positive = same & valid
    log_prob = torch.log_softmax(torch.where(valid, sim, torch.full_like(sim, float("-inf"))), dim=1)
    pos_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    row_loss = -pos_log_prob / positive.sum(dim=1).clamp_min(1)
    anchor = tail.to(sim.dtype)
    return (row_loss * anchor).sum() / anchor.sum().clamp_min(1.0)


@register("objective", "pascl")
class PASCL(Objective):
    """PASCL stage 1 (Wang et al., ICML 2022; spec rna.md §5).

    ``CE(both views) + w_oe·OE + λ2·L_cl`` from one forward of
    ``cat(x, x2, x_ood)``; ``L_cl`` is :func:`tail_supcon` on the
    L2-normalised projections ``h(z)/||h(z)||`` with tail classes
    ``y ≥ round((1 − k)·C)``. Score it with MSP.

    Stage 2 (ABF: fine-tune only BN and FC for 10 epochs with LA, τ = 1) is
    out of scope here: it is the ``la`` objective with the trainable set
    restricted to BN and head parameters, which the trainer configures.
    """

    name = "pascl"
    needs_outliers = True
    num_views: ClassVar[int] = 2

    class Params(Objective.Params):
        oe_weight: float = Field(0.5, ge=0.0, description="weight of the OE term on outliers")
        cl_weight: float = Field(0.1, ge=0.0, description="λ2, weight of the tail contrastive loss (C10: 0.1, C100: 0.02)")
        temperature: float = Field(0.07, gt=0.0, description="SupCon temperature T (C10: 0.07, C100: 0.2)")
        k: float = Field(0.4, ge=0.0, le=1.0, description="tail fraction: classes >= round((1-k)·C) are tail")
        proj_dim: int = Field(PROJECTION_DIM, ge=1, description="output width of the projection head")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """``model`` with the projection head attached."""
        return _wrap(model, self.params.proj_dim)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        p = self.params
        head = _projection(model, self.name)
        x, y = batch["x"], batch["y"]
        n = x.shape[0]
        x_all = torch.cat([x, _need(batch, "x2", self.name), _need(batch, "x_ood", self.name)])
        z, logits = model.forward_features_and_logits(x_all)
        y2 = torch.cat([y, y])
        ce = F.cross_entropy(logits[: 2 * n], y2)
        oe = uniform_ce(logits[2 * n:]).mean()
        f = F.normalize(head(z), dim=1)
        tail = y2 >= round((1.0 - p.k) * self.num_classes)
        cl = tail_supcon(f[: 2 * n], f[2 * n:], y2, tail, p.temperature)
        return ce + p.oe_weight * oe + p.cl_weight * cl


# ---------------------------------------------------------------- BEL


@register("objective", "bel")
class BalancedEnergy(Objective):
    """Balanced energy regularisation (Choi et al., CVPR 2023; spec rna.md §5), C10-LT defaults.

    With ``p = softmax(f(x_out))`` and the prior of outlier classes ``π̂``:
    ``E'_out = E_out − λ·Σ_c p_c·π̂1_c``, ``w = Σ_c p_c·π̂2_c`` with
    ``π̂j = π̂^γj / ||π̂^γj||₁``, and
    ``L = CE + 0.1·(mean relu(E_in − m_in)² + Σ w·relu(m_out − E'_out)² / Σ w)``.
    As in the reference code, gradients flow through ``p`` in both
    ``E'_out`` and ``w``. Score it with the energy score.

    π̂ is the class distribution of the **pretrained** model's predictions on the
    outliers (the paper's code hard-codes such vectors): ``prior: pretrained``
    measures it on the ``init_from`` model over the server's outlier pool when
    the run starts (argmax counts / pool size) and records the vector; or give
    the vector. With ``prior`` null, GUESS for BEL trained from scratch: the
    detached mean softmax of the current outlier batch.
    """

    name = "bel"
    needs_outliers = True

    class Params(Objective.Params):
        m_in: float = Field(-23.0, description="ID energy margin (C10-LT -23, C100-LT -27)")
        m_out: float = Field(-5.0, description="OOD energy margin")
        lam: float = Field(10.0, ge=0.0, description="λ, strength of the prior-dependent energy shift (C10 10, C100 100)")
        gamma1: float = Field(0.75, description="exponent of π̂ in the energy shift")
        gamma2: float = Field(0.75, description="exponent of π̂ in the sample weights")
        weight: float = Field(0.1, ge=0.0, description="weight of the energy terms")
        prior: tuple[float, ...] | Literal["pretrained"] | None = Field(
            None, description="π̂ over classes: a vector, 'pretrained' (the init_from model's predicted-class "
                              "distribution on the outlier pool), or null (mean softmax of the outlier batch, GUESS)")

    from_pretrained = ("prior",)

    def pretrained_values(self, train_logits: Tensor, train_labels: Tensor,
                          outlier_logits: Tensor | None) -> dict[str, Any]:
        if self.params.prior != PRETRAINED:
            return {}
        if outlier_logits is None or len(outlier_logits) == 0:
            raise ConfigError("objective 'bel': prior='pretrained' needs the outlier pool (data.outliers)")
        counts = torch.bincount(outlier_logits.argmax(1).cpu(), minlength=self.num_classes).double()
        return {"prior": [float(c) for c in counts / counts.sum()]}

    def _outlier_prior(self, prob_ood: Tensor) -> Tensor:
        if self.params.prior == PRETRAINED:
            raise _unresolved(self.name, "prior")
        if self.params.prior is None:
            return prob_ood.mean(dim=0).detach()
        if len(self.params.prior) != self.num_classes:
            raise ConfigError(f"objective.prior has {len(self.params.prior)} entries, expected {self.num_classes}")
        return torch.tensor(self.params.prior, dtype=prob_ood.dtype, device=prob_ood.device)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        p = self.params
        _, logits_id, _, logits_ood = joint_forward(model, batch["x"], _need(batch, "x_ood", self.name))
        prob_ood = torch.softmax(logits_ood, dim=1)
        pi_hat = self._outlier_prior(prob_ood)
        pi1 = F.normalize(pi_hat.pow(p.gamma1), p=1.0, dim=0)
        pi2 = F.normalize(pi_hat.pow(p.gamma2), p=1.0, dim=0)
        e_out = free_energy(logits_ood) - p.lam * (prob_ood @ pi1)
        w_out = prob_ood @ pi2
        reg = energy_hinge(free_energy(logits_id), e_out, p.m_in, p.m_out, w_out)
        return F.cross_entropy(logits_id, batch["y"]) + p.weight * reg
