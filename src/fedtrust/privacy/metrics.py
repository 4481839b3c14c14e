"""Reconstruction metrics of the gradient-leakage audit (spec i2f.md §4).

All image metrics compare a reconstruction ``x_hat`` with the private ``x0``,
both ``(B, C, H, W)`` model-input tensors (normalized space, spec §7.5), and
return one value per image ``(B,)``; the spec's batch numbers are their mean.

**Data range.** PSNR and SSIM take the data range ``L`` of the space the
images live in. In normalized space ``x = (p − m) / s`` with pixels ``p`` in
[0, 1], ``L = 1 / s`` (spec §4's ``peak = 1/std``), and then PSNR equals the
PSNR of the [0, 1] images (``MSE`` and ``L²`` both scale by ``1/s²``). SSIM
with ``C1, C2 ∝ L²`` is invariant to that scale but not to the shift ``m/s``
(its luminance term reads the local means), so SSIM of normalized tensors,
which is what the I2F code reports (spec §4), differs from the [0, 1] SSIM:
denormalize first for the latter. For [0, 1] images ``L = 1``. Colour sets
have one std per channel; these helpers take a single ``L`` (use the [0, 1]
images there).

Correlations (spec §4: the paper's statistic is not found; Pearson and
Spearman, GUESS) wrap ``scipy.stats`` (installed with scikit-learn and
scikit-image, declared in pyproject).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

SSIM_WINDOW = 11  # Gaussian window side (spec §4)
SSIM_SIGMA = 1.5  # its σ
SSIM_K1, SSIM_K2 = 0.01, 0.03  # C1 = (K1·L)², C2 = (K2·L)²


def _check_pair(x_hat: Tensor, x0: Tensor) -> None:
    if x_hat.shape != x0.shape or x0.ndim < 2:
        raise ValueError(f"x_hat and x0 must be batches of the same shape, got {tuple(x_hat.shape)} and "
                         f"{tuple(x0.shape)}")


def mse(x_hat: Tensor, x0: Tensor) -> Tensor:
    """Per-image mean squared error over all elements of an image (spec §4): ``(B,)``."""
    _check_pair(x_hat, x0)
    return (x_hat - x0).pow(2).flatten(1).mean(dim=1)


def l2_error(x_hat: Tensor, x0: Tensor) -> Tensor:
    """Per-image ``‖x_hat − x0‖₂ = sqrt(d · MSE)`` over the whole image: on the scale of I2F (spec §4, §7.4)."""
    _check_pair(x_hat, x0)
    return (x_hat - x0).flatten(1).norm(dim=1)


def psnr(x_hat: Tensor, x0: Tensor, data_range: float) -> Tensor:
    """Per-image PSNR ``10·log10(L² / MSE)`` in dB (spec §4), ``L = data_range`` (module docstring:
    ``1/std`` in normalized space, which gives the [0, 1] PSNR). A perfect reconstruction gives ``inf``."""
    return 10.0 * torch.log10(data_range**2 / mse(x_hat, x0))


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The normalized 1-D Gaussian of side :data:`SSIM_WINDOW`, σ :data:`SSIM_SIGMA`: ``(SSIM_WINDOW,)``."""
    r = SSIM_WINDOW // 2
    t = torch.arange(-r, r + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (t / SSIM_SIGMA) ** 2)
    return w / w.sum()


def ssim(x_hat: Tensor, x0: Tensor, data_range: float, border: Literal["valid", "zero"] = "valid") -> Tensor:
    """Per-image SSIM (Wang et al. 2004), Gaussian window 11, σ 1.5, mean of the SSIM map (spec §4): ``(B,)``.

    Local means, variances and covariance are Gaussian-weighted (population
    covariance), ``C1 = (0.01·L)²``, ``C2 = (0.03·L)²``, ``L = data_range``;
    channels are averaged. ``border`` says which positions the map is averaged over:

    - ``"valid"`` (default): only positions whose whole 11×11 window lies in
      the image, ``(H − 10) × (W − 10)`` of them, so ``H, W ≥ 11``. This is
      what ``skimage.metrics.structural_similarity(gaussian_weights=True,
      sigma=1.5, use_sample_covariance=False, data_range=L)`` computes: it
      filters with mode ``reflect`` and then crops the 5-pixel strip, so the
      padding never reaches the mean. The tests check this against skimage.
    - ``"zero"``: zero-padded filtering, mean over all ``H × W`` positions, as
      the I2F code's inversefed SSIM (spec §4); any size, the 8×8 digits
      included, but the border windows see the padding.

    Raises:
        ValueError: ``"valid"`` on an image smaller than 11×11.
    """
    _check_pair(x_hat, x0)
    if x0.ndim != 4:
        raise ValueError(f"ssim needs (B, C, H, W) images, got shape {tuple(x0.shape)}")
    b, c, h, w = x0.shape
    if border == "valid" and min(h, w) < SSIM_WINDOW:
        raise ValueError(f"ssim border='valid' needs H, W >= {SSIM_WINDOW}, got {h}x{w}; use border='zero'")
    if border not in ("valid", "zero"):
        raise ValueError(f"border must be 'valid' or 'zero', got {border!r}")
    pad = 0 if border == "valid" else SSIM_WINDOW // 2
    g = _gaussian_window(x0.dtype, x0.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, padding=pad, groups=c)

    mu_x, mu_y = blur(x_hat), blur(x0)
    var_x = blur(x_hat * x_hat) - mu_x**2
    var_y = blur(x0 * x0) - mu_y**2
    cov = blur(x_hat * x0) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


@torch.no_grad()
def feature_mse(model: nn.Module, x_hat: Tensor, x0: Tensor) -> Tensor:
    """Per-image FMSE: mean over the logits of ``(f(x_hat) − f(x0))²`` (spec §4), in the model's current mode."""
    _check_pair(x_hat, x0)
    return (model(x_hat) - model(x0)).pow(2).flatten(1).mean(dim=1)


def label_accuracy(predicted: Tensor, labels: Tensor) -> float:
    """Fraction of recovered labels equal to the true ones (for attacks that infer the label, e.g. iDLG)."""
    if predicted.shape != labels.shape or labels.numel() == 0:
        raise ValueError(f"predicted and labels must be non-empty and of one shape, got {tuple(predicted.shape)} "
                         f"and {tuple(labels.shape)}")
    return float((predicted == labels).double().mean())


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two 1-D series (``scipy.stats.pearsonr``; spec §4 GUESS, §6.6)."""
    from scipy import stats

    return float(stats.pearsonr(_numpy_1d(a), _numpy_1d(b)).statistic)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D series, ties at mean rank (``scipy.stats.spearmanr``; spec §6.6)."""
    from scipy import stats

    return float(stats.spearmanr(_numpy_1d(a), _numpy_1d(b)).statistic)


def _numpy_1d(t: Tensor) -> np.ndarray:
    t = torch.as_tensor(t).detach().cpu().double()
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"correlations need 1-D series of at least 2 values, got shape {tuple(t.shape)}")
    return t.numpy()
