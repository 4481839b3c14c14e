"""Reconstruction metrics (spec i2f.md §4): SSIM against scikit-image, MSE/PSNR and correlations by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage, stats
from skimage.metrics import structural_similarity

from fedtrust.privacy.metrics import feature_mse, l2_error, label_accuracy, mse, pearson, psnr, spearman, ssim

pytestmark = pytest.mark.usefixtures("float64")

SSIM_TOL = 1e-10
"""float64 SSIM vs skimage: both are the same sums in a different order (measured: < 3e-15)."""


def skimage_ssim(x_hat: torch.Tensor, x0: torch.Tensor, data_range: float) -> np.ndarray:
    """Per-image SSIM by scikit-image with the spec's window: Gaussian σ 1.5 (11x11), population covariance."""
    return np.array([structural_similarity(a.numpy(), b.numpy(), gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=data_range, channel_axis=0)
                     for a, b in zip(x_hat, x0)])


def noisy(x: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    return x + scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def test_ssim_matches_skimage_on_random_images() -> None:
    """Two channels, non-square 16x21, data range 2, noise at three levels: per image equal to skimage to 1e-10.
    Rules out zero padding in the mean (skimage averages only windows inside the image), sample covariance,
    a box window, C1/C2 not scaled by the data range, and swapped H/W."""
    g = torch.Generator().manual_seed(0)
    x0 = 2 * torch.rand(3, 2, 16, 21, generator=g)
    x_hat = torch.stack([noisy(x0[i], s, i) for i, s in enumerate((0.05, 0.3, 1.0))])
    got = ssim(x_hat, x0, data_range=2.0).numpy()
    want = skimage_ssim(x_hat, x0, 2.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=SSIM_TOL)
    assert got[0] > got[1] > got[2]  # more noise, lower SSIM: not a degenerate comparison


def test_ssim_matches_skimage_on_digits(digits) -> None:
    """Real digits, upsampled 4x to 32x32 (skimage's 11x11 window does not fit 8x8), in [0, 1] and in normalized
    space with L = 1/std: equal to skimage to 1e-10."""
    up = digits.pixels[:6].repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)
    x_hat = noisy(up, 0.1, 1).clamp(0, 1)
    np.testing.assert_allclose(ssim(x_hat, up, 1.0).numpy(), skimage_ssim(x_hat, up, 1.0), rtol=0, atol=SSIM_TOL)
    m, s = 0.3, digits.std
    np.testing.assert_allclose(ssim((x_hat - m) / s, (up - m) / s, 1 / s).numpy(),
                               skimage_ssim((x_hat - m) / s, (up - m) / s, 1 / s), rtol=0, atol=SSIM_TOL)


def test_ssim_matches_skimage_on_mnist(shared_data) -> None:
    """Real 28x28 MNIST test images (from ../shared/data; skipped where absent), equal to skimage to 1e-10."""
    with np.load(shared_data / "mnist" / "test.npz") as f:
        x0 = torch.from_numpy(f["x"][:4].astype(np.float64) / 255.0).reshape(4, 1, 28, 28)
    x_hat = noisy(x0, 0.2, 2)
    np.testing.assert_allclose(ssim(x_hat, x0, 1.0).numpy(), skimage_ssim(x_hat, x0, 1.0), rtol=0, atol=SSIM_TOL)


