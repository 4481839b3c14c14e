"""The eager step of a lone inversion (robust/inversion.py ``autograd_gradient``, ``_bound_model``,
``_AtenConv``): the same triggers as the ``torch.func`` step, on a private copy of the model.

The vectorised and recorded paths take the step's gradient with ``torch.func.grad`` of a ``functional_call``;
a lone job on a CPU takes it with ``torch.autograd.grad`` on a copy of the model holding the job's weights,
its thin convolutions on ATen's kernels. Speed: benchmarks/inversion_cpu.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fedtrust.errors import ConfigError
from fedtrust.models import create_model
from fedtrust.robust import inversion
from fedtrust.robust.inversion import (InversionJob, InversionParams, autograd_gradient, functorch_gradient,
                                       init_state)

PARAMS = InversionParams(tau_inv=0.5)


def _trained(name: str, shape: tuple[int, int, int], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model in eval mode whose BN running statistics (if any) are not the initial ones."""
    torch.manual_seed(0)
    model = create_model(name, 10, shape).to(dtype)
    with torch.no_grad():
        model.train()(torch.rand(32, *shape, dtype=dtype) * 3)
    return model.eval()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: v.detach() for n, v in [*model.named_parameters(), *model.named_buffers()]}


def _job(model: nn.Module, shell: nn.Module, n: int, steps: int, seed: int = 0) -> InversionJob:
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *model.in_shape, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        top = int(torch.bincount(model(x).argmax(1), minlength=10).argmax())
    group = torch.zeros(n, dtype=torch.int64)
    return InversionJob(shell, _weights(model), x, group, torch.full((n,), top), 1, steps, g, 1e-3, [None], None,
                        PARAMS)


def _run(job: InversionJob, functional: bool) -> tuple[inversion.InversionState, dict[str, torch.Tensor]]:
    """The job's final state and history, stepped by the torch.func step or the eager autograd one."""
    a, b = inversion._start(job.k, tuple(job.images.shape[1:]), job.generator, job.images, job.params, job.inits)
    noise = inversion._step_noise(a.shape, b.shape, job.steps, job.generator, job.images)
    if functional:
        step, args = inversion._step_fn(job), (job.weights, job.images, job.group, job.target)
    else:
        step, args = inversion._bound_step_fn(job), (job.images, job.group, job.target)
    return inversion._eager_steps(step, init_state(a, b, job.lam0), noise, args, job.steps, job.shell)


def test_autograd_gradient_equals_functorch_gradient_to_the_bit(float64):
    """One gradient of the objective both ways, on a BN model with non-trivial running statistics: equal to the
    bit in float64 (no oneDNN), so the eager step is the functional step, not an approximation of it."""
    model = _trained("cnn", (1, 8, 8), torch.float64)
    x = torch.rand(10, 1, 8, 8)
    group, target = torch.tensor([0] * 6 + [1] * 4), torch.tensor([3] * 6 + [7] * 4)
    raw = (torch.randn(2, 8, 8), torch.randn(2, 1, 8, 8))
    lam = torch.tensor([1e-3, 2e-2])
    g_func, aux_func = functorch_gradient(raw, lam, lambda z: functional_call(model, _weights(model), (z,)),
                                          x, group, target)
    bound = inversion._bound_model(model, _weights(model))
    g_auto, aux_auto = autograd_gradient(raw, lam, bound, x, group, target)
    assert all(torch.equal(u, v) for u, v in zip(g_func, g_auto))
    assert all(torch.equal(u, v) for u, v in zip(aux_func, aux_auto))
    assert float(g_auto[0].abs().sum()) > 0 and float(g_auto[1].abs().sum()) > 0
    assert not raw[0].requires_grad  # the caller's tensors are not turned into leaves


