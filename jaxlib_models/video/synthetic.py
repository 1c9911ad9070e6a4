"""Synthetic videos with exact optical flow: a photo seen by a moving camera.

Frame t shows a smoothed photo (the canvas, larger than the frame) through a
window that translates and rotates:

  frame_t(x) = canvas(R(theta_t) (x - c_f) + c_c + s_t)

with c_f the frame centre, c_c the canvas centre, s_t the window shift and
theta_t its angle. Frames are rendered with cubic-spline interpolation of the
canvas (scipy.ndimage.map_coordinates, order 3), so the window stays inside
real image content and every frame pixel is valid. The true flows follow the
`flow.warp` convention: forward[t] maps frame t to t+1 (frame_t(x) =
frame_{t+1}(x + forward[t](x))), backward[t] maps t+1 to t, hence
`backward_warp(frames[t], backward[t]) ~ frames[t+1]`. The residual of that
reconstruction is bilinear-interpolation error plus uint8 rounding: the
canvas is blurred (`blur_sigma`) to keep it small.

T: frames, H/W: frame height/width.
"""

import dataclasses

import numpy as np
import scipy.ndimage
import skimage.data
import skimage.transform

_PHOTOS = {"astronaut": skimage.data.astronaut, "chelsea": skimage.data.chelsea}


@dataclasses.dataclass(frozen=True)
class Motion:
  """Camera-window motion; content moves by minus the shift in the frame."""

  shift: tuple[float, float] = (2.0, 1.0)  # Window (dx, dy) per frame, px.
  rotation: float = 0.0  # Window rotation per frame, radians.
  wobble: float = 0.0  # Amplitude (px) of a sinusoidal extra shift along x.
  wobble_period: float = 8.0  # Period of the wobble, frames.

  def __post_init__(self):
    if self.wobble_period <= 0:
      raise ValueError(f"{self.wobble_period=} must be > 0")

  def at(self, t: float) -> tuple[np.ndarray, float]:
    """Window shift (2,) and angle at frame t."""
    s = np.asarray(self.shift, np.float64) * t
    s[0] += self.wobble * np.sin(2 * np.pi * t / self.wobble_period)
    return s, self.rotation * t


MOTIONS = {
    "integer": Motion(shift=(2.0, 1.0)),
    "subpixel": Motion(shift=(0.6, -0.35)),
    "rotate": Motion(shift=(0.0, 0.0), rotation=0.01),
    "mixed": Motion(shift=(0.7, 0.4), rotation=0.006, wobble=1.5),
    "static": Motion(shift=(0.0, 0.0)),
}


@dataclasses.dataclass(frozen=True)
class SyntheticVideo:
  frames: np.ndarray  # (T, H, W, 3) uint8 RGB.
  forward: np.ndarray  # (T-1, H, W, 2) float32, frame t -> t+1.
  backward: np.ndarray  # (T-1, H, W, 2) float32, frame t+1 -> t.
  motion: Motion
  fps: float = 30.0


def _canvas(photo: str, height: int, width: int, blur_sigma: float
            ) -> np.ndarray:
  if photo not in _PHOTOS:
    raise ValueError(f"photo {photo!r}: use one of {sorted(_PHOTOS)}")
  img = _PHOTOS[photo]().astype(np.float64) / 255.0
  # Crop the photo to the canvas aspect ratio, centred, then resize.
  ih, iw = img.shape[:2]
  scale = min(ih / height, iw / width)
  ch, cw = int(round(height * scale)), int(round(width * scale))
  top, left = (ih - ch) // 2, (iw - cw) // 2
  img = img[top:top + ch, left:left + cw]
  img = skimage.transform.resize(img, (height, width), order=3,
                                 anti_aliasing=True)
  if blur_sigma > 0:
    img = scipy.ndimage.gaussian_filter(img, (blur_sigma, blur_sigma, 0))
  return img * 255.0


