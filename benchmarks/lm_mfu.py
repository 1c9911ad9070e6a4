r"""Model FLOPs utilization (MFU) of the library's LM train step on one device.

  python benchmarks/lm_mfu.py [--presets tinyllama-1.1b,smollm2-1.7b]
      [--batch 8] [--seq 2048] [--attention fused] [--remat dots]
      [--steps 10] [--json OUT]
  python benchmarks/lm_mfu.py --presets tiny --batch 8 --seq 64   (CPU smoke)

What runs: `core.trainer.make_train_step` (the step every method trains
with) on a one-device mesh, AdamW, float32 master parameters and optimizer
state, bfloat16 compute (`LlamaConfig.dtype`), the next-token loss of
`lm.pretrain.loss_fn` on random token ids of the preset's real vocabulary
(speed does not depend on the values). The batch stays on the device; data
loading is not timed. Each preset: one compile + 2 warm-up steps, then the
median wall time of `--steps` steps (each ended by `block_until_ready`).

Model FLOPs per step, PaLM's convention (Chowdhery et al. 2022, app. B):
  6 * N * tokens + 12 * L * H * d_h * T * tokens
with N the parameters of every matmul (embedding lookup excluded, LM head
included) and T the sequence length; rematerialised recomputation is not
counted (that would be hardware FLOPs). "causal" halves the attention term
(the work a causal kernel actually needs) and is printed beside it.

MFU = model FLOP/s / peak. Peak: dense bf16 tensor-core peak of the card
from its datasheet (H100 SXM and H200: 989.4 TFLOP/s; H100 PCIe 756), or
`--peak-tflops`; the measured rate of one 8192^3 bf16 `jnp.dot` is printed
too, so the datasheet figure can be checked on the same card. On a CPU the
peak is that measured matmul rate (float32), so its MFU says little.

A preset that runs out of memory is reported as OOM and the next one runs.
Record the output (card named) in benchmarks/RESULTS.md.
"""

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.core import mesh as mesh_lib
from jaxlib_models.core import trainer
from jaxlib_models.lm import config as lm_config
from jaxlib_models.lm import pretrain
from jaxlib_models.lm.config import LlamaConfig

# Published architectures (hidden, intermediate, layers, heads, kv heads,
# vocab, tied embeddings).
PRESETS = {
    "tiny": (64, 128, 2, 4, 2, 256, True),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
    "smollm2-360m": (960, 2560, 32, 15, 5, 49152, True),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000, False),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32, 49152, True),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128256, True),
}

# Dense bf16 tensor-core peaks (datasheets, without sparsity), TFLOP/s.
PEAKS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H200": 989.4,
         "H100 PCIe": 756.0, "A100": 312.0}


def model_config(name: str, dtype: str, attention: str, remat: str) -> LlamaConfig:
  d, f, l, h, kv, v, tied = PRESETS[name]
  return LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f,
                     num_hidden_layers=l, num_attention_heads=h,
                     num_key_value_heads=kv, rope_theta=10000.0,
                     max_position_embeddings=8192, tie_word_embeddings=tied,
                     dtype=dtype, attention=attention, remat=remat)


def model_flops(cfg: LlamaConfig, batch: int, seq: int) -> tuple[float, float]:
  """(PaLM model FLOPs per step, the same with the causal attention half)."""
  d, q = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
  kv = cfg.num_key_value_heads * cfg.head_dim
  per_layer = d * (q + 2 * kv) + q * d + 3 * d * cfg.intermediate_size
  matmul_params = cfg.num_hidden_layers * per_layer + d * cfg.vocab_size
  tokens = batch * seq
  attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq * tokens
  dense = 6 * matmul_params * tokens
  return dense + attn, dense + attn / 2


def matmul_peak(dtype) -> float:
  """Measured FLOP/s of one n^3 matmul on the default device."""
  n = 8192 if jax.default_backend() == "gpu" else 1024
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    ts.append(time.perf_counter() - t0)
  return 2 * n**3 / min(ts)


