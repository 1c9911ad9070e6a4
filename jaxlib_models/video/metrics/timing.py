"""Streaming throughput and per-frame latency of a jitted per-frame step.

Protocol of the methods brief §5: compile and warm up first (excluded), then
time every frame to completion with `jax.block_until_ready`, and report
frames/s plus latency percentiles together with the device and dtype. A
stream delay (StreamV2V's 3-frame pipeline) is added to the latency by the
caller through `delay_frames`.
"""

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class StreamTiming:
  """Result of `measure_stream_fps`; times in seconds unless named _ms."""

  fps: float  # Frames / wall time, each frame blocked on (streaming).
  latency_ms_p50: float  # Median per-frame step time.
  latency_ms_p90: float
  latency_ms_mean: float
  pipelined_fps: float | None  # Frames / wall time, blocking only at the end.
  stream_latency_ms_p50: float  # p50 + delay_frames frame periods (1/fps).
  num_frames: int  # Timed frames.
  warmup: int  # Untimed calls before (compilation included).
  compile_s: float  # Wall time of the first (compiling) call.
  device: str  # e.g. "cpu" / "NVIDIA H100 80GB HBM3".
  dtype: str  # As given by the caller (the step's compute dtype).

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def measure_stream_fps(
    step_fn: Callable[..., Any],
    frames: Sequence[Any],
    *,
    warmup: int = 3,
    state: Any = None,
    delay_frames: int = 0,
    pipelined: bool = False,
    dtype: str = "float32",
    progress: bool = False,
) -> StreamTiming:
  """Times a per-frame streaming step.

  Args:
    step_fn: `out = step_fn(frame)`, or with `state` given
      `state, out = step_fn(state, frame)` (the state is threaded through
      warm-up and timing). Jit it beforehand; the first call compiles.
    frames: the timed inputs (>= 1; the brief asks for >= 100); warm-up
      cycles through them.
    warmup: untimed calls (>= 1, so compilation is never timed).
    state: initial state of a stateful step, or None.
    delay_frames: frames of stream delay added to `stream_latency_ms_p50`.
    pipelined: also time one pass that blocks only on the last output
      (throughput without per-frame synchronisation).
    dtype: compute dtype, recorded.
    progress: show a tqdm bar over the timed frames.

  Returns:
    StreamTiming.
  """
  if warmup < 1:
    raise ValueError(f"{warmup=} must be >= 1 (the first call compiles)")
  if len(frames) < 1:
    raise ValueError("need at least one frame to time")
  stateful = state is not None

  def call(st, frame):
    if stateful:
      return step_fn(st, frame)
    return None, step_fn(frame)

  compile_s = 0.0
  for k, frame in zip(range(warmup), itertools.cycle(frames)):
    t0 = time.perf_counter()
    state, out = call(state, frame)
    jax.block_until_ready((state, out))
    if k == 0:
      compile_s = time.perf_counter() - t0

  it = frames
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top

    it = tqdm.tqdm(frames, desc="timing", unit="frame")
  lat = []
  t_start = time.perf_counter()
  for frame in it:
    t0 = time.perf_counter()
    state, out = call(state, frame)
    jax.block_until_ready((state, out))
    lat.append(time.perf_counter() - t0)
  total = time.perf_counter() - t_start
  fps = len(lat) / total

  pipe_fps = None
  if pipelined:
    t0 = time.perf_counter()
    for frame in frames:
      state, out = call(state, frame)
    jax.block_until_ready((state, out))
    pipe_fps = len(frames) / (time.perf_counter() - t0)

  lat_ms = np.asarray(lat) * 1e3
  p50, p90 = np.percentile(lat_ms, [50, 90])
  dev = jax.devices()[0]
  return StreamTiming(
      fps=float(fps), latency_ms_p50=float(p50), latency_ms_p90=float(p90),
      latency_ms_mean=float(lat_ms.mean()), pipelined_fps=pipe_fps,
      stream_latency_ms_p50=float(p50 + delay_frames * 1e3 / fps),
      num_frames=len(lat), warmup=warmup, compile_s=compile_s,
      device=getattr(dev, "device_kind", dev.platform), dtype=dtype)
