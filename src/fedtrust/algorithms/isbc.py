"""IS&BC step 2: Internal Separation & Backstage Collaboration as a federated protocol (spec fedood_isbc.md).

Jeong & Choi, "Out-of-Distribution Detection via Outlier Exposure in Federated Learning", Neural
Networks 2025. Step 1 is any fedtrust run (FedAvg by default); this algorithm starts from its final
weights (``init_from``, required) and cuts the model at a split point (``algorithm.split``, default the
model's: ``layer2`` of a ResNet, ``group2`` of a WRN, ``conv1`` of the ``cnn``). The front is frozen,
in eval mode everywhere (spec §5.2: its BN statistics never mix ID and outliers). Each round:

1. **configure**: the server sends the front's weights only (they never change; a deployment could send
   them once, we count them every round in ``upload``/``download`` bytes).
2. **client**: runs its ID images through the front, applies manifold mixup to the feature maps (spec §3:
   pairs of its own samples, h ← λ·h + (1 − λ)·h[π], one λ ~ Beta(α, α) per batch of ``id_batch``), and
   replies ``mix/h`` (n, C, H, W), ``mix/y_a``, ``mix/y_b`` and ``mix/lam``: internal features and labels,
   never an image, a gradient or weights. Clients re-mix every round (spec §5.1's recommendation), ``mixes``
   independent copies each, of at most ``max_samples`` of its samples (a fresh random subset each round); one
   round of ``epochs`` epochs on ``mixes`` copies is the "upload once" variant.
3. **aggregate**: the server runs its auxiliary outliers (``data.outliers``) through the same frozen front
   and trains the back stages plus the head for ``epochs`` epochs (batches zip ``id_batch`` mixed ID
   features with ``oe_batch`` outlier features and stop at the shorter, spec §3), on

       L = mean_i [λ_i·CE(z_i, y_a,i) + (1 − λ_i)·CE(z_i, y_b,i)] + β · mean_o [logsumexp(z_o) − mean_k z_o,k]

   (mixup CE + Hendrycks OE, cross-entropy to uniform; spec §3), SGD with momentum and weight decay,
   the back's BN in train mode on the joint batch.

The head (``head=concat``, "backstage collaboration", spec §3) is W2·(W1·[f_1; …; f_m] + b1) + b2 on the
flattened outputs of every back stage (``pool`` > 0 average-pools each to pool × pool first, to fit small
machines; 0 is the code's no pooling), a rank-``hidden`` linear map started from random weights;
``head=plain`` keeps the model's own pooled features and linear head (back-layer OE without the concat
head). ``train=head`` trains only the head (the head-only OE ablation); ``mixup=false`` sends unmixed
features; ``beta=0`` drops the outliers. Predictions and OOD scores come from the trained model.

Privacy (what this protects and what not): no raw image leaves a client, and mixing blurs single
samples, but the features of a frozen early front can be inverted to images, and a client's labels are
sent in clear; no I2F-style audit of the features is done here.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn
import torch.nn.functional as F

from fedtrust.data.types import ImageSet
from fedtrust.errors import ConfigError
from fedtrust.fl.aggregate import mean_upload_bytes, message_bytes
from fedtrust.fl.protocol import Algorithm, ClientContext, Message, with_prefix
from fedtrust.models.base import FedModel
from fedtrust.models.split import Split, split_model
from fedtrust.registry import register

MIX = "mix"
BACKSTAGE = "backstage"
CHUNK = 1024
"""Images per forward pass through the front (bounds memory on big clients)."""


class BackstageModel(FedModel):
    """The step-2 predictor: the cut model's back-stage outputs, flattened (and pooled), concatenated, then
    ``W1`` (``features``, the rank-``hidden`` code) and ``W2`` (``head``)."""

    nonnegative_features = False

    def __init__(self, model: FedModel, split_at: str, pool: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.base = model
        self.split_at, self.pool = split_at, pool
        self.in_shape = model.in_shape
        with torch.no_grad():
            was = model.training
            model.eval()
            dim = self.concat(torch.zeros(1, *model.in_shape, device=next(model.parameters()).device)).shape[1]
            model.train(was)
        self.w1 = nn.Linear(dim, hidden)
        self.num_features = hidden
        self.reset_head(num_classes)

    @functools.cached_property
    def split(self) -> Split:
        return split_model(self.base, self.split_at)

    def concat_from_front(self, h: Tensor) -> Tensor:
        """``[f_1; …; f_m]`` from the split point's feature map."""
        outs = self.split.back(h)
        if self.pool:
            outs = [F.adaptive_avg_pool2d(o, self.pool) for o in outs]
        return torch.cat([o.flatten(1) for o in outs], dim=1)

    def concat(self, x: Tensor) -> Tensor:
        return self.concat_from_front(self.split.front(x))

    def features(self, x: Tensor) -> Tensor:
        return self.w1(self.concat(x))

    def logits_from_front(self, h: Tensor) -> Tensor:
        return self.head(self.w1(self.concat_from_front(h)))