def test_a_lone_inversion_equals_the_functional_steps_and_leaves_the_shell_alone(float64):
    """A whole inversion stepped eagerly on the bound copy gives the functional step's state and history to the
    bit (a copy in train mode, or holding the shell's weights instead of the job's, would not); the shared
    shell's weights and mode are untouched."""
    model, shell = _trained("cnn", (1, 8, 8), torch.float64), create_model("cnn", 10, (1, 8, 8)).double().train()
    before = {k: v.clone() for k, v in shell.state_dict().items()}
    job = _job(model, shell, 12, 40)
    eager, eager_hist = _run(job, functional=False)
    func, func_hist = _run(_job(model, shell, 12, 40), functional=True)
    assert all(torch.equal(u, v) for u, v in zip(eager, func))
    assert all(torch.equal(eager_hist[k], func_hist[k]) for k in inversion.STATS)
    assert bool(torch.isfinite(eager.best_l1).all()), "the test needs a trigger that reached τ_inv"
    assert shell.training and all(torch.equal(v, before[k]) for k, v in shell.state_dict().items())


def test_the_bound_model_holds_the_jobs_weights_without_copying_them():
    model, shell = _trained("lenet", (1, 28, 28)), create_model("lenet", 10, (1, 28, 28))
    weights = _weights(model)
    bound = inversion._bound_model(shell, weights)
    own = dict([*bound.named_parameters(), *bound.named_buffers()])
    assert own.keys() == weights.keys()
    assert all(own[k].data_ptr() == weights[k].data_ptr() for k in weights)
    assert not any(p.requires_grad for p in bound.parameters()) and not bound.training
    assert all(p.requires_grad for p in shell.parameters())  # the shell is not the copy


def test_the_bound_model_refuses_weights_of_another_architecture():
    shell = create_model("lenet", 10, (1, 28, 28))
    weights = _weights(create_model("cnn", 10, (1, 28, 28)))
    with pytest.raises(ConfigError, match="inversion weights do not fit the model: missing .*body"):
        inversion._bound_model(shell, weights)


class OneConv(nn.Module):
    def __init__(self, c_in: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 8, 5, padding=2, stride=stride, dilation=dilation, groups=groups)
        side = (10 + 4 - dilation * 4 - 1) // stride + 1
        self.head = nn.Linear(8 * side * side, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _logits_and_input_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    return out.detach(), g


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN to avoid")
@pytest.mark.parametrize("c_in, stride, dilation, groups, thin",
                         [(1, 1, 1, 1, True), (3, 1, 1, 1, True), (3, 2, 2, 1, True), (4, 1, 1, 1, False),
                          (2, 1, 1, 2, False)])
def test_thin_convolutions_run_on_aten_kernels_in_forward_and_backward(c_in, stride, dilation, groups, thin):
    """A thin first layer (≤ ATEN_CONV_MAX_IN_CHANNELS input channels, ungrouped; strided and dilated too)
    computes, forward and input gradient, exactly what the layer computes with oneDNN off everywhere; a
    wider or grouped one is left on oneDNN (exactly the shell's numbers); the global switch is restored."""
    torch.manual_seed(c_in)
    shell = OneConv(c_in, stride, dilation, groups).eval()
    bound = inversion._bound_model(shell, _weights(shell))
    x = torch.rand(6, c_in, 10, 10)
    got = _logits_and_input_grad(bound, x)
    assert torch.backends.mkldnn.enabled
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        aten = _logits_and_input_grad(shell, x)
    finally:
        torch.backends.mkldnn.enabled = was
    onednn = _logits_and_input_grad(shell, x)
    assert ("forward" in vars(bound.conv)) == thin and "forward" not in vars(shell.conv)
    want = aten if thin else onednn
    assert all(torch.equal(u, v) for u, v in zip(got, want))
    assert all(torch.allclose(u, v, rtol=1e-4, atol=1e-5) for u, v in zip(aten, onednn))


def test_no_thin_convolution_is_rebound_when_turned_off(monkeypatch):
    monkeypatch.setattr(inversion, "ATEN_CONV_MAX_IN_CHANNELS", 0)
    shell = OneConv(1).eval()
    bound = inversion._bound_model(shell, _weights(shell))
    assert "forward" not in vars(bound.conv)
