"""Pluggable optical-flow estimators (weight-free) and a by-name registry.

Every estimator maps two RGB frames to the flow from the first to the second,
a(x) ~ b(x + flow(x)) (see `warp`), float32 (H, W, 2) in pixels, (dx, dy).
OpenCV's DIS and Farneback need no weights (the reference warp error uses
RAFT-large, whose weights are not available offline: numbers obtained with
another estimator are not comparable to it, so metric names carry the
estimator's `name`).
"""

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import cv2
import numpy as np


@runtime_checkable
class FlowEstimator(Protocol):
  """Two (H, W, 3) uint8 RGB frames -> float32 (H, W, 2) flow a -> b."""

  name: str

  def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    ...


def _gray(frame: np.ndarray) -> np.ndarray:
  frame = np.asarray(frame)
  if frame.ndim != 3 or frame.shape[-1] != 3:
    raise ValueError(f"expected an (H, W, 3) RGB frame, got {frame.shape}")
  if frame.dtype != np.uint8:
    raise ValueError(f"expected uint8 frames, got {frame.dtype}")
  return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
  if np.shape(a) != np.shape(b):
    raise ValueError(f"frames differ in shape: {np.shape(a)} vs"
                     f" {np.shape(b)}")


_DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


class DISFlow:
  """OpenCV Dense Inverse Search (Kroeger et al. 2016) on grayscale frames."""

  def __init__(self, preset: str = "medium"):
    """Args: preset: "ultrafast", "fast" or "medium" (OpenCV's presets)."""
    if preset not in _DIS_PRESETS:
      raise ValueError(f"DIS preset {preset!r}: use one of"
                       f" {sorted(_DIS_PRESETS)}")
    self.preset = preset
    self.name = "dis" if preset == "medium" else f"dis-{preset}"
    self._dis = cv2.DISOpticalFlow_create(_DIS_PRESETS[preset])

  def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    _check_pair(frame_a, frame_b)
    flow = self._dis.calc(_gray(frame_a), _gray(frame_b), None)
    return np.asarray(flow, np.float32)


class FarnebackFlow:
  """OpenCV Farneback (2003) polynomial-expansion flow on grayscale frames."""

  name = "farneback"

  def __init__(self, pyr_scale: float = 0.5, levels: int = 3,
               winsize: int = 15, iterations: int = 3, poly_n: int = 5,
               poly_sigma: float = 1.2):
    """Args are `cv2.calcOpticalFlowFarneback`'s (its documented example)."""
    self.args = (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma)

  def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    _check_pair(frame_a, frame_b)
    flow = cv2.calcOpticalFlowFarneback(_gray(frame_a), _gray(frame_b), None,
                                        *self.args, 0)
    return np.asarray(flow, np.float32)


def _key(a: np.ndarray, b: np.ndarray) -> tuple:
  a = np.ascontiguousarray(a)
  b = np.ascontiguousarray(b)
  return (a.shape, hash(a.tobytes()), hash(b.tobytes()))


class GroundTruthFlow:
  """Known flows of a video (e.g. `synthetic.make_video`), looked up by frame.

  Calling it on (frames[i], frames[i+1]) returns forward[i], on
  (frames[i+1], frames[i]) backward[i]; any other pair is an error.
  """

  name = "gt"

  def __init__(self, frames: Sequence[np.ndarray], forward: np.ndarray,
               backward: np.ndarray):
    """Args:
      frames: (T, H, W, 3) the video the flows belong to.
      forward: (T-1, H, W, 2) flows frames[i] -> frames[i+1].
      backward: (T-1, H, W, 2) flows frames[i+1] -> frames[i].
    """
    frames = np.asarray(frames)
    forward = np.asarray(forward, np.float32)
    backward = np.asarray(backward, np.float32)
    t = len(frames)
    want = (t - 1,) + frames.shape[1:3] + (2,)
    if forward.shape != want or backward.shape != want:
      raise ValueError(f"flows must be {want} for {t} frames of"
                       f" {frames.shape[1:3]}; got {forward.shape},"
                       f" {backward.shape}")
    self._flows = {}
    for i in range(t - 1):
      self._flows.setdefault(_key(frames[i], frames[i + 1]), forward[i])
      self._flows.setdefault(_key(frames[i + 1], frames[i]), backward[i])

  def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    try:
      return self._flows[_key(frame_a, frame_b)]
    except KeyError:
      msg = ("GroundTruthFlow: this pair of frames is not a pair of"
             " consecutive frames of the video it was built with")
      raise KeyError(msg) from None


FLOW_ESTIMATORS: dict[str, Callable[..., FlowEstimator]] = {
    "dis": DISFlow,
    "farneback": FarnebackFlow,
    "gt": GroundTruthFlow,
}


def get_flow_estimator(name: str, **kwargs) -> FlowEstimator:
  """Builds an estimator by name ("dis", "farneback", "gt" + its flows).

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  if name not in FLOW_ESTIMATORS:
    raise ValueError(f"unknown flow estimator {name!r}; known:"
                     f" {', '.join(sorted(FLOW_ESTIMATORS))}")
  return FLOW_ESTIMATORS[name](**kwargs)


def compute_flows(frames: Sequence[np.ndarray], estimator: FlowEstimator
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Forward and backward flows of every consecutive pair.

  Args:
    frames: (T, H, W, 3) uint8 RGB, T >= 2.
    estimator: a `FlowEstimator`.

  Returns:
    (forward, backward), each float32 (T-1, H, W, 2): forward[i] is
    frames[i] -> frames[i+1], backward[i] is frames[i+1] -> frames[i].
  """
  if len(frames) < 2:
    raise ValueError(f"need at least 2 frames for flows, got {len(frames)}")
  fwd = [estimator(frames[i], frames[i + 1]) for i in range(len(frames) - 1)]
  bwd = [estimator(frames[i + 1], frames[i]) for i in range(len(frames) - 1)]
  return np.stack(fwd).astype(np.float32), np.stack(bwd).astype(np.float32)
