"""Bilinear backward warp vs cv2.remap and torch grid_sample, and estimators.

Tolerances (float32, images in [0, 1]): 1e-5 vs cv2.remap (observed ~1e-7;
OpenCV 5 interpolates float images without a coordinate table), 1e-5 vs
grid_sample(align_corners=True) (oracle). Flows reach +-4 px on 20x30 images
so many samples straddle the border, where every outside neighbour counts 0.
Planted-bug checks done while writing: (dy, dx) flow order, clamping instead
of zeroing outside neighbours, align_corners=False normalisation, forgetting
the per-corner validity (whole sample zeroed) -- each failed a test below.
"""

import cv2
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxlib_models.video import synthetic
from jaxlib_models.video.flow import estimators, warp

pytestmark = pytest.mark.usefixtures("fast_compile")


def _random(seed, n=2, h=20, w=30, c=3, reach=4.0):
  rng = np.random.RandomState(seed)
  img = rng.rand(n, h, w, c).astype(np.float32)
  flow = rng.uniform(-reach, reach, (n, h, w, 2)).astype(np.float32)
  flow[:, :3, :3] = 0.0  # some exact pixel centres
  flow[:, -3:, :4] = np.round(flow[:, -3:, :4])  # integer displacements
  return img, flow


def _remap(img, flow):
  h, w = flow.shape[:2]
  gx, gy = np.meshgrid(np.arange(w, dtype=np.float32),
                       np.arange(h, dtype=np.float32))
  return cv2.remap(img, gx + flow[..., 0], gy + flow[..., 1],
                   cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                   borderValue=0)


def test_matches_cv2_remap():
  img, flow = _random(0)
  got = np.asarray(warp.backward_warp(img, flow))
  for k in range(len(img)):
    want = _remap(img[k], flow[k])
    assert np.abs(got[k] - want).max() <= 1e-5
    single = np.asarray(warp.backward_warp(img[k], flow[k]))
    assert np.abs(single - want).max() <= 1e-5
  # A gray image (C = 1) and uint8 input (read as float).
  gray = (img[0, ..., :1] * 255).astype(np.uint8)
  want = _remap(gray.astype(np.float32), flow[0])
  got = np.asarray(warp.backward_warp(gray, flow[0]))[..., 0]
  assert np.abs(got - want).max() <= 1e-3  # 0-255 scale


@pytest.mark.oracle
def test_grid_sample_matches_torch():
  torch = pytest.importorskip("torch")
  img, flow = _random(1)
  grid = np.asarray(warp.flow_to_grid(flow))
  with torch.no_grad():
    want = torch.nn.functional.grid_sample(
        torch.tensor(img.transpose(0, 3, 1, 2)), torch.tensor(grid),
        mode="bilinear", padding_mode="zeros", align_corners=True)
  want = want.numpy().transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(warp.grid_sample(img, grid)) - want).max() <= 1e-5
  assert np.abs(np.asarray(warp.backward_warp(img, flow)) - want).max() <= 1e-5
  # A non-square output grid (P, Q differ from H, W).
  g2 = np.random.RandomState(2).uniform(-1.2, 1.2, (2, 7, 11, 2))
  g2 = g2.astype(np.float32)
  with torch.no_grad():
    want2 = torch.nn.functional.grid_sample(
        torch.tensor(img.transpose(0, 3, 1, 2)), torch.tensor(g2),
        align_corners=True).numpy().transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(warp.grid_sample(img, g2)) - want2).max() <= 1e-5


