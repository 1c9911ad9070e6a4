"""Wall-clock timing for the benchmarks (never for timed tests)."""

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], reps: int, warmup: int = 0) -> float:
  """Median wall seconds of `reps` calls of fn after `warmup` untimed calls.

  fn must block until its work is done (e.g. `.block_until_ready()`).
  """
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)