def test_ssim_zero_border_on_8x8_digits(digits) -> None:
    """``border="zero"`` (the I2F code's inversefed SSIM) on 8x8 digits equals the mean SSIM map from
    ``scipy.ndimage.gaussian_filter(mode="constant", truncate=3.5)`` (zero padding, radius 5); identical images
    give 1; ``"valid"`` refuses 8x8 in one line."""
    x0 = digits.pixels[:5]
    x_hat = noisy(x0, 0.1, 3)

    def reference(p: np.ndarray, q: np.ndarray, L: float) -> float:
        def f(t: np.ndarray) -> np.ndarray:
            return ndimage.gaussian_filter(t, 1.5, truncate=3.5, mode="constant", cval=0.0)

        mp, mq = f(p), f(q)
        vp, vq, c = f(p * p) - mp**2, f(q * q) - mq**2, f(p * q) - mp * mq
        c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
        return float(((2 * mp * mq + c1) * (2 * c + c2) / ((mp**2 + mq**2 + c1) * (vp + vq + c2))).mean())

    want = [reference(a[0].numpy(), b[0].numpy(), 1.0) for a, b in zip(x_hat, x0)]
    np.testing.assert_allclose(ssim(x_hat, x0, 1.0, border="zero").numpy(), want, rtol=0, atol=SSIM_TOL)
    torch.testing.assert_close(ssim(x0, x0, 1.0, border="zero"), torch.ones(5))
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(x_hat, x0, 1.0)


def test_mse_psnr_l2_by_hand() -> None:
    """x0 = 0, x_hat = [0.1, 0.2, 0.3, 0.4]: MSE = 0.3/4 = 0.075, PSNR = 10·log10(1/0.075) = 11.2494 dB,
    ‖x_hat − x0‖ = √0.3. Per image (the second image is exact: MSE 0, PSNR inf). In normalized space with
    L = 1/std the PSNR is unchanged (spec §4). Rules out a sum instead of a mean, 20·log10 of MSE, a batch mean."""
    x_hat = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    x0 = torch.zeros_like(x_hat)
    x0[1] = 0.5
    torch.testing.assert_close(mse(x_hat, x0), torch.tensor([0.075, 0.0]))
    torch.testing.assert_close(l2_error(x_hat, x0), torch.tensor([math.sqrt(0.3), 0.0]))
    p = psnr(x_hat, x0, 1.0)
    assert abs(p[0].item() - 11.249387366083) < 1e-9 and math.isinf(p[1].item())
    s, m = 0.3, 0.13
    torch.testing.assert_close(psnr((x_hat[:1] - m) / s, (x0[:1] - m) / s, 1 / s), p[:1])
    with pytest.raises(ValueError, match="same shape"):
        mse(x_hat, x0[:1])


def test_feature_mse_and_label_accuracy_by_hand() -> None:
    """A linear 'model' f(x) = [sum x, 2·sum x]: images differing by a total of 0.5 give logit differences 0.5 and
    1.0, FMSE = (0.25 + 1)/2 = 0.625. Labels [1, 2, 3, 4] vs [1, 0, 3, 0]: accuracy 0.5."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0] * 4, [2.0] * 4]))
    x0 = torch.zeros(1, 1, 2, 2)
    x_hat = torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(feature_mse(model, x_hat, x0), torch.tensor([0.625]))
    assert label_accuracy(torch.tensor([1, 0, 3, 0]), torch.tensor([1, 2, 3, 4])) == 0.5


def test_correlations_by_hand_and_against_scipy() -> None:
    """a = [1, 2, 3], b = [1, 2, 10]: Pearson = 9/√(2·438/9) = 0.912245 (by hand), Spearman = 1 (monotone).
    With ties, a = [1, 1, 2, 3], b = [4, 3, 2, 1]: Spearman on mean ranks equals scipy's. Rules out Pearson and
    Spearman swapped and ranks without tie handling."""
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 10.0])
    assert abs(pearson(a, b) - 9 / math.sqrt(2 * 438 / 9)) < 1e-12
    assert abs(spearman(a, b) - 1.0) < 1e-12
    c, d = torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert abs(spearman(c, d) - stats.spearmanr(c.numpy(), d.numpy()).statistic) < 1e-12
    assert spearman(c, d) > -1.0  # the tie keeps it off -1
    with pytest.raises(ValueError, match="1-D"):
        pearson(torch.ones(2, 2), torch.ones(2, 2))