def run_one(name, args) -> dict:
  remat = args.remat
  if "@" in name:  # per-preset remat override, e.g. tinyllama-1.1b@none
    name, remat = name.split("@")
  args = argparse.Namespace(**{**vars(args), "remat": remat})
  if name not in PRESETS:
    raise SystemExit(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
  cfg = model_config(name, args.dtype, args.attention, remat)
  tc = trainer.TrainConfig(num_steps=10**6, batch_size=args.batch,
                           learning_rate=1e-4, optimizer="adamw",
                           weight_decay=0.1, grad_clip=1.0,
                           mesh=(("data", 1), ("fsdp", 1), ("tensor", 1)),
                           progress=False, console=False)
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  task = trainer.Task(
      init_params=lambda rng: pretrain.init_params(cfg, rng),
      loss_fn=pretrain.loss_fn(cfg), param_axes=lm_config.param_axes(cfg),
      batches=lambda s: iter(()))
  par = trainer.plan_parallel(tc, mesh)
  init_fn, shardings = trainer.init_state(task, par.tx, mesh, parallel=par)
  tokens = np.random.default_rng(0).integers(
      0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
  bsh = trainer.batch_shardings_for({"tokens": tokens}, mesh)
  step = trainer.make_train_step(task.loss_fn, mesh, shardings, bsh)
  out = {"preset": name, "params": cfg.num_params, "batch": args.batch,
         "seq": args.seq, "dtype": args.dtype, "attention": args.attention,
         "remat": args.remat}
  try:
    with jax.set_mesh(mesh):
      state = init_fn()
      batch = trainer.put_batch({"tokens": tokens}, bsh)
      rng = jax.random.key(1)
      try:  # XLA's own account of the step: arguments + temporaries
        ma = step.lower(state, batch, rng).compile().memory_analysis()
        out["step_mem_gib"] = (ma.argument_size_in_bytes
                               + ma.temp_size_in_bytes) / 2**30
      except Exception:  # noqa: BLE001 - not every backend reports
        pass
      t0 = time.perf_counter()
      state, m = step(state, batch, rng)
      jax.block_until_ready(m)
      out["compile_and_first_s"] = time.perf_counter() - t0
      for _ in range(2):
        state, m = step(state, batch, rng)
      jax.block_until_ready(m)
      times = []
      for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch, rng)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
      out["loss"] = float(m["train/loss"])
  except Exception as e:  # noqa: BLE001 - report it and go on
    msg = str(e)
    oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
    out["error"] = ("OOM: " if oom else f"{type(e).__name__}: ") + (
        msg.splitlines() or [""])[0][:300]
    return out
  finally:
    state = batch = None
  dt = statistics.median(times)
  palm, causal = model_flops(cfg, args.batch, args.seq)
  out.update(step_s=dt, tokens_per_s=args.batch * args.seq / dt,
             model_tflops=palm / dt / 1e12, model_tflops_causal=causal / dt / 1e12)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument("--presets", default="tinyllama-1.1b,smollm2-1.7b",
                 help=f"comma-separated, from {sorted(PRESETS)}; NAME@REMAT"
                 " overrides --remat for one preset")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--attention", default="fused", choices=("einsum", "fused"))
  p.add_argument("--remat", default="dots", choices=("none", "full", "dots"))
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--peak-tflops", type=float, default=0.0,
                 help="peak for MFU; default: the card's datasheet bf16 peak")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  measured = matmul_peak(jnp.bfloat16 if jax.default_backend() == "gpu"
                         else jnp.float32) / 1e12
  peak = args.peak_tflops or next(
      (v for k, v in PEAKS.items() if k.lower() in kind.lower()), 0.0)
  peak_src = "datasheet" if peak and not args.peak_tflops else "--peak-tflops"
  if not peak:
    peak, peak_src = measured, "measured matmul"
  print(f"device: {kind} ({jax.default_backend()}), jax {jax.__version__},"
        f" {platform.node()}; measured matmul {measured:.1f} TFLOP/s;"
        f" peak for MFU {peak:.1f} TFLOP/s ({peak_src})", flush=True)
  rows = []
  for name in args.presets.split(","):
    r = run_one(name.strip(), args)
    r["mfu"] = r.get("model_tflops", 0.0) / peak
    r["mfu_causal"] = r.get("model_tflops_causal", 0.0) / peak
    rows.append(r)
    if "error" in r:
      print(f"{name}: {r['error']}", flush=True)
    else:
      print(f"{name}: {r['params']/1e9:.2f}B params, B={r['batch']} T={r['seq']}"
            f" {r['dtype']} attention={r['attention']} remat={r['remat']}:"
            f" step {r['step_s']*1e3:.1f} ms, {r['tokens_per_s']:.0f} tok/s,"
            f" {r['model_tflops']:.1f} TFLOP/s, MFU {100*r['mfu']:.1f}%"
            f" (causal-attention count {100*r['mfu_causal']:.1f}%),"
            f" step memory {r.get('step_mem_gib', float('nan')):.1f} GiB,"
            f" compile+first {r['compile_and_first_s']:.1f} s,"
            f" loss {r['loss']:.3f} (one batch repeated)", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": kind, "measured_matmul_tflops": measured,
                 "peak_tflops": peak, "peak_source": peak_src,
                 "jax": jax.__version__, "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