def _window(motion: Motion, t: int, h: int, w: int, ch: int, cw: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """Canvas coordinates (x, y) of every frame-t pixel, each (H, W)."""
  s, theta = motion.at(t)
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  u, v = x - (w - 1) / 2, y - (h - 1) / 2
  c, sn = np.cos(theta), np.sin(theta)
  px = c * u - sn * v + (cw - 1) / 2 + s[0]
  py = sn * u + c * v + (ch - 1) / 2 + s[1]
  return px, py


def _to_frame(motion: Motion, t: int, px: np.ndarray, py: np.ndarray,
              h: int, w: int, ch: int, cw: int) -> np.ndarray:
  """Frame-t pixel coordinates of canvas points (px, py): (H, W, 2)."""
  s, theta = motion.at(t)
  a = px - (cw - 1) / 2 - s[0]
  b = py - (ch - 1) / 2 - s[1]
  c, sn = np.cos(theta), np.sin(theta)
  x = c * a + sn * b + (w - 1) / 2
  y = -sn * a + c * b + (h - 1) / 2
  return np.stack([x, y], axis=-1)


def make_video(
    num_frames: int = 8,
    height: int = 64,
    width: int = 96,
    motion: str | Motion = "mixed",
    *,
    photo: str = "astronaut",
    canvas_scale: float = 1.5,
    blur_sigma: float = 1.5,
    fps: float = 30.0,
) -> SyntheticVideo:
  """Renders a photo moved by a known smooth motion, with its true flows.

  Args:
    num_frames: T >= 2.
    height: frame height H.
    width: frame width W.
    motion: a `Motion` or a preset name in `MOTIONS` ("integer": 2 px right,
      1 px down per frame; "subpixel"; "rotate": 0.01 rad per frame; "mixed":
      subpixel shift + rotation + sinusoidal wobble; "static").
    photo: "astronaut" or "chelsea" (scikit-image sample data).
    canvas_scale: canvas size relative to the frame; the window must stay
      inside it (an error says to raise it otherwise).
    blur_sigma: Gaussian blur of the canvas in canvas pixels (0: none).
    fps: recorded frame rate.

  Returns:
    SyntheticVideo(frames uint8 (T, H, W, 3), forward, backward, motion).
  """
  if num_frames < 2:
    raise ValueError(f"{num_frames=} must be >= 2")
  if isinstance(motion, str):
    if motion not in MOTIONS:
      raise ValueError(f"motion {motion!r}: use a Motion or one of"
                       f" {sorted(MOTIONS)}")
    motion = MOTIONS[motion]
  h, w = height, width
  ch, cw = int(round(h * canvas_scale)), int(round(w * canvas_scale))
  canvas = _canvas(photo, ch, cw, blur_sigma)
  frames, coords = [], []
  for t in range(num_frames):
    px, py = _window(motion, t, h, w, ch, cw)
    if px.min() < 0 or py.min() < 0 or px.max() > cw - 1 or py.max() > ch - 1:
      raise ValueError(
          f"frame {t}: the moving window leaves the canvas ({cw}x{ch});"
          " raise canvas_scale or use fewer frames / slower motion")
    coords.append((px, py))
    chans = [scipy.ndimage.map_coordinates(canvas[..., k], [py, px], order=3,
                                           mode="nearest") for k in range(3)]
    frames.append(np.clip(np.rint(np.stack(chans, -1)), 0, 255))
  grid = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1)
  fwd, bwd = [], []
  for t in range(num_frames - 1):
    fwd.append(_to_frame(motion, t + 1, *coords[t], h, w, ch, cw) - grid)
    bwd.append(_to_frame(motion, t, *coords[t + 1], h, w, ch, cw) - grid)
  return SyntheticVideo(
      frames=np.stack(frames).astype(np.uint8),
      forward=np.stack(fwd).astype(np.float32),
      backward=np.stack(bwd).astype(np.float32),
      motion=motion, fps=fps)
