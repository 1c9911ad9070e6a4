"""PSNR and MS-SSIM of the RD harness (brief §8.11, learned image coding).

Oracles: closed-form PSNR values, MS-SSIM(x, x) = 1, the ReLU making an
inverted image score exactly 0, and pytorch-msssim 1.0 (golden numbers
committed below; a live comparison runs where pytorch-msssim is installed).
"""

import math

import numpy as np
import pytest

from jaxlib_models.compression import metrics

# pytorch-msssim 1.0.0 (torch 2.13 CPU), ms_ssim(X, Y, data_range=255) on
# float64 NCHW tensors of skimage.data.astronaut() and `_noisy` of it
# (noise drawn for the full image, then both cropped).
# If this change is intended (parameterisation, defaults, test image),
# update the reference values from pytorch-msssim.
GOLDEN_FULL = 0.9235875357563293  # full 512x512 image
GOLDEN_ODD = 0.8988771241057907  # [:333, :177] crop: odd sides at 4 scales
# 1e-9: both sides compute in float64; measured agreement 4e-16. Planted
# bugs and their effect: a float64-exact Gaussian window instead of
# pytorch-msssim's float32 one moves the values by 1.6e-6 / 2.4e-6; padding
# left out of the pooling mean moves GOLDEN_ODD by 1.3e-4, no padding
# (floor pooling) by 8e-4.
TOL = 1e-9


def _astronaut():
  skimage_data = pytest.importorskip("skimage.data")
  return skimage_data.astronaut()


def _noisy(x: np.ndarray) -> np.ndarray:
  """x + fixed pseudo-noise in [-20, 20], clipped; an explicit LCG so the
  golden does not depend on NumPy's RNG stream policy."""
  i = np.arange(x.size, dtype=np.uint64)
  u = (i * np.uint64(6364136223846793005) + np.uint64(1442695040888963407))
  u = (u >> np.uint64(33)) % np.uint64(41)
  noise = u.reshape(x.shape).astype(np.int64) - 20
  return np.clip(x.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def _rand_img(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


class TestPSNR:

  def test_identical_images_give_inf(self):
    x = _rand_img((8, 9, 3))
    assert metrics.psnr(x, x.copy()) == math.inf

  def test_closed_form(self):
    a = np.zeros((4, 6, 3), np.uint8)
    b = np.full((4, 6, 3), 5, np.uint8)  # MSE 25
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25),
                                               abs=1e-12)

  def test_mse_over_all_rgb_values(self):
    """Planted bug caught: an MSE over one channel or over luma only."""
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[..., 2] = 3  # only blue differs: MSE over all values = 9 / 3
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 3),
                                               abs=1e-12)

  def test_mean_psnr_averages_per_image_psnrs(self):
    """Planted bug caught: PSNR of the mean MSE gives 31.10 dB, not 38.13."""
    a = np.zeros((4, 4, 3), np.uint8)
    b1 = np.full_like(a, 1)  # MSE 1 -> 48.13 dB
    b2 = np.full_like(a, 10)  # MSE 100 -> 28.13 dB
    expected = (10 * math.log10(255**2 / 1) +
                10 * math.log10(255**2 / 100)) / 2
    got = metrics.mean_psnr([(a, b1), (a, b2)])
    assert got == pytest.approx(expected, abs=1e-12)
    assert abs(got - 10 * math.log10(255**2 / 50.5)) > 5

  def test_rejects_float_and_mismatched_images(self):
    x = _rand_img((8, 8, 3))
    with pytest.raises(ValueError, match="uint8"):
      metrics.psnr(x, x.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
      metrics.psnr(x, x[:4])


class TestMSSSIM:

  def test_identical_is_one(self):
    x = _rand_img((170, 190, 3), seed=1)
    assert metrics.ms_ssim(x, x.copy()) == pytest.approx(1.0, abs=1e-12)

  def test_inverted_image_is_zero_by_relu(self):
    """Negative contrast-structure terms are clamped to 0 (pytorch-msssim
    ReLU), so the product is exactly 0. Planted bug caught: without the ReLU
    the fractional power of a negative number is NaN."""
    x = _astronaut()
    assert metrics.ms_ssim(x, 255 - x) == 0.0

  @pytest.mark.parametrize("shape", [(160, 300, 3), (300, 160, 3),
                                     (64, 64, 3)])
  def test_small_images_raise(self, shape):
    x = _rand_img(shape)
    with pytest.raises(ValueError, match="> 160"):
      metrics.ms_ssim(x, x)

  def test_smallest_allowed_side(self):
    x = _rand_img((161, 161, 3), seed=2)
    y = _noisy(x)
    assert 0.0 < metrics.ms_ssim(x, y) < 1.0

  @pytest.mark.parametrize("crop,golden", [
      ((slice(None), slice(None)), GOLDEN_FULL),
      ((slice(0, 333), slice(0, 177)), GOLDEN_ODD),
  ])
  def test_golden_from_pytorch_msssim(self, crop, golden):
    x = _astronaut()
    y = _noisy(x)  # noise of the full image, then cropped
    assert metrics.ms_ssim(x[crop], y[crop]) == pytest.approx(golden, abs=TOL)

  @pytest.mark.oracle
  @pytest.mark.parametrize("crop", [(slice(None), slice(None)),
                                    (slice(0, 333), slice(0, 177)),
                                    (slice(7, 250), slice(3, 420))])
  def test_live_against_pytorch_msssim(self, crop):
    """Live oracle, float64 (1e-9) and float32 as CompressAI calls it (1e-6:
    float32 accumulation differs by ~3e-7 here)."""
    torch = pytest.importorskip("torch")
    pms = pytest.importorskip("pytorch_msssim")
    x = _astronaut()
    x, y = x[crop], _noisy(x)[crop]
    ours = metrics.ms_ssim(x, y)

    def t(a, dtype):
      return torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None].to(
          dtype)

    ref64 = float(pms.ms_ssim(t(x, torch.float64), t(y, torch.float64),
                              data_range=255))
    ref32 = float(pms.ms_ssim(t(x, torch.float32), t(y, torch.float32),
                              data_range=255))
    assert ours == pytest.approx(ref64, abs=TOL)
    assert ours == pytest.approx(ref32, abs=1e-6)

  def test_db(self):
    assert metrics.ms_ssim_db(0.9) == pytest.approx(10.0, abs=1e-12)
    assert metrics.ms_ssim_db(0.99) == pytest.approx(20.0, abs=1e-12)
    assert metrics.ms_ssim_db(1.0) == math.inf
    with pytest.raises(ValueError):
      metrics.ms_ssim_db(1.5)
