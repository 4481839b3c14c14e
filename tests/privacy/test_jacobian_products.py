"""The gradient map and the double-backprop products J·v, Jᵀ·u (spec i2f.md §1, §6.1), float64 on digits.

The reference J is built here by a different route from the library's: plain
``torch.autograd.grad`` with ``create_graph`` on the model's own parameters (no
``torch.func``), differentiating every entry of ∇θL w.r.t. x (``dθ`` batched
backward passes). So a transposed convention, a wrong scaling (batch sum vs
mean) or a product taken at the wrong point cannot agree with it by construction.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fedtrust.privacy import DenseJacobian, GradientMap, flatten, unflatten

pytestmark = [
    pytest.mark.usefixtures("one_thread", "float64"),
    # torch's own: forward-mode AD loads its jvp decompositions through torch.jit.script on first use
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

NETS = ["spec_cnn", "sigmoid_mlp", "convnet5"]


def reference_jacobian(model, x0, y) -> torch.Tensor:
    """``J[i, j] = ∂²L / ∂x_i ∂θ_j`` (dx × dθ) by plain autograd on the module itself (no ``torch.func``):
    ``h(v) = ∇x ⟨∇θL, v⟩`` is J·v with a graph, and the rows ``Jᵀe_i`` are the gradients of ``h_i`` w.r.t. ``v``
    (the double-VJP trick; ``dx`` batched backward passes)."""
    x = x0.clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    g = flatten(torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True))
    v = torch.zeros_like(g, requires_grad=True)
    h = torch.autograd.grad(g @ v, x, create_graph=True)[0].reshape(-1)
    eye = torch.eye(h.numel(), dtype=h.dtype)
    return torch.autograd.grad(h, v, grad_outputs=eye, is_grads_batched=True)[0]


@pytest.fixture(params=NETS)
def case(request, make_net, digits):
    """A net and a batch of two digits: with B = 2 the batch mean of the loss matters (J scales by 1/B)."""
    model = make_net(request.param)
    x0, y = digits.x[:2], digits.y[:2]
    return model, x0, y, GradientMap(model, x0, y), reference_jacobian(model, x0, y)


def test_products_match_the_explicit_jacobian(case) -> None:
    """J·v and Jᵀ·u (single and batched) and the vmapped dense J equal the reference J to 1e-10.

    Rules out: J·v and Jᵀ·u swapped or transposed, a summed instead of averaged loss (off by B = 2), a
    product taken at another x or with stale parameters, batch rows mixed up under vmap."""
    _, x0, _, gmap, J = case
    assert J.shape == (gmap.dx, gmap.dtheta) == (x0.numel(), gmap.dtheta)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3, gmap.dtheta, generator=gen)
    u = torch.randn(3, *x0.shape, generator=gen)

    jv = gmap.jv(v[0])
    assert jv.shape == x0.shape
    torch.testing.assert_close(jv.reshape(-1), J @ v[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(gmap.jv(v).reshape(3, -1), v @ J.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(gmap.jtu(u[0]), J.T @ u[0].reshape(-1), rtol=0, atol=1e-10)
    torch.testing.assert_close(gmap.jtu(u), u.reshape(3, -1) @ J, rtol=0, atol=1e-10)
    torch.testing.assert_close(gmap.dense(), J, rtol=0, atol=1e-10)
    assert J.abs().max() > 1e-3  # not a vacuous comparison of zeros


def test_adjoint_identity(case) -> None:
    """⟨u, Jv⟩ = ⟨Jᵀu, v⟩ for random u, v, matrix-free only (spec §6.1).

    Rules out: the two products computed at different points, or one of them for another loss."""
    _, x0, _, gmap, _ = case
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(gmap.dtheta, generator=gen)
        u = torch.randn(*x0.shape, generator=gen)
        lhs, rhs = (u * gmap.jv(v)).sum(), gmap.jtu(u) @ v
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(float(lhs)))


def test_jv_takes_parameter_shaped_vectors(case) -> None:
    """``jv`` of parameter-shaped tensors (dict or list) equals ``jv`` of the flat vector: the flattening order is
    ``named_parameters`` order. Rules out a flatten/unflatten order mismatch."""
    _, _, _, gmap, _ = case
    v = torch.randn(gmap.dtheta, generator=torch.Generator().manual_seed(2))
    shaped = gmap.unflatten(v)
    assert list(shaped) == list(gmap.params)
    assert all(shaped[k].shape == p.shape for k, p in gmap.params.items())
    torch.testing.assert_close(gmap.jv(shaped), gmap.jv(v), rtol=0, atol=0)
    torch.testing.assert_close(gmap.jv(list(shaped.values())), gmap.jv(v), rtol=0, atol=0)


def test_grad_is_the_shared_gradient(make_net, digits) -> None:
    """``g(x0)`` equals the ``.grad`` of ``cross_entropy(model(x0), y).backward()`` flattened in parameter order,
    and ``g`` at another x differs. Rules out a summed loss, a missing parameter, a shuffled order."""
    model = make_net("convnet5")
    x0, y = digits.x[:3], digits.y[:3]
    gmap = GradientMap(model, x0, y)
    model.zero_grad()
    F.cross_entropy(model(x0), y).backward()
    torch.testing.assert_close(gmap.grad(), flatten([p.grad for p in model.parameters()]), rtol=0, atol=1e-14)
    assert not torch.allclose(gmap.grad(digits.x[3:6]), gmap.grad())


def test_dtype_cast_copies_and_frozen_parameters_are_not_theta(make_net, digits) -> None:
    """``dtype=float64`` casts a copy (the float32 model is untouched); parameters with ``requires_grad=False``
    are held fixed, not part of θ. Rules out casting the caller's model in place and J over frozen layers."""
    torch.manual_seed(0)
    model = make_net("sigmoid_mlp").float()
    model.head.weight.requires_grad_(False)
    gmap = GradientMap(model, digits.x[:1].float(), digits.y[:1], dtype=torch.float64)
    assert model.head.bias.dtype == torch.float32
    assert gmap.grad().dtype == torch.float64
    assert "head.weight" not in gmap.params
    assert gmap.dtheta == sum(p.numel() for p in model.parameters()) - model.head.weight.numel()
    model.zero_grad()
    F.cross_entropy(model.double()(digits.x[:1]), digits.y[:1]).backward()
    want = flatten([p.grad for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(gmap.grad(), want, rtol=1e-6, atol=1e-7)  # float32 weights, float64 arithmetic


def test_dense_jacobian_operator_and_flat_helpers() -> None:
    """DenseJacobian's products are J@v and Jᵀ@u with batches; flatten/unflatten round-trip and reject a wrong size."""
    J = torch.arange(6.0).reshape(2, 3)
    op = DenseJacobian(J)
    assert (op.dx, op.dtheta, op.x_shape) == (2, 3, (2,))
    torch.testing.assert_close(op.jv(torch.tensor([1.0, 0.0, -1.0])), torch.tensor([-2.0, -2.0]))
    torch.testing.assert_close(op.jtu(torch.tensor([[1.0, 1.0]])), torch.tensor([[3.0, 5.0, 7.0]]))
    like = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    parts = unflatten(torch.arange(7.0), like)
    assert parts["a"].tolist() == [[0.0, 1.0], [2.0, 3.0]] and parts["b"].tolist() == [4.0, 5.0, 6.0]
    torch.testing.assert_close(flatten(parts), torch.arange(7.0))
    with pytest.raises(ValueError, match="7 entries"):
        unflatten(torch.arange(6.0), like)
