"""One metrics writer: JSONL file plus console, host 0 only, with progress."""

import json
import math
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
import tqdm


def _to_py(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class MetricsWriter:
  """Writes `{"step": s, **scalars}` lines to `workdir/metrics.jsonl`.

  On resume from step `start_step`, lines with a larger step (written after
  the checkpoint that is resumed) are dropped so the file tells one history.
  """

  def __init__(
      self,
      workdir: str,
      total_steps: int,
      start_step: int = 0,
      log_every: int = 50,
      progress: bool = True,
      console: bool = True,
  ):
    self.console = console
    self.is_host0 = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.log_every = max(1, log_every)
    self._t0, self._s0 = time.perf_counter(), start_step
    self._bar = None
    if not self.is_host0:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      with open(self.path) as f:
        keep = [l for l in f if l.strip() and json.loads(l)["step"] <= start_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    if progress:
      self._bar = tqdm.tqdm(
          total=total_steps, initial=start_step, unit="step", dynamic_ncols=True
      )

  def steps_per_sec(self, step: int) -> float:
    dt = time.perf_counter() - self._t0
    return (step - self._s0) / dt if dt > 0 else math.nan

  def write(self, step: int, scalars: Mapping[str, object]) -> None:
    if not self.is_host0:
      return
    row = {"step": int(step), **{k: _to_py(v) for k, v in scalars.items()}}
    row["perf/steps_per_sec"] = self.steps_per_sec(step)
    self._file.write(json.dumps(row) + "\n")
    if self._bar is not None:
      self._bar.n = step
      loss = row.get("train/loss")
      self._bar.set_postfix(
          loss=f"{loss:.4g}" if isinstance(loss, float) else loss,
          refresh=False,
      )
      self._bar.refresh()
    if step % self.log_every == 0 and self._bar is None and self.console:
      short = {k: v for k, v in row.items() if isinstance(v, (int, float))}
      print(json.dumps(short), flush=True)

  def close(self) -> None:
    if not self.is_host0:
      return
    self._file.close()
    if self._bar is not None:
      self._bar.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]
