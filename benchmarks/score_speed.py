r"""Empirical-score speed and memory: the chunked JAX scan against dense NumPy.

  .venv/bin/python benchmarks/score_speed.py [--reps 7] [--json OUT] [--quick]

Goal (brief kernel_score_diffusion.md §2.6/§2.8): n = 1e5, d = 2, m = 1000
queries, t = 0.1: the chunked estimator at least 10x faster than a naive dense
NumPy implementation on 2 cores, with flat memory as n grows to 1e6; on a GPU,
the Pallas kernel against the XLA scan, card named.

(1) Speed at n, d, m, t = 1e5, 2, 1000, 0.1, float32. Ours:
    `score.estimators.empirical_score(..., implementation="xla",
    truncate=False)` under `jax.jit` (chunked online softmax, block_k 1024,
    centred expanded distances in float32; also shown: exact direct differences),
    warm (compiled, two calls), `block_until_ready`. Dense NumPy: the full
    (m, n) matrix of squared distances (direct differences, one coordinate at
    a time), max-shifted exp, normalised weights, `w @ X`, score = (mean -
    x) / t; float32, in-place where idiomatic; NumPy's BLAS uses every core
    for the one matmul, the elementwise work runs on one. Each timing is the
    median of --reps calls. Agreement: max |score_ours - score_numpy|.
(2) Memory as n grows (1e5, 3e5, 1e6; d = 2, m = 1000): each point runs in a
    fresh subprocess. "extra" = peak RSS minus the RSS right after the data
    arrays exist (NumPy arrays, and for ours their device copies), the peak
    counter being reset there (/proc/self/clear_refs = 5, Linux) so that
    import-time peaks do not count; it includes the warm-up call, so XLA's
    compilation. "extra, calls only" resets the counter again after the
    warm-up: what the timed calls need above the RSS they start from. Peak
    RSS is VmHWM, which is what getrusage's ru_maxrss reads for a live
    process, except that ru_maxrss in a child is floored by the parent's
    peak at fork (see _peak_rss). Dense NumPy runs at 1e5 and 3e5 only, and
    only when the machine has 6 (m n 4 bytes) available.
(3) On a GPU (jax.default_backend() == "gpu"): implementation "pallas" vs
    "xla" at n = 1e5 and 1e6 (d = 2, m = 1000): time, pairs/s = m n / time,
    and achieved FLOP/s assuming (3 d + 6) flops per (query, point) pair,
    named by jax.devices()[0].device_kind; with the card's float32 non-tensor
    peak when the name is in _FP32_PEAK (vendor spec sheet, unverified).
    Without a GPU it prints "no GPU: pallas timing unmeasured".

The script warns when the 1-min load average is above 0.5 (another process
is using the CPU: the timings are then off). `--quick` shrinks every size to
check the script end to end (numbers then mean nothing). Record the output
in benchmarks/RESULTS.md.
"""

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.core.timing import median_time

from jaxlib_models.score import estimators

# Dense float32 (non-tensor-core) peaks, FLOP/s, from vendor spec sheets
# (unverified); keyed by a substring of jax's device_kind.
_FP32_PEAK = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12, "L4": 30.3e12}


def numpy_dense_score(x_MD, X_ND, t):
  """Naive empirical score: the whole (M, N) matrix at once, float32."""
  m, d = x_MD.shape
  n = X_ND.shape[0]
  sq_MN = np.zeros((m, n), np.float32)
  for k in range(d):
    diff_MN = x_MD[:, k, None] - X_ND[None, :, k]
    diff_MN *= diff_MN
    sq_MN += diff_MN
  del diff_MN
  sq_MN *= np.float32(-0.5 / t)  # Now the logits.
  sq_MN -= sq_MN.max(axis=1, keepdims=True)
  np.exp(sq_MN, out=sq_MN)
  sq_MN /= sq_MN.sum(axis=1, keepdims=True)  # Now the weights.
  return (sq_MN @ X_ND - x_MD) / np.float32(t)