def test_zero_flow_is_identity_and_integer_shift_is_roll():
  img, _ = _random(3, n=1)
  img = img[0]
  zero = np.zeros(img.shape[:2] + (2,), np.float32)
  np.testing.assert_array_equal(np.asarray(warp.backward_warp(img, zero)),
                                img)
  dx, dy = 3, -2
  shift = np.broadcast_to(np.float32([dx, dy]), zero.shape)
  got = np.asarray(warp.backward_warp(img, shift))
  want = np.roll(img, (-dy, -dx), axis=(0, 1))  # want[y, x] = img[y+dy, x+dx]
  h, w = img.shape[:2]
  inside = np.zeros((h, w), bool)
  inside[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = True
  np.testing.assert_array_equal(got[inside], want[inside])
  np.testing.assert_array_equal(got[~inside], 0.0)


def test_jit_batch_broadcast_and_errors():
  img, flow = _random(4)
  shared = np.asarray(jax.jit(warp.backward_warp)(img, flow[0]))
  for k in range(2):
    np.testing.assert_allclose(shared[k], _remap(img[k], flow[0]), atol=1e-5)
  with pytest.raises(ValueError, match="flow must be"):
    warp.backward_warp(img, flow[..., :1])
  with pytest.raises(ValueError, match="batch of flows"):
    warp.backward_warp(img[0], flow)
  g = warp.pixel_to_grid(jnp.float32(0), jnp.float32(19), 20, 30)
  np.testing.assert_allclose(np.asarray(g), [-1.0, 1.0])


def test_synthetic_flows_follow_the_warp_convention():
  """backward_warp(frame_t, backward_t) ~ frame_{t+1} and
  backward_warp(frame_{t+1}, forward_t) ~ frame_t (mean abs, 0-255, 4 px
  border excluded): exact for integer shifts, interpolation-limited (< 1.0,
  observed 0.50-0.75) for subpixel shift / rotation."""
  for motion, tol in (("integer", 0.0), ("subpixel", 1.0), ("rotate", 1.0),
                      ("mixed", 1.0)):
    v = synthetic.make_video(6, 64, 96, motion)
    f = v.frames.astype(np.float32)
    nxt = np.asarray(warp.backward_warp(f[:-1], v.backward))
    prev = np.asarray(warp.backward_warp(f[1:], v.forward))
    assert np.abs(nxt - f[1:])[:, 4:-4, 4:-4].mean() <= tol, motion
    assert np.abs(prev - f[:-1])[:, 4:-4, 4:-4].mean() <= tol, motion
    # The sign convention matters: the opposite flow is far off.
    wrong = np.asarray(warp.backward_warp(f[:-1], v.forward))
    if motion != "static":
      assert np.abs(wrong - f[1:])[:, 4:-4, 4:-4].mean() > 3.0, motion
  v = synthetic.make_video(3, 64, 96, "integer")
  np.testing.assert_allclose(v.forward, np.broadcast_to([-2.0, -1.0],
                                                        v.forward.shape))
  np.testing.assert_allclose(v.backward, -v.forward)
  with pytest.raises(ValueError, match="canvas"):
    synthetic.make_video(200, 64, 96, "integer")


def test_estimators_registry_and_accuracy():
  v = synthetic.make_video(4, 64, 96, "mixed")
  with pytest.raises(ValueError, match="unknown flow estimator 'raft'.*dis"):
    estimators.get_flow_estimator("raft")
  with pytest.raises(ValueError, match="preset"):
    estimators.DISFlow("slow")
  gt = estimators.get_flow_estimator("gt", frames=v.frames, forward=v.forward,
                                     backward=v.backward)
  fwd, bwd = estimators.compute_flows(v.frames, gt)
  np.testing.assert_array_equal(fwd, v.forward)
  np.testing.assert_array_equal(bwd, v.backward)
  with pytest.raises(KeyError, match="not a pair"):
    gt(v.frames[0], v.frames[2])
  # Interior end-point error, px: observed 0.045 (DIS), 0.038 (Farneback).
  for name, tol in (("dis", 0.1), ("farneback", 0.1)):
    est = estimators.get_flow_estimator(name)
    assert isinstance(est, estimators.FlowEstimator)
    fwd, bwd = estimators.compute_flows(v.frames, est)
    assert fwd.shape == v.forward.shape and fwd.dtype == np.float32
    epe = np.linalg.norm(fwd - v.forward, axis=-1)[:, 8:-8, 8:-8].mean()
    epe_b = np.linalg.norm(bwd - v.backward, axis=-1)[:, 8:-8, 8:-8].mean()
    assert epe <= tol and epe_b <= tol, (name, epe, epe_b)
  same = estimators.DISFlow()(v.frames[0], v.frames[0])
  np.testing.assert_array_equal(same, 0.0)
