r"""SmolLM2-135M speed: our Flax Llama against transformers' PyTorch Llama.

  .venv/bin/python benchmarks/lm_speed.py [--reps 5] [--json OUT] [--quick]

Both sides run the same float32 weights: SmolLM2-135M-Instruct from the GGUF
(`registry.load("smollm2")`), exported with `loaders.save_hf` and loaded by
`transformers.LlamaForCausalLM.from_pretrained(..., dtype=torch.float32)`.
torch runs with `torch.set_num_threads(os.cpu_count())` (printed; change
with --torch-threads); XLA's CPU backend uses every core by default. Run on
an otherwise idle machine: with busy cores torch's OpenMP threads stall (a
2-thread matmul measured 6x slower than 1 thread while another job ran),
which flatters the ratios; the script warns when the load average is high.

(a) Prefill tokens/s (B x T random ids, no KV cache on either side):
    "last logits": ours = jitted `forward(..., logits_for=(B, 1) last index)`
    vs transformers `model(ids, logits_to_keep=1, use_cache=False)`;
    "all logits": ours `forward(..., logits_for="all")` vs
    `model(ids, use_cache=False)` (the LM head on every position).
(b) Decode tokens/s: greedy, `--new` (64) new tokens after a `--prompt`
    (128) token prompt at batch 1 and 8: ours `lm.generate.generate` (KV
    cache, one jitted step per token) vs `model.generate(do_sample=False,
    max_new_tokens=N, min_new_tokens=N, use_cache=True)`. Rate = B * N /
    wall time of the whole call (prompt prefill included on both sides).
(c) Achieved FLOP/s of the prefill, as a fraction of this machine's dense
    float32 matmul rate measured in the same run (jitted JAX `a @ b`, n x n,
    2 n^3 FLOPs; torch.matmul for reference). Prefill FLOPs per call:
      2 * N_ne * B * T                          (weights, N_ne = non-embedding
                                                  matmul params; norms ignored)
      + 4 * L * H * d_h * B * T (T + 1) / 2     (causal QK^T and PV, useful
                                                  half only)
      + 2 * D * V * B * K                       (LM head, K = 1 or T logits)
    Elementwise work (RMSNorm, RoPE, softmax, SiLU) is not counted.

Each timing: warm-up calls (compilation for ours) then the median of `--reps`
calls. Ratios are ours / transformers in tokens/s (> 1: ours faster).
`--quick` runs tiny shapes to check the script end to end (numbers then mean
nothing). Record the output in benchmarks/RESULTS.md.
"""

import argparse
import functools
import json
import os
import platform
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.core.timing import median_time
import torch
import transformers

from jaxlib_models.decoding import data as data_lib
from jaxlib_models.lm import forward, loaders, registry
from jaxlib_models.lm.generate import GenStream, generate


def non_embedding_params(cfg) -> int:
  d, h, kv, dh, f = (cfg.hidden_size, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.head_dim,
                     cfg.intermediate_size)
  per_layer = d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f
  return cfg.num_hidden_layers * per_layer


def prefill_flops(cfg, b, t, k_logits) -> float:
  attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
  return (2 * non_embedding_params(cfg) * b * t
          + attn * b * t * (t + 1) / 2
          + 2 * cfg.hidden_size * cfg.vocab_size * b * k_logits)