def numpy_textbook_score(x_MD, X_ND, t):
  """The formula as written, NumPy defaults (float64, an (M, N, D) tensor)."""
  x = np.asarray(x_MD, np.float64)
  X = np.asarray(X_ND, np.float64)
  logits = -((x[:, None, :] - X[None, :, :]) ** 2).sum(-1) / (2 * t)
  w = np.exp(logits - logits.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  return (w @ X - x) / t


def _ours_fn(implementation, distance="auto"):
  if distance == "auto":
    return jax.jit(functools.partial(
        estimators.empirical_score, truncate=False,
        implementation=implementation))
  from jaxlib_models.kernels import gauss_attention as ga  # noqa: PLC0415

  def fn(x, X, t):
    mean, _ = ga.gauss_attention(x, X, t, implementation=implementation,
                                 distance=distance)
    return estimators.ScoreOut((mean - x) / t, None, None)

  return jax.jit(fn)


def make_data(n, d, m, seed=0):
  rng = np.random.default_rng(seed)
  X_ND = rng.standard_normal((n, d), np.float32)
  x_MD = rng.standard_normal((m, d), np.float32) * np.float32(1.1)
  return x_MD, X_ND


def _vm(field):
  """A field of /proc/self/status, in bytes (Linux)."""
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return -1


def _peak_rss():
  """Peak RSS of this process in bytes since start or the last reset.

  VmHWM, not ru_maxrss: in a subprocess ru_maxrss is floored by the peak the
  parent had when it forked (Linux copies it across exec; measured 87 MiB
  here with a jax parent), so it cannot see a child's own small peaks.
  ru_maxrss is the fallback off Linux.
  """
  hwm = _vm("VmHWM")
  if hwm >= 0:
    return hwm
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak():
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def child(kind, n, d, m, t, reps):
  """One memory point, in its own process: prints one JSON line."""
  x_MD, X_ND = make_data(n, d, m)
  if kind == "ours":
    xj, Xj, tj = jnp.asarray(x_MD), jnp.asarray(X_ND), jnp.float32(t)
    jax.block_until_ready((xj, Xj))
    f = _ours_fn("xla")
    run = lambda: f(xj, Xj, tj).score_MD.block_until_ready()
  else:
    run = lambda: numpy_dense_score(x_MD, X_ND, t)
  rss_data = _vm("VmRSS")
  reset = _reset_peak()  # Forget the import-time peak.
  run()  # Warm-up (compilation for ours).
  extra = _peak_rss() - rss_data
  rss_warm = _vm("VmRSS")
  reset = _reset_peak() and reset
  secs = median_time(run, reps, warmup=0)
  extra_calls = _peak_rss() - rss_warm
  print(json.dumps({
      "kind": kind, "n": n, "d": d, "m": m, "s_per_call": secs,
      "rss_data": rss_data, "rss_warm": rss_warm, "peak_reset": reset,
      "extra": extra, "extra_calls": extra_calls if reset else None,
  }))


def run_child(kind, n, args):
  cmd = [sys.executable, os.path.abspath(__file__), "--child", kind,
         "--n", str(n), "--d", str(args.d), "--m", str(args.m),
         "--t", str(args.t), "--reps", str(args.mem_reps)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    return {"kind": kind, "n": n, "error": out.stderr.strip()[-400:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _available_bytes():
  with open("/proc/meminfo", encoding="ascii") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 0


def cpu_model():
  try:
    with open("/proc/cpuinfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def speed(args, res):
  x_MD, X_ND = make_data(args.n, args.d, args.m)
  xj, Xj, tj = jnp.asarray(x_MD), jnp.asarray(X_ND), jnp.float32(args.t)
  f = _ours_fn("xla")
  t_ours = median_time(
      lambda: f(xj, Xj, tj).score_MD.block_until_ready(), args.reps, 2)
  f_direct = _ours_fn("xla", "direct")
  t_direct = median_time(
      lambda: f_direct(xj, Xj, tj).score_MD.block_until_ready(), args.reps,
      2)
  t_np = median_time(lambda: numpy_dense_score(x_MD, X_ND, args.t),
                      args.np_reps, warmup=1)
  t_tb = median_time(lambda: numpy_textbook_score(x_MD, X_ND, args.t),
                      max(1, args.np_reps // 2), warmup=0)
  s_ours = np.asarray(f(xj, Xj, tj).score_MD)
  s_direct = np.asarray(f_direct(xj, Xj, tj).score_MD)
  s_np = numpy_dense_score(x_MD, X_ND, args.t)
  s_64 = numpy_textbook_score(x_MD, X_ND, args.t)
  diff = float(np.max(np.abs(s_ours - s_np)))
  scale = float(np.max(np.abs(s_np)))
  print(f"\n(1) speed, n={args.n:,} d={args.d} m={args.m} t={args.t},"
        f" float32, median of {args.reps} (ours) / {args.np_reps} (NumPy)")
  print("| implementation | ms per call | pairs/s | max abs err vs float64 |")
  print("|---|---|---|---|")
  pairs = args.n * args.m
  for name, s_, out in (
      ("ours: empirical_score, xla chunked scan (jit), default", t_ours,
       s_ours),
      ("ours, distance='direct' (exact differences)", t_direct, s_direct),
      ("dense NumPy float32, in place (full m x n matrix)", t_np, s_np),
      ("textbook NumPy float64 ((m, n, d) tensor)", t_tb, s_64)):
    err = float(np.max(np.abs(out - s_64)))
    print(f"| {name} | {1e3 * s_:,.1f} | {pairs / s_:.3g} | {err:.1e} |")
  print(f"speed-up (dense NumPy float32 / ours): {t_np / t_ours:.1f}x "
        f"(goal >= 10x); textbook NumPy / ours: {t_tb / t_ours:.1f}x; "
        f"direct path: {t_np / t_direct:.1f}x")
  print(f"agreement: max |score_ours - score_numpy| = {diff:.2e}"
        f" (max |score| = {scale:.3g}, relative {diff / scale:.1e})")
  res["speed"] = {"n": args.n, "d": args.d, "m": args.m, "t": args.t,
                  "ours_s": t_ours, "ours_direct_s": t_direct,
                  "numpy_s": t_np, "numpy_textbook_f64_s": t_tb,
                  "speedup": t_np / t_ours,
                  "speedup_textbook": t_tb / t_ours,
                  "speedup_direct": t_np / t_direct, "max_abs_diff": diff,
                  "max_abs_score": scale}


def memory(args, res):
  rows = []
  for n in args.mem_n:
    rows.append(run_child("ours", n, args))
    need = 6 * args.m * n * 4
    if n in args.np_mem_n:
      if _available_bytes() > need:
        rows.append(run_child("numpy", n, args))
      else:
        rows.append({"kind": "numpy", "n": n, "error": "skipped: needs"
                     f" ~{need / 2**30:.1f} GiB"})
  print(f"\n(2) memory, d={args.d} m={args.m}, one fresh process per row;"
        " extra = peak RSS (VmHWM) - RSS with the data loaded")
  print("| implementation | n | ms per call | RSS with data (MiB) |"
        " extra (MiB) | extra, calls only (MiB) |")
  print("|---|---|---|---|---|---|")
  mib = 2.0**20
  for r in rows:
    name = ("ours (xla scan)" if r["kind"] == "ours"
            else "naive dense NumPy")
    if "error" in r:
      print(f"| {name} | {r['n']:,} | {r['error']} | | | |")
      continue
    calls = ("n/a" if r["extra_calls"] is None
             else f"{r['extra_calls'] / mib:,.0f}")
    print(f"| {name} | {r['n']:,} | {1e3 * r['s_per_call']:,.1f} |"
          f" {r['rss_data'] / mib:,.0f} | {r['extra'] / mib:,.0f} |"
          f" {calls} |")
  res["memory"] = rows


def gpu(args, res):
  if jax.default_backend() != "gpu":
    print("\n(3) no GPU: pallas timing unmeasured")
    res["gpu"] = None
    return
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in _FP32_PEAK.items() if k in kind), None)
  flops_pair = 3 * args.d + 6
  print(f"\n(3) GPU: {kind}; d={args.d} m={args.m} t={args.t} float32,"
        f" (3d + 6) = {flops_pair} flops per pair")
  print("| implementation | n | ms per call | pairs/s | GFLOP/s |"
        " % of fp32 peak |")
  print("|---|---|---|---|---|---|")
  rows = []
  for n in args.gpu_n:
    x_MD, X_ND = make_data(n, args.d, args.m)
    xj, Xj, tj = jnp.asarray(x_MD), jnp.asarray(X_ND), jnp.float32(args.t)
    outs = {}
    for impl in ("pallas", "xla"):
      f = functools.partial(_ours_fn(impl), xj, Xj, tj)
      s = median_time(lambda f=f: f().score_MD.block_until_ready(),
                      args.reps, 2)
      outs[impl] = np.asarray(f().score_MD)
      pairs = args.m * n / s
      fl = pairs * flops_pair
      frac = f"{100 * fl / peak:.1f} %" if peak else "peak unknown"
      print(f"| {impl} | {n:,} | {1e3 * s:.3f} | {pairs:.3g} |"
            f" {fl / 1e9:,.0f} | {frac} |")
      rows.append({"impl": impl, "n": n, "s": s, "pairs_per_s": pairs,
                   "flops": fl})
    diff = float(np.max(np.abs(outs["pallas"] - outs["xla"])))
    print(f"|  | n={n:,}: max |pallas - xla| score = {diff:.2e} | | | | |")
  res["gpu"] = {"device_kind": kind, "fp32_peak": peak, "rows": rows}


def main():
  ap = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=100_000, help="data points, (1)")
  ap.add_argument("--d", type=int, default=2, help="dimension")
  ap.add_argument("--m", type=int, default=1000, help="queries")
  ap.add_argument("--t", type=float, default=0.1, help="noise variance")
  ap.add_argument("--reps", type=int, default=7, help="timed calls, ours")
  ap.add_argument("--np-reps", type=int, default=3, help="timed calls, NumPy")
  ap.add_argument("--mem-n", default="100000,300000,1000000",
                  help="comma-separated n of the memory table, (2)")
  ap.add_argument("--np-mem-n", default="100000,300000",
                  help="n at which dense NumPy joins the memory table")
  ap.add_argument("--mem-reps", type=int, default=3,
                  help="timed calls per memory row")
  ap.add_argument("--gpu-n", default="100000,1000000",
                  help="comma-separated n of the GPU table, (3)")
  ap.add_argument("--json", metavar="OUT", help="also write results here")
  ap.add_argument("--only", default="speed,memory,gpu",
                  help="comma-separated parts to run: speed, memory, gpu")
  ap.add_argument("--quick", action="store_true",
                  help="tiny sizes (n 2000, m 100): an end-to-end check only")
  ap.add_argument("--child", choices=("ours", "numpy"),
                  help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args.child, args.n, args.d, args.m, args.t, args.reps)
    return
  if args.quick:
    args.n, args.m, args.reps, args.np_reps, args.mem_reps = 2000, 100, 2, 1, 1
    args.mem_n, args.np_mem_n, args.gpu_n = "2000,6000", "2000", "2000,6000"
  args.mem_n = [int(v) for v in args.mem_n.split(",")]
  args.np_mem_n = [int(v) for v in args.np_mem_n.split(",")]
  args.gpu_n = [int(v) for v in args.gpu_n.split(",")]

  load = os.getloadavg()[0]
  if load > 0.5:
    print(f"WARNING: 1-min load average {load:.1f} before starting: another"
          " process is using the CPU, timings will be off")
  dev = jax.devices()[0]
  print(f"machine: {platform.node()}; CPU {cpu_model()}, os.cpu_count()="
        f"{os.cpu_count()}; jax device {dev.device_kind} ({dev.platform});"
        f" jax {jax.__version__}, numpy {np.__version__}; load average"
        f" {load:.1f}" + (" (--quick: numbers mean nothing)" if args.quick
                          else ""))
  res = {"argv": {k: v for k, v in vars(args).items() if k != "child"},
         "machine": platform.node(), "cpu": cpu_model(),
         "cpu_count": os.cpu_count(), "device_kind": dev.device_kind,
         "jax": jax.__version__, "numpy": np.__version__,
         "load_average": load}
  parts = {p.strip() for p in args.only.split(",")}
  if parts - {"speed", "memory", "gpu"}:
    ap.error(f"--only {args.only!r}: parts are speed, memory, gpu")
  for name, fn in (("speed", speed), ("memory", memory), ("gpu", gpu)):
    if name in parts:
      fn(args, res)
  res["load_average_end"] = os.getloadavg()[0]
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
