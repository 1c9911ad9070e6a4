"""Entry points end to end: train, eval, kill and resume, bad input, study.

These run the real CLI in subprocesses on tiny configs.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "spike_slab", "sim.py") + ":tiny"

# The in-process study; the subprocess tests get the same setting by _env.
pytestmark = pytest.mark.usefixtures("fast_compile")


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device, as a user would run it.
  env["JAX_PLATFORMS"] = "cpu"
  # Tiny graphs: XLA's optimisation passes cost more than they save (the
  # subprocess form of the fast_compile fixture).
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  return env


def _run(module, *args, check=True):
  out = subprocess.run(
      [sys.executable, "-m", module, *args], cwd=ROOT, env=_env(),
      capture_output=True, text=True, timeout=600,
  )
  if check and out.returncode != 0:
    raise AssertionError(f"{module} {args} failed:\n{out.stdout}\n{out.stderr}")
  return out


def _steps(workdir):
  d = os.path.join(workdir, "ckpt")
  if not os.path.isdir(d):
    return []
  return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def test_train_then_eval(tmp_path):
  w = str(tmp_path / "run")
  _run("train", f"--config={TINY}", f"--workdir={w}")
  res = json.load(open(os.path.join(w, "results.json")))
  assert {"full", "pruned", "nodes_kept", "features_kept", "finetuned"} <= set(res)
  out = _run("eval", f"--config={TINY}", f"--workdir={w}")
  ev = json.load(open(os.path.join(w, "eval.json")))
  assert ev["step"] == 60 and "step 60" in out.stdout
  # Same checkpoint, same evaluation key: identical numbers.
  assert ev["full"] == res["full"] and ev["pruned"] == res["pruned"]


def test_killed_run_resumes_to_the_same_result(tmp_path):
  """SIGKILL mid-training, rerun: resumes from the last checkpoint and ends
  with exactly the numbers of an uninterrupted run (deterministic data order
  and per-step keys). Planted bug caught: restarting the data iterator at 0
  on resume changes the final numbers."""
  args = [f"--config={TINY}", "--config.train.num_steps=1500",
          "--config.train.checkpoint_every=25", "--config.prune.finetune_steps=0",
          "--config.train.async_checkpoint=False"]
  straight = str(tmp_path / "straight")
  _run("train", *args, f"--workdir={straight}")
  w = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, "-m", "train", *args, f"--workdir={w}"],
                          cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not [s for s in _steps(w) if s >= 50]:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(w, "results.json")), "killed too late"
  killed_at = max(_steps(w))
  assert 0 < killed_at < 1500
  out = _run("train", *args, f"--workdir={w}")
  assert "resumed from step" in out.stdout
  a = json.load(open(os.path.join(straight, "results.json")))
  b = json.load(open(os.path.join(w, "results.json")))
  for k in ("full", "pruned", "nodes_kept", "features_kept"):
    assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_cli_errors_are_clear(tmp_path):
  out = _run("train", f"--config={TINY}", "--config.train.num_step=3",
             f"--workdir={tmp_path}", check=False)
  assert out.returncode != 0 and "train.num_steps" in out.stderr
  out = _run("eval", f"--config={TINY}", f"--workdir={tmp_path / 'none'}", check=False)
  assert out.returncode != 0 and "no checkpoint" in out.stderr
  out = _run("train", "--help")
  assert "--config" in out.stdout and "resumes" in out.stdout


# Smoke test of the study (`make demo` runs the demo study); ~95 s on 2
# cores, so outside the default suite (`make test-all`).
@pytest.mark.slow
def test_study_tiny_writes_report_and_plots(tmp_path):
  """Smoke test of the study and report (not correctness evidence)."""
  from jaxlib_models.core import config as config_lib
  from jaxlib_models.spike_slab import entry

  cfg = config_lib.load_config(
      os.path.join(ROOT, "configs", "spike_slab", "study.py") + ":tiny")
  path = entry.study_main(cfg, str(tmp_path))
  text = open(path).read()
  for needle in ("variable_selection", "wine", "magnitude-pruned", "LassoCV",
                 "pruned + fine-tuned", "Node spike-and-slab"):
    assert needle in text, needle
  pngs = [f for f in os.listdir(tmp_path) if f.endswith(".png")]
  assert len(pngs) >= 5, pngs


def test_report_cells_are_mean_and_sd_over_seeds():
  """The study's table cells (the tiny study runs one seed)."""
  from jaxlib_models.spike_slab import report

  assert report._ms([1.0, 3.0, None]) == "2 ± 1.4"
  assert report._ms([2.5]) == "2.5" and report._ms([None]) == "n/a"