def matmul_rates(n, reps):
  """(JAX, torch) float32 n x n matmul FLOP/s."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), np.float32)
  b = rng.standard_normal((n, n), np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  mm = jax.jit(lambda x, y: x @ y)
  t_j = median_time(lambda: mm(ja, jb).block_until_ready(), reps, 2)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  t_t = median_time(lambda: torch.matmul(ta, tb), reps, 2)
  return 2 * n ** 3 / t_j, 2 * n ** 3 / t_t


def bench_prefill(cfg, params, hf, b, t, reps):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, cfg.vocab_size, (b, t), dtype=np.int32)
  jids = jnp.asarray(ids)
  tids = torch.from_numpy(ids.astype(np.int64))

  @functools.partial(jax.jit, static_argnames="mode")
  def ours(p, tokens, mode):
    bb, tt = tokens.shape
    lf = "all" if mode == "all" else jnp.full((bb, 1), tt - 1, jnp.int32)
    return forward(p, cfg, tokens, logits_for=lf).logits

  rows = {}
  for mode, keep in (("last", 1), ("all", 0)):
    t_ours = median_time(
        lambda m=mode: ours(params, jids, m).block_until_ready(), reps, 2)
    with torch.no_grad():
      t_hf = median_time(
          lambda k=keep: hf(input_ids=tids, logits_to_keep=k, use_cache=False),
          reps, 1)
    rows[mode] = (t_ours, t_hf,
                  prefill_flops(cfg, b, t, 1 if mode == "last" else t))
  return rows


def decode_prompts(tok, b, n):
  """b windows of n tokens of real text (the TruthfulQA few-shot block)."""
  ids = tok.encode(data_lib.TQA_PROMPT_PREFIX, add_special=False)
  while len(ids) < n + 8 * b:
    ids = ids + ids
  return [ids[8 * i: 8 * i + n] for i in range(b)]


def bench_decode(cfg, params, hf, tok, b, n_prompt, n_new, reps):
  prompts = decode_prompts(tok, b, n_prompt)

  def ours():
    return generate([GenStream(cfg, params, prompts)], max_new_tokens=n_new)

  tids = torch.tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(tids)

  def theirs():
    with torch.no_grad():
      return hf.generate(input_ids=tids, attention_mask=mask, do_sample=False,
                         max_new_tokens=n_new, min_new_tokens=n_new,
                         use_cache=True, pad_token_id=cfg.eos_token_id)

  t_ours = median_time(ours, reps, 1)
  t_hf = median_time(theirs, reps, 1)
  a = ours()[0]
  h = theirs()[0, n_prompt:].tolist()
  same = next((i for i, (x, y) in enumerate(zip(a, h)) if x != y),
              min(len(a), len(h)))
  return t_ours, t_hf, same


def main():
  ap = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--reps", type=int, default=5, help="timed calls (median)")
  ap.add_argument("--prefill", default="1x512,8x128",
                  help="comma-separated BxT prefill shapes")
  ap.add_argument("--decode-batch", default="1,8",
                  help="comma-separated decode batch sizes")
  ap.add_argument("--prompt", type=int, default=128,
                  help="decode prompt tokens")
  ap.add_argument("--new", type=int, default=64, help="decode new tokens")
  ap.add_argument("--matmul", type=int, default=2048,
                  help="n of the n x n float32 reference matmul")
  ap.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                  help="torch.set_num_threads (default os.cpu_count())")
  ap.add_argument("--json", metavar="OUT", help="also write results here")
  ap.add_argument("--quick", action="store_true",
                  help="tiny shapes (1x32,2x16; decode 16+4 at batch 1,2;"
                       " 512 matmul; 2 reps): an end-to-end check only")
  args = ap.parse_args()
  if args.quick:
    args.reps, args.prefill, args.decode_batch = 2, "1x32,2x16", "1,2"
    args.prompt, args.new, args.matmul = 16, 4, 512
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.prefill.split(",")]
  batches = [int(v) for v in args.decode_batch.split(",")]

  torch.set_num_threads(args.torch_threads)
  load = os.getloadavg()[0]
  if load > 0.5:
    print(f"WARNING: 1-min load average {load:.1f} before starting: another"
          " process is using the CPU, timings (torch's OpenMP threads above"
          " all) will be off")
  cfg, params, tok = registry.load("smollm2")
  with tempfile.TemporaryDirectory() as d:
    loaders.save_hf(d, cfg, params)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        d, dtype=torch.float32).eval()
  attn_impl = hf.config._attn_implementation  # pylint: disable=protected-access
  print(f"device: {jax.devices()[0].device_kind}"
        f" ({platform.processor() or platform.machine()}, os.cpu_count()="
        f"{os.cpu_count()}), float32; jax {jax.__version__}; torch"
        f" {torch.__version__} with {torch.get_num_threads()} threads;"
        f" transformers {transformers.__version__} (attention: {attn_impl});"
        f" load average {load:.1f}")
  print(f"model: SmolLM2-135M-Instruct, L={cfg.num_hidden_layers}"
        f" D={cfg.hidden_size} H={cfg.num_attention_heads}"
        f" Hkv={cfg.num_key_value_heads} F={cfg.intermediate_size}"
        f" V={cfg.vocab_size}, non-embedding params"
        f" {non_embedding_params(cfg) / 1e6:.1f} M; median of {args.reps}"
        + (" (--quick: tiny shapes, numbers mean nothing)" if args.quick
           else ""))
  res = {"argv": vars(args), "torch_threads": torch.get_num_threads(),
         "cpu_count": os.cpu_count(), "attn_implementation": attn_impl,
         "load_average": load,
         "prefill": [], "decode": []}

  jax_mm, torch_mm = matmul_rates(args.matmul, max(args.reps, 5))
  res["matmul"] = {"n": args.matmul, "jax_flops": jax_mm,
                   "torch_flops": torch_mm}

  print()
  print("| benchmark | setting | ours tok/s | transformers tok/s |"
        " ours / transformers |")
  print("|---|---|---|---|---|")
  flop_rows = []
  for b, t in shapes:
    rows = bench_prefill(cfg, params, hf, b, t, args.reps)
    for mode, (t_o, t_h, fl) in rows.items():
      what = ("last logits (logits_for=last vs logits_to_keep=1)"
              if mode == "last" else "all logits")
      print(f"| prefill, {what} | B={b} T={t} | {b * t / t_o:,.0f} |"
            f" {b * t / t_h:,.0f} | {t_h / t_o:.2f}x |", flush=True)
      res["prefill"].append({"batch": b, "len": t, "logits": mode,
                             "ours_s": t_o, "hf_s": t_h, "flops": fl})
      flop_rows.append((b, t, mode, fl, t_o, t_h))
  for b in batches:
    t_o, t_h, same = bench_decode(cfg, params, hf, tok, b, args.prompt,
                                  args.new, args.reps)
    n = b * args.new
    print(f"| decode, greedy (incl. prefill) | B={b}, {args.prompt}+"
          f"{args.new} tokens | {n / t_o:,.1f} | {n / t_h:,.1f} |"
          f" {t_h / t_o:.2f}x |", flush=True)
    res["decode"].append({"batch": b, "prompt": args.prompt, "new": args.new,
                          "ours_s": t_o, "hf_s": t_h,
                          "greedy_tokens_agree_row0": same})
  print()
  print(f"dense float32 {args.matmul}x{args.matmul} matmul: JAX"
        f" {jax_mm / 1e9:.1f} GFLOP/s, torch {torch_mm / 1e9:.1f} GFLOP/s")
  print("| prefill | GFLOP per call | ours GFLOP/s | ours % of JAX matmul |"
        " transformers GFLOP/s | transformers % of JAX matmul |")
  print("|---|---|---|---|---|---|")
  for b, t, mode, fl, t_o, t_h in flop_rows:
    print(f"| B={b} T={t}, {mode} logits | {fl / 1e9:.2f} |"
          f" {fl / t_o / 1e9:.1f} | {100 * fl / t_o / jax_mm:.0f} % |"
          f" {fl / t_h / 1e9:.1f} | {100 * fl / t_h / jax_mm:.0f} % |")
  print()
  for r in res["decode"]:
    print(f"greedy decode B={r['batch']}: ours and transformers agree on the"
          f" first {r['greedy_tokens_agree_row0']} of {args.new} new tokens"
          " of row 0")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
