"""The gradient map and its double-backprop products (I2F, spec i2f.md §1).

A client shares ``g0 = g(x0)`` with the **gradient map**

    g(x) = ∇θ L(f_θ(x), y)            (a flat vector of the trainable parameters, length dθ)

where ``x0`` is the private input batch in model-input (normalized) space, ``y``
its labels and ``L`` the batch-mean cross-entropy (spec §1, §7.6: so ``g`` and
any perturbation ``δ`` scale with ``1/B``).

**Shape convention** (the paper's, spec §1 and §7.1): ``J = ∂x ∇θ L(x0)`` is a
``dx × dθ`` matrix, ``J[i, j] = ∂² L / ∂x_i ∂θ_j``, with ``dx`` the number of
entries of the whole input batch and ``dθ`` that of the trainable parameters.
It is the *transpose* of the usual Jacobian of ``g`` (which is ``dθ × dx``). So

- ``J·v`` (``v`` in parameter space, ``dθ``) is x-shaped: ``∇x ⟨g(x), v⟩`` at
  ``x0``, the VJP of ``g`` with cotangent ``v`` (reverse over reverse);
- ``Jᵀ·u`` (``u`` x-shaped) is a flat parameter vector: ``∇θ ⟨∇x L, u⟩``, the
  JVP of ``g`` in direction ``u`` (forward over reverse);
- ``JJᵀ`` is ``dx × dx`` (input space), ``JᵀJ`` is ``dθ × dθ`` (parameter space),
  and they share their nonzero eigenvalues, the squared singular values of J.

Both :class:`GradientMap` (matrix-free, any model) and :class:`DenseJacobian`
(the explicit J, small inputs only) implement :class:`JacobianOperator`, so the
solvers in :mod:`fedtrust.privacy.i2f` run on either and the dense one is the
exact reference for the other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn import functional as F

LossFn = Callable[[Tensor, Tensor], Tensor]


# ------------------------------------------------------------ flat vectors


def flatten(tensors: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
    """Concatenate parameter-shaped tensors (a sequence, or a dict in its order) into one flat vector."""
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    return torch.cat([t.reshape(-1) for t in values])


def unflatten(vector: Tensor, like: Sequence[Tensor] | Mapping[str, Tensor]) -> list[Tensor] | dict[str, Tensor]:
    """Split flat ``vector`` into tensors shaped as ``like`` (a dict gives a dict with its keys): the inverse of
    :func:`flatten`. Raises ValueError when the sizes do not add up."""
    items = list(like.items()) if isinstance(like, Mapping) else list(enumerate(like))
    sizes = [t.numel() for _, t in items]
    if vector.ndim != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"vector of shape {tuple(vector.shape)} does not flatten tensors of {sum(sizes)} entries")
    parts = [p.reshape(t.shape) for p, (_, t) in zip(torch.split(vector, sizes), items)]
    if isinstance(like, Mapping):
        return {k: p for (k, _), p in zip(items, parts)}
    return parts


# ------------------------------------------------------------ the protocol


class JacobianOperator(Protocol):
    """``J`` (``dx × dθ``, module docstring) through its two products; what the solvers of ``i2f`` need."""

    x_shape: tuple[int, ...]
    """Shape of one x-shaped vector (the input batch for :class:`GradientMap`, ``(dx,)`` for dense J)."""
    dtype: torch.dtype
    """The dtype of both products (float64 for exact work)."""
    device: torch.device

    @property
    def dx(self) -> int: ...

    @property
    def dtheta(self) -> int: ...

    def jv(self, v: Tensor) -> Tensor:
        """``J·v`` for flat ``v`` of shape ``(dθ,)`` or ``(k, dθ)``: x-shaped, ``(*x_shape)`` or ``(k, *x_shape)``."""
        ...

    def jtu(self, u: Tensor) -> Tensor:
        """``Jᵀ·u`` for x-shaped ``u``, ``(*x_shape)`` or ``(k, *x_shape)``: flat, ``(dθ,)`` or ``(k, dθ)``."""
        ...


# ------------------------------------------------------------ matrix-free


class GradientMap:
    """``g(x) = ∇θ L(f_θ(x), y)`` at a fixed model, and ``J = ∂x g(x0)ᵀ`` (``dx × dθ``) through products.

    Built with ``torch.func`` (``functional_call``, ``grad``, ``vjp``, ``jvp``,
    ``vmap``), so the model is not modified and no ``.grad`` is written. The
    model runs in its current mode (train/eval); the I2F code audits in
    ``eval()`` mode (spec §2). Only parameters with ``requires_grad`` are θ;
    the others and the buffers are held fixed.

    Args:
        model: any ``nn.Module`` mapping ``x`` to logits (norm layers in eval
            mode, or none: the sigmoid nets of ``models.sigmoid``).
        x0: the private input batch ``(B, *input)``, model-input (normalized) space.
        y: its labels ``(B,)`` (the attacker knows them, spec §2, §7.6).
        dtype: cast θ, buffers and ``x0`` to this dtype (a copy; float64 for
            exact checks); None keeps the model's.
        loss_fn: ``L(logits, y)``; default batch-mean cross-entropy (spec §1).
    """

    def __init__(self, model: nn.Module, x0: Tensor, y: Tensor, dtype: torch.dtype | None = None,
                 loss_fn: LossFn = F.cross_entropy) -> None:
        def cast(t: Tensor) -> Tensor:
            t = t.detach()
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        self.model = model
        self.params = {k: cast(p) for k, p in model.named_parameters() if p.requires_grad}
        self.fixed = {k: cast(p) for k, p in model.named_parameters() if not p.requires_grad}
        self.fixed.update({k: cast(b) for k, b in model.named_buffers()})
        self.x0 = cast(x0)
        self.y = y
        self.loss_fn = loss_fn
        self.x_shape: tuple[int, ...] = tuple(self.x0.shape)
        self.dtype = self.x0.dtype
        self.device = self.x0.device
        self._vjp_fn: Callable[[Tensor], tuple[Tensor]] | None = None

    @property
    def dx(self) -> int:
        """Entries of the input batch (rows of J)."""
        return self.x0.numel()

    @property
    def dtheta(self) -> int:
        """Entries of the trainable parameters (columns of J)."""
        return sum(p.numel() for p in self.params.values())

    def loss(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``L(f_params(x), y)`` with the fixed parameters and buffers."""
        logits = functional_call(self.model, {**self.fixed, **params}, (x,))
        return self.loss_fn(logits, self.y)

    def grad(self, x: Tensor | None = None) -> Tensor:
        """The shared gradient ``g(x)`` (default ``g0 = g(x0)``) as a flat ``(dθ,)`` vector (spec §1)."""
        return self._g(self.x0 if x is None else x)

    def as_flat(self, v: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        """A parameter-space vector as a flat tensor: parameter-shaped tensors (sequence or dict) are flattened."""
        return v if isinstance(v, Tensor) else flatten(v)

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """Flat ``(dθ,)`` ``v`` as a dict of parameter-shaped tensors, keyed by parameter name."""
        return unflatten(v, self.params)  # type: ignore[return-value]

    def jv(self, v: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        """``J·v = ∇x ⟨g(x), v⟩`` at ``x0`` (spec §1 primitive (i), the code's ``JtDelta``): x-shaped.

        ``v`` is flat ``(dθ,)``, a batch ``(k, dθ)`` (result ``(k, *x_shape)``,
        one vmapped VJP), or parameter-shaped tensors. The forward and first
        backward pass are recorded once and reused by later calls.
        """
        v = self.as_flat(v)
        if self._vjp_fn is None:
            _, self._vjp_fn = vjp(self._g, self.x0)
        fn = self._vjp_fn
        if v.ndim == 1:
            return fn(v)[0]
        return vmap(lambda w: fn(w)[0])(v)

    def jtu(self, u: Tensor) -> Tensor:
        """``Jᵀ·u = ∇θ ⟨∇x L, u⟩`` at ``x0`` (spec §1 primitive (ii)): flat ``(dθ,)``, or ``(k, dθ)`` for
        ``u`` of shape ``(k, *x_shape)`` (a vmapped JVP of ``g`` in direction ``u``)."""

        def one(w: Tensor) -> Tensor:
            return jvp(self._g, (self.x0,), (w,))[1]

        if tuple(u.shape) == self.x_shape:
            return one(u)
        if tuple(u.shape[1:]) == self.x_shape:
            return vmap(one)(u)
        raise ValueError(f"u must have shape {self.x_shape} or (k, *{self.x_shape}), got {tuple(u.shape)}")

    def dense(self, chunk_size: int | None = None) -> Tensor:
        """The explicit ``J`` (``dx × dθ``; row ``i`` is ``Jᵀ e_i``), from :meth:`jtu` vmapped over the ``dx``
        basis vectors. Costs ``dx`` JVPs and ``dx·dθ`` memory: small inputs only (8x8 digits: 64 rows)."""
        eye = torch.eye(self.dx, dtype=self.x0.dtype, device=self.x0.device).reshape(self.dx, *self.x_shape)
        return vmap(lambda w: jvp(self._g, (self.x0,), (w,))[1], chunk_size=chunk_size)(eye)

    def _g(self, x: Tensor) -> Tensor:
        return flatten(grad(self.loss)(self.params, x))


# ------------------------------------------------------------ dense


class DenseJacobian:
    """An explicit ``J`` (``dx × dθ``) as a :class:`JacobianOperator`: ``jv`` and ``jtu`` are matrix products.

    ``x_shape`` is ``(dx,)``: x-shaped vectors are flat here. Used as the exact
    reference for the matrix-free :class:`GradientMap` and by the dense
    solvers of :mod:`fedtrust.privacy.i2f`.
    """

    def __init__(self, jacobian: Tensor) -> None:
        if jacobian.ndim != 2:
            raise ValueError(f"J must be a (dx, dθ) matrix, got shape {tuple(jacobian.shape)}")
        self.matrix = jacobian
        self.x_shape: tuple[int, ...] = (jacobian.shape[0],)
        self.dtype = jacobian.dtype
        self.device = jacobian.device

    @classmethod
    def from_map(cls, gmap: GradientMap, chunk_size: int | None = None) -> DenseJacobian:
        """The explicit J of ``gmap`` (:meth:`GradientMap.dense`)."""
        return cls(gmap.dense(chunk_size))

    @property
    def dx(self) -> int:
        return self.matrix.shape[0]

    @property
    def dtheta(self) -> int:
        return self.matrix.shape[1]

    def jv(self, v: Tensor) -> Tensor:
        """``J·v``: ``(dx,)`` for ``v`` of shape ``(dθ,)``, ``(k, dx)`` for ``(k, dθ)``."""
        return v @ self.matrix.T

    def jtu(self, u: Tensor) -> Tensor:
        """``Jᵀ·u``: ``(dθ,)`` for ``u`` of shape ``(dx,)``, ``(k, dθ)`` for ``(k, dx)``."""
        return u @ self.matrix
