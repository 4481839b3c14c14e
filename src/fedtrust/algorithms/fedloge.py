"""FedLoGe (Xiao et al., "FedLoGe: Joint Local and Generic Federated Learning under
Long-tailed Data", ICLR 2024); spec ``fedloge.md`` §3–5.

**Server** (§3, §4). ``init`` builds the static sparse equiangular classifier
SSE-C once (:func:`~fedtrust.models.etf.build_sse_c`, from a generator seeded by
the run-seeded global RNG), the backbone θ, the global head G (the backbone's
own linear head, re-purposed) and the common initial local head. Each round it
sends θ, SSE-C and G; it averages θ and G over the replies with sample weights
(BN statistics included); SSE-C never changes.

**Client k** (§4, per minibatch): f = θ(x);
``loss = CE(SSE-C(f), y) + CE(G(sg[f]), y) + CE(L_k(sg[f]), y)``, sg = stop-gradient.
The reference steps three SGD optimizers (θ, G, L_k) on the three terms; the
stop-gradients make the terms' parameter sets disjoint, so one SGD optimizer
over θ ∪ G ∪ L_k on the sum takes exactly the same steps when lr, momentum and
weight decay are shared (they are: 0.03 / 0.5 / 0 in the reference). So the
client is **declarative** (:meth:`FedLoGe.local_training`: one
:class:`~fedtrust.fl.protocol.LocalTraining` on :class:`FedLoGeNet`, SSE-C not
in ``trainable``) and runs on any executor. The reply carries θ and G only; L_k
goes to the client state (``"head_l/"``) and never leaves the client; the fixed
SSE-C is never re-sent.

With a configured objective other than plain cross-entropy, the backbone term
is ``objective(net, batch)`` where ``net`` exposes ``features``/``head`` = SSE-C
(e.g. long-tailed OOD objectives); the heads then read the features from a
second forward pass (one more forward; BN statistics see the batch twice).

**GLA-FR** (§5, no training; pure functions below) and the three use cases:
``universal`` = SSE-C(f); ``global`` = GA-FR G̃ f + b_G; ``personalized`` = LA-FR
(L_k f + b_L) + (P_k f + b_G) with P_k,c = ‖L_k,c‖·G_c.

GUESS (never-sampled clients): every client's L_k starts from one common
initial head drawn in ``init`` (the reference draws one per client; the
distributions are the same). The evaluator cannot name a client, so a client
never sampled is scored with that initial head, exactly the head it would start
training from.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fedtrust.algorithms.personal import (
    LABEL_COUNTS, FeatureHead, message_arrays, module_state, split_backbone, with_label_counts,
)
from fedtrust.data.types import ImageSet
from fedtrust.fl.defense import DEFENSE
from fedtrust.fl.local import train_locally
from fedtrust.algorithms.fedavg import FedAvg
from fedtrust.fl.protocol import Batch, ClientContext, LocalTraining, Message, TrainResult, with_prefix
from fedtrust.models.etf import DEFAULT_REFINE_STEPS, build_sse_c
from fedtrust.objectives import CrossEntropy
from fedtrust.registry import register

SHARED = ("backbone", "head_g")  # what replies carry and the server averages
SENT = ("backbone", "sse_c", "head_g")  # what the server sends (plus the initial local head)
L_INIT = "head_l_init"
MASK_VALUE = -1e10  # logit of a masked class (spec §5 uses -1e10 weight rows; we mask logits, §10)


# --------------------------------------------------------------------------- GLA-FR (spec §5)


def ga_fr(weight: Tensor, norm: float = 1.7) -> Tensor:
    """GA-FR, global realignment (spec §5): every row of G rescaled to norm ``norm``.

    ``G̃_c = norm · G_c / ‖G_c‖₂``; the bias ``b_G`` is left unscaled, so ``norm``
    (1.7 in the reference) matters only relative to the bias.
    """
    return norm * weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)


def la_fr(local_weight: Tensor, global_weight: Tensor) -> Tensor:
    """LA-FR norm transfer (spec §5): ``P_{k,c} = ‖L_{k,c}‖₂ · G_c`` with the raw (un-normalised) G."""
    return local_weight.norm(dim=1, keepdim=True) * global_weight


def la_fr_logits(f: Tensor, local_weight: Tensor, local_bias: Tensor, global_weight: Tensor,
                 global_bias: Tensor, mask: Tensor | None = None) -> Tensor:
    """Personalized logits (spec §5): ``z = (L_k f + b_L) + (P_k f + b_G)``.

    ``mask`` (bool, K) marks classes to exclude (absent from the client's data):
    their logits are set to −1e10. The reference sets weight rows to −1e10 instead,
    which only works for f ≥ 0 (spec §10); masking logits works for any f.
    """
    z = F.linear(f, local_weight, local_bias) + F.linear(f, la_fr(local_weight, global_weight), global_bias)
    return z if mask is None else z.masked_fill(mask, MASK_VALUE)


def absent_class_mask(counts: Tensor, min_count: int = 2) -> Tensor:
    """Classes the client holds fewer than ``min_count`` training samples of (spec §1, §5: such
    classes get no local test images in the reference and are masked)."""
    return counts < min_count


class LAFRHead(nn.Module):
    """The personalized head of client k: :func:`la_fr_logits` with fixed L_k, G and optional mask."""

    def __init__(self, local: nn.Linear, global_: nn.Linear, mask: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("lw", local.weight.detach().clone())
        self.register_buffer("lb", local.bias.detach().clone())
        self.register_buffer("gw", global_.weight.detach().clone())
        self.register_buffer("gb", global_.bias.detach().clone())
        self.register_buffer("mask", mask if mask is not None else torch.zeros(self.lb.shape, dtype=torch.bool))

    def forward(self, f: Tensor) -> Tensor:
        return la_fr_logits(f, self.lw, self.lb, self.gw, self.gb, self.mask)


def linear_from(weight: Tensor, bias: Tensor) -> nn.Linear:
    """An ``nn.Linear`` carrying ``weight`` (K×d) and ``bias`` (K)."""
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


# --------------------------------------------------------------------------- the client's model


class FedLoGeNet(nn.Module):
    """What a FedLoGe client trains: ``backbone`` θ, frozen ``sse_c``, global head ``head_g``, local head ``head_l``.

    As a model it is the universal predictor: ``forward(x) = SSE-C(features(x))``
    and ``head`` is SSE-C, so objectives written against the FedModel contract
    train the backbone through SSE-C.
    """

    def __init__(self, model: nn.Module, sse_c: nn.Linear) -> None:
        super().__init__()
        self.backbone, g = split_backbone(model)
        self.sse_c = sse_c.requires_grad_(False)
        self.head_g = g
        self.head_l = copy.deepcopy(g)

    @property
    def head(self) -> nn.Linear:
        return self.sse_c

    @property
    def projection(self) -> nn.Module | None:
        """The projection head an objective attached to the backbone (RNA, PASCL: ``wrap_model``), if any."""
        return getattr(self.backbone, "projection", None)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.sse_c(self.features(x))

    def forward_features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return f, self.sse_c(f)


# --------------------------------------------------------------------------- the algorithm


@register("algorithm", "fedloge")
class FedLoGe(FedAvg):
    """SSE-C backbone training + global/local heads on detached features; GLA-FR at inference."""

    name = "fedloge"
    personalized = True

    class Params(FedAvg.Params):
        sparsity: float = Field(0.6, ge=0, lt=1, description="fraction of SSE-C entries zeroed (spec §3)")
        norm_target: float = Field(0.1, gt=0, description="SSE-C column-norm target of the refinement (spec §3)")
        refine_steps: int = Field(DEFAULT_REFINE_STEPS, ge=0, description="Adam steps refining SSE-C (reference: 10000)")
        refine_lr: float = Field(1e-4, gt=0, description="Adam lr of the SSE-C refinement")
        sse_c_bias: Literal["zero", "random"] = Field("zero", description="SSE-C bias: zero (GUESS) or PyTorch's random init (reference)")
        ga_norm: float = Field(1.7, gt=0, description="GA-FR row norm of the global head (spec §5)")
        mask_absent: bool = Field(False, description="LA-FR: mask classes the client has < 2 training samples of")
        extra_predictors: bool = Field(False, description="also score raw G, L_k alone and L_k + G (diagnostics)")

    @functools.cached_property
    def _plain_ce(self) -> bool:
        return type(self.ctx.objective) is CrossEntropy

    def _net(self) -> FedLoGeNet:
        """A fresh FedLoGeNet from the model factory; its SSE-C is a placeholder until ``init`` builds it."""
        model = self.ctx.new_model()
        return FedLoGeNet(model, nn.Linear(model.head.in_features, model.head.out_features))

    @functools.cached_property
    def template(self) -> FedLoGeNet:
        return self._net().to(self.ctx.device)

    # ---- server ----------------------------------------------------------
    def init(self) -> Message:
        """θ, G and the initial local head from the global RNG; SSE-C from a generator seeded from it."""
        p = self.params
        net = self._net()
        net.head_l.reset_parameters()  # its own draw: L_k must not start equal to G
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        d, k = net.head_g.in_features, net.head_g.out_features
        net.sse_c = build_sse_c(d, k, gen, sparsity=p.sparsity, target=p.norm_target, steps=p.refine_steps,
                                lr=p.refine_lr, bias=p.sse_c_bias)
        arrays = message_arrays(net.state_dict(), SENT)
        arrays.update(with_prefix(L_INIT, net.head_l.state_dict()))
        return Message(arrays=arrays, meta={})

    def configure(self, state: Message, round: int, clients: list[int]) -> dict[int, Message]:
        """θ, SSE-C, G and the initial local head, plus what FedAvg adds (lr, outlier shares)."""
        base = super().configure(state, round, clients)
        shared = {k: v for k, v in state.arrays.items() if not k.startswith(DEFENSE + "/")}  # the aggregator's own state stays
        return {c: Message(arrays={**shared, **m.arrays}, meta=m.meta) for c, m in base.items()}

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> tuple[Message, dict[str, Any]]:
        return self.ctx.defense.merge(state, replies, SHARED, round, self.params.bn_aggregation)

    # ---- client ----------------------------------------------------------
    def local_loss(self, model: FedLoGeNet, params: dict[str, Tensor], batch: Batch, ref: dict[str, Tensor]) -> Tensor:
        """CE(SSE-C(f), y) + CE(G(sg[f]), y) + CE(L_k(sg[f]), y) (spec §4, steps (1)-(3))."""
        x, y = batch["x"], batch["y"]
        if self._plain_ce:
            f = model.features(x)
            universal = F.cross_entropy(model.sse_c(f), y)
        else:
            universal = self.ctx.objective(model, batch)
            # The heads' features come from a second forward. With outliers in the batch it is the same
            # joint ID+outlier forward (ID rows kept), so BN running statistics keep tracking the mixture
            # the objective chose (RNA, spec rna.md §1) instead of being pulled back to ID-only statistics.
            x_ood = batch.get("x_ood")
            f = model.features(x if x_ood is None else torch.cat([x, x_ood]))[: x.shape[0]]
        f = f.detach()
        return universal + F.cross_entropy(model.head_g(f), y) + F.cross_entropy(model.head_l(f), y)

    def local_head(self, state: Message, client_state: Message | None) -> dict[str, Tensor]:
        """L_k as ``{"weight", "bias"}``: the client's own, else the common initial head."""
        own = client_state.prefixed("head_l") if client_state is not None else {}
        return own or state.prefixed(L_INIT)

    def local_training(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining | None:
        if self.params.mask_absent and LABEL_COUNTS not in client_state.arrays:
            return None  # first visit: client_update records the label counts the mask needs
        base = super().local_training(message, client_state, ctx)  # schedule, optimizer, outliers, views
        init = module_state(message.arrays, SENT)
        init.update({f"head_l.{k}": v for k, v in self.local_head(message, client_state).items()})
        trainable = tuple(n for n, _ in base.model.named_parameters() if not n.startswith("sse_c."))
        return dataclasses.replace(base, init=init, trainable=trainable, ref={})

    def finish(self, message: Message, result: TrainResult, client_state: Message,
               ctx: ClientContext) -> tuple[Message, Message]:
        """Reply θ and G; keep L_k in the client state (it never enters a reply)."""
        arrays = message_arrays(result.state, (*SHARED, "head_l"))
        reply = Message(arrays={k: v for k, v in arrays.items() if not k.startswith("head_l/")},
                        meta={"num_examples": result.num_examples, "loss": result.mean_loss, "steps": result.steps})
        own = {k: v for k, v in arrays.items() if k.startswith("head_l/")}
        return reply, Message(arrays={**client_state.arrays, **own}, meta=dict(client_state.meta))

    def client_update(self, message: Message, data: ImageSet, client_state: Message,
                      ctx: ClientContext) -> tuple[Message, Message]:
        if self.params.mask_absent:
            client_state = with_label_counts(client_state, data)
        result = train_locally(self.local_training(message, client_state, ctx), data, ctx, self.ctx.normalize)
        return self.finish(message, result, client_state, ctx)

    # ---- inference (spec §5) ----------------------------------------------
    def predictors(self, state: Message, client_state: Message | None = None) -> dict[str, nn.Module]:
        backbone = copy.deepcopy(self.template.backbone)
        backbone.load_state_dict(state.prefixed("backbone"))
        sse_c = linear_from(state.arrays["sse_c/weight"], state.arrays["sse_c/bias"])
        g = linear_from(state.arrays["head_g/weight"], state.arrays["head_g/bias"])
        lh = self.local_head(state, client_state)
        local = linear_from(lh["weight"], lh["bias"])
        mask = None
        if self.params.mask_absent and client_state is not None and LABEL_COUNTS in client_state.arrays:
            mask = absent_class_mask(client_state.arrays[LABEL_COUNTS])
        out: dict[str, nn.Module] = {
            "universal": FeatureHead(backbone, sse_c),
            "global": FeatureHead(backbone, linear_from(ga_fr(g.weight.detach(), self.params.ga_norm), g.bias.detach())),
            "personalized": FeatureHead(backbone, LAFRHead(local, g, mask)),
        }
        if self.params.extra_predictors:
            both = linear_from(local.weight.detach() + g.weight.detach(), local.bias.detach() + g.bias.detach())
            out.update(global_raw=FeatureHead(backbone, g), local=FeatureHead(backbone, local),
                       local_global=FeatureHead(backbone, both))
        return out