@register("algorithm", "isbc")
class ISBC(Algorithm):
    """IS&BC step 2 (module docstring): clients send mixed front features, the server trains the back with OE."""

    name = "isbc"
    needs_init_from = True
    fresh_prefixes = (BACKSTAGE + "/",)

    class Params(Algorithm.Params):
        split: str | None = Field(None, description="stage after which the model is cut (null: the model's default)")
        head: Literal["concat", "plain"] = Field("concat", description="concat: backstage head on every back "
                                                 "stage's output; plain: the model's own pooled linear head")
        train: Literal["back", "head"] = Field("back", description="what the server trains: the back stages and "
                                               "the head, or the head only")
        beta: float = Field(0.2, ge=0, description="weight of the OE term (0: no outliers)")
        mixup: bool = Field(True, description="clients mix their features (false: send them unmixed)")
        mixup_alpha: float = Field(1.0, gt=0, description="λ ~ Beta(α, α)")
        hidden: int = Field(768, ge=1, description="rank of the concat head (W1's output width)")
        pool: int = Field(0, ge=0, description="average-pool each back output to pool × pool before the concat "
                                               "(0: none, the code's choice)")
        epochs: int = Field(1, ge=1, description="server epochs over the round's features")
        lr: float = Field(1e-3, gt=0, description="server SGD learning rate")
        momentum: float = Field(0.9, ge=0, lt=1)
        weight_decay: float = Field(5e-4, ge=0)
        mixes: int = Field(1, ge=1, description="independently mixed copies of its features a client sends per "
                                               "round (rounds=1 with mixes=K and epochs=E: upload once)")
        max_samples: int | None = Field(None, ge=2, description="at most this many of its samples a client "
                                        "mixes and sends per round, a fresh random subset each round (null: all)")
        id_batch: int = Field(256, ge=1, description="mixed ID features per server batch (and per client λ)")
        oe_batch: int = Field(512, ge=1, description="outlier features per server batch")

    def __init__(self, params: Params, ctx: Any) -> None:
        super().__init__(params, ctx)
        if params.beta > 0 and ctx.outliers is None:
            raise ConfigError("algorithm isbc with beta > 0 needs the server's outliers: set data.outliers "
                              "(e.g. photos, openclipart; `fedtrust list outliers`), or algorithm.beta=0")
        if not ctx.defense.is_plain_mean:
            raise ConfigError("algorithm isbc trains on the clients' features on the server; it averages no "
                              "updates, so defense.aggregator must be mean with defense.server_lr=1")
        split_model(self.template, params.split)  # a bad split point fails here, before any round

    # ---- pieces ------------------------------------------------------
    @functools.cached_property
    def _split_template(self) -> Split:
        return split_model(self.template, self.params.split)

    @functools.cached_property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample's feature map at the split point."""
        model = self.template
        model.eval()
        with torch.no_grad():
            h = self._split_template.front(torch.zeros(1, *model.in_shape, device=self.ctx.device))
        return tuple(h.shape[1:])

    def _predictor(self, state: Message) -> FedModel:
        model = self.ctx.new_model().to(self.ctx.device)
        model.load_state_dict(state.prefixed("model"))
        if self.params.head == "plain":
            return model
        p = self.params
        pred = BackstageModel(model, self._split_template.at, p.pool, p.hidden, self.ctx.num_classes).to(self.ctx.device)
        if any(k.startswith(BACKSTAGE + "/") for k in state.arrays):
            pred.w1.load_state_dict({"weight": state.arrays[f"{BACKSTAGE}/w1.weight"],
                                     "bias": state.arrays[f"{BACKSTAGE}/w1.bias"]})
            pred.head.load_state_dict({"weight": state.arrays[f"{BACKSTAGE}/w2.weight"],
                                       "bias": state.arrays[f"{BACKSTAGE}/w2.bias"]})
        return pred

    @staticmethod
    def _state(pred: FedModel, meta: dict[str, Any]) -> Message:
        if isinstance(pred, BackstageModel):
            arrays = with_prefix("model", pred.base.state_dict())
            arrays |= {f"{BACKSTAGE}/w1.weight": pred.w1.weight, f"{BACKSTAGE}/w1.bias": pred.w1.bias,
                       f"{BACKSTAGE}/w2.weight": pred.head.weight, f"{BACKSTAGE}/w2.bias": pred.head.bias}
        else:
            arrays = with_prefix("model", pred.state_dict())
        return Message(arrays={k: v.detach().clone() for k, v in arrays.items()}, meta=meta)

    def _front(self, split: Split, images: Tensor) -> Tensor:
        """Front features of uint8 images, the model in eval mode, no gradient, in chunks."""
        split.model.eval()
        with torch.no_grad():
            return torch.cat([split.front(self.ctx.normalize(images[i:i + CHUNK].to(self.ctx.device)))
                              for i in range(0, len(images), CHUNK)]) if len(images) else \
                torch.zeros(0, *self.feature_shape, device=self.ctx.device)

    # ---- server side -------------------------------------------------
    def init(self) -> Message:
        """The model under ``model/`` (replaced by step 1's with ``init_from``) and, for the concat head, a
        fresh ``backstage/`` head (kept fresh: step 1 has none)."""
        model = self.ctx.new_model().to(self.ctx.device)
        pred = model if self.params.head == "plain" else BackstageModel(
            model, self._split_template.at, self.params.pool, self.params.hidden, self.ctx.num_classes)
        return self._state(pred.to(self.ctx.device), {})

    def configure(self, state: Message, round: int, clients: list[int]) -> dict[int, Message]:
        """The front's weights (and the round); nothing else reaches a client."""
        keys = self._split_template.front_keys
        payload = Message(arrays={f"model/{k}": state.arrays[f"model/{k}"] for k in keys}, meta={"round": round})
        return {c: payload for c in clients}

    def reply_spec(self, message: Message) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """n mixed feature maps of the split point's shape, their two labels and λ (n: any)."""
        return {f"{MIX}/h": ((-1, *self.feature_shape), torch.float32), f"{MIX}/y_a": ((-1,), torch.int64),
                f"{MIX}/y_b": ((-1,), torch.int64), f"{MIX}/lam": ((-1,), torch.float32)}

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> tuple[Message, dict[str, Any]]:
        """Train the back (and head) on the round's mixed ID features and the outliers' front features."""
        p = self.params
        pred = self._predictor(state)
        base = pred.base if isinstance(pred, BackstageModel) else pred
        split = split_model(base, p.split)
        h, y_a, y_b, lam, dropped = self._gather(replies)
        outliers = self.ctx.outliers if p.beta > 0 and self.ctx.outliers is not None else None
        o = self._front(split, outliers) if outliers is not None else None
        params = self._trainable(pred, split)
        for q in pred.parameters():
            q.requires_grad_(False)
        for q in params:
            q.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        g = self.ctx.generator(round)
        logits = pred.logits_from_front if isinstance(pred, BackstageModel) else \
            (lambda f: base.head(_pool(split.back(f)[-1])))
        losses, ces, oes, steps = [], [], [], 0
        pred.train()
        for _ in range(p.epochs if len(h) else 0):
            id_perm = torch.randperm(len(h), generator=g).to(h.device)
            n_id = math.ceil(len(h) / p.id_batch)
            oe_perm = torch.randperm(len(o), generator=g).to(h.device) if o is not None and len(o) else None
            n_steps = min(n_id, math.ceil(len(o) / p.oe_batch)) if oe_perm is not None else n_id
            for i in range(n_steps):
                ib = id_perm[i * p.id_batch:(i + 1) * p.id_batch]
                ob = oe_perm[i * p.oe_batch:(i + 1) * p.oe_batch] if oe_perm is not None else None
                z = logits(torch.cat([h[ib], o[ob]]) if ob is not None else h[ib])
                z_id = z[:len(ib)]
                ce = (lam[ib] * F.cross_entropy(z_id, y_a[ib], reduction="none")
                      + (1 - lam[ib]) * F.cross_entropy(z_id, y_b[ib], reduction="none")).mean()
                oe = outlier_exposure(z[len(ib):]) if ob is not None else z.new_zeros(())
                loss = ce + p.beta * oe
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                ces.append(float(ce.detach()))
                oes.append(float(oe.detach()))
                steps += 1
        pred.eval()
        metrics = {"isbc": {"id_features": len(h), "outliers": 0 if o is None else len(o), "steps": steps,
                            "loss": _mean(losses), "ce": _mean(ces), "oe": _mean(oes),
                            "upload_bytes_mean": mean_upload_bytes(replies),
                            "download_bytes": message_bytes(self.configure(state, round, [0])[0]),
                            **({"dropped": dropped} if dropped else {})}}
        return self._state(pred, state.meta), metrics

    def _trainable(self, pred: FedModel, split: Split) -> list[nn.Parameter]:
        if isinstance(pred, BackstageModel):
            head = [*pred.w1.parameters(), *pred.head.parameters()]
        else:
            head = list(pred.head.parameters())
        return head if self.params.train == "head" else [*split.back_parameters(), *head]

    def _gather(self, replies: dict[int, Message]) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, str]]:
        """The replies' features, labels and λ concatenated in client order; a reply whose arrays disagree
        in length, whose labels are out of range or whose λ is outside [0, 1] is left out and named."""
        parts, dropped = [], {}
        c = self.ctx.num_classes
        for k in sorted(replies):
            a = replies[k].arrays
            h, ya, yb, lam = (a[f"{MIX}/{n}"] for n in ("h", "y_a", "y_b", "lam"))
            if not len(h) == len(ya) == len(yb) == len(lam):
                dropped[str(k)] = f"mixed features and labels differ in length ({len(h)}, {len(ya)}, {len(yb)}, {len(lam)})"
            elif len(ya) and (int(torch.minimum(ya, yb).min()) < 0 or int(torch.maximum(ya, yb).max()) >= c):
                dropped[str(k)] = f"a label outside 0..{c - 1}"
            elif len(lam) and not bool(((lam >= 0) & (lam <= 1)).all()):
                dropped[str(k)] = "a mixing weight λ outside [0, 1]"
            else:
                parts.append((h, ya, yb, lam))
        dev = self.ctx.device
        if not parts:
            z = torch.zeros(0, device=dev)
            return torch.zeros(0, *self.feature_shape, device=dev), z.long(), z.long(), z, dropped
        return (*(torch.cat([q[i].to(dev) for q in parts]) for i in range(4)), dropped)  # type: ignore[return-value]

    def predictors(self, state: Message, client_state: Message | None = None) -> dict[str, nn.Module]:
        return {"isbc": self._predictor(state)}

    # ---- client side -------------------------------------------------
    def client_update(self, message: Message, data: ImageSet, client_state: Message,
                      ctx: ClientContext) -> tuple[Message, Message]:
        """Front features of the client's images, mixed with pairs of its own samples (module docstring)."""
        model = self.template
        model.load_state_dict(message.prefixed("model"), strict=False)
        split = split_model(model, self.params.split)
        x, y = data.x, data.y
        cap = self.params.max_samples
        if cap is not None and len(x) > cap:  # a fresh random subset each round (bounds upload and memory)
            keep = torch.randperm(len(x), generator=ctx.generator)[:cap].sort().values.to(x.device)
            x, y = x[keep], y[keep]
        h = self._front(split, x)
        y = y.to(h.device)
        copies = [self._mix(h, y, ctx.generator) for _ in range(self.params.mixes)]
        arrays = {f"{MIX}/{name}": torch.cat([c[i] for c in copies]).contiguous()
                  for i, name in enumerate(("h", "y_a", "y_b", "lam"))}
        return Message(arrays=arrays, meta={"num_examples": len(h)}), client_state

    def _mix(self, h: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One mixed copy: ``(λ·h + (1 − λ)·h[π], y, y[π], λ)``, λ ~ Beta(α, α) per ``id_batch`` rows."""
        n = len(h)
        if not self.params.mixup or n < 2:
            return h.float(), y.long(), y.long(), torch.ones(n, device=h.device)
        perm = torch.randperm(n, generator=generator).to(h.device)
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        alpha = self.params.mixup_alpha
        per_batch = np.random.default_rng(seed).beta(alpha, alpha, math.ceil(n / self.params.id_batch))
        lam = torch.from_numpy(per_batch).float().to(h.device).repeat_interleave(self.params.id_batch)[:n]
        shape = (-1, *[1] * (h.dim() - 1))
        return (lam.view(shape) * h + (1 - lam.view(shape)) * h[perm]).float(), y.long(), y[perm].long(), lam


def outlier_exposure(z: Tensor) -> Tensor:
    """Hendrycks et al.'s OE term, cross-entropy to the uniform distribution: mean_o [logsumexp(z_o) −
    mean_k z_o,k] (spec fedood_isbc.md §3 and §5.6: the mean over classes, not the sum)."""
    if not len(z):
        return z.new_zeros(())
    return (torch.logsumexp(z, dim=1) - z.mean(dim=1)).mean()


def _pool(h: Tensor) -> Tensor:
    return torch.mean(h, dim=(2, 3))


def _mean(values: list[float] | list[int]) -> float | None:
    return sum(values) / len(values) if values else None
