r"""TruthfulQA-MC scoring speed with LOL: our engine against a reference loop.

  .venv/bin/python benchmarks/tqa_scoring_speed.py [--n 30] [--json OUT]

Scores the first `--n` TruthfulQA questions with `lol_prompt` (the default
LOL config: refocused expert vs evil-prompt amateur, final contrast + 0.5 x
the layer-22 contrast, relative_top 0, no post-softmax) on SmolLM2-135M,
float32, both sides on the same weights:

- ours: `harness.run_truthfulqa({"main": ...}, tok, out_dir,
  methods=["lol_prompt"], limit=n)` timed end to end (fresh out_dir; engine
  build, shared few-shot prefill and compilation included). Also reported:
  the time after the first question is scored (the first question carries
  the compilation; later questions may still compile a new shape bucket).
- reference: a PyTorch loop the way DoLa's / ICD's scripts do it, on
  `transformers.LlamaForCausalLM` (weights exported with `loaders.save_hf`):
  for each question, each answer (true answers first, then false), the
  expert input (refocus text + "\n\n" + prompt + answer) and the amateur
  input (evil prompt + "\n\n" + prompt + answer) each get one full forward
  with `output_hidden_states=True` (use_cache=False); the final logits and
  the layer-22 exit `lm_head(model.model.norm(hidden_states[22]))` are
  log-softmaxed over the vocabulary, F = (lpE_30 - lpA_30) + 0.5 (lpE_22 -
  lpA_22) and the answer's score is the sum of F at its tokens. Tokens are
  the same on both sides (our tokenizer): the answer ids are
  tok(P + C)[len(tok(P)):].

The scores of the two must agree (max |diff| over the first question and
over all n is printed; flagged above 1e-2). Prints both times, seconds per
question, the ratio (reference / ours: > 1 means ours is faster) and the
time extrapolated to all 817 questions (ours: first question + 816 x the
later per-question time; reference: 817 x its per-question mean). torch uses
`torch.set_num_threads(os.cpu_count())` (--torch-threads). Run on an idle
machine (the script warns when the load average is high).
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from jaxlib_models.decoding import data as data_lib
from jaxlib_models.decoding import engine as engine_lib
from jaxlib_models.decoding import harness
from jaxlib_models.lm import loaders, registry

METHOD = "lol_prompt"


def run_ours(models, tok, out_dir, n):
  """(total seconds, end time of each question's scoring relative to start)."""
  shutil.rmtree(out_dir, ignore_errors=True)
  marks = []
  orig = engine_lib.ScoringEngine.score

  def timed_score(self, *a, **kw):
    out = orig(self, *a, **kw)
    marks.append(time.perf_counter())
    return out

  engine_lib.ScoringEngine.score = timed_score
  try:
    t0 = time.perf_counter()
    harness.run_truthfulqa(models, tok, out_dir, methods=[METHOD], limit=n,
                           progress=False)
    total = time.perf_counter() - t0
  finally:
    engine_lib.ScoringEngine.score = orig
  if len(marks) != n:
    raise RuntimeError(f"scored {len(marks)} questions, expected {n}")
  with open(os.path.join(out_dir, "truthfulqa.jsonl"), encoding="utf-8") as f:
    recs = {r["idx"]: r for r in map(json.loads, f)}
  scores = [np.array(recs[i]["scores"][METHOD]) for i in range(n)]
  return total, [m - t0 for m in marks], scores


class Reference:
  """The DoLa/ICD-style per-answer, per-stream full-forward loop."""

  def __init__(self, hf, tok, expert_prefix, amateur_prefix, layers, weights):
    self.hf, self.tok = hf, tok
    self.prefixes = (expert_prefix, amateur_prefix)
    self.layers, self.weights = layers, weights
    self.forwards = 0

  def _logprobs(self, prompt, cont):
    """{layer: (n_cont, V) log-probs} at the answer positions, and its ids."""
    ids_p = self.tok.encode(prompt)
    full = self.tok.encode(prompt + cont)
    if full[:len(ids_p)] != ids_p:
      raise ValueError(f"BPE merge across the boundary: {cont!r}")
    ans = full[len(ids_p):]
    out = self.hf(input_ids=torch.tensor([full]), output_hidden_states=True,
                  use_cache=False)
    self.forwards += 1
    sl = slice(len(ids_p) - 1, len(full) - 1)
    n_layers = self.hf.config.num_hidden_layers
    lps = {n_layers: torch.log_softmax(out.logits[0, sl].float(), -1)}
    for j in self.layers:
      # hidden_states[j] (j < L) is the un-normed output of block j; only
      # hidden_states[L] has the final norm applied already.
      h = self.hf.model.norm(out.hidden_states[j][0, sl])
      lps[j] = torch.log_softmax(self.hf.lm_head(h).float(), -1)
    return lps, ans

  @torch.no_grad()
  def score(self, prompt, answers):
    n_layers = self.hf.config.num_hidden_layers
    res = []
    for a in answers:
      (e, ids_e), (m, ids_m) = (self._logprobs(p + prompt, a)
                                for p in self.prefixes)
      if ids_e != ids_m:
        raise ValueError(f"streams tokenize {a!r} differently")
      f = e[n_layers] - m[n_layers]
      for j, w in zip(self.layers, self.weights):
        f = f + w * (e[j] - m[j])
      tgt = torch.tensor(ids_e)
      res.append(float(f[torch.arange(len(tgt)), tgt].sum()))
    return np.array(res)


def main():
  ap = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=30,
                  help="first n TruthfulQA questions (>= 2)")
  ap.add_argument("--out-dir", help="our harness output folder (deleted"
                  " first; default a temporary folder)")
  ap.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                  help="torch.set_num_threads (default os.cpu_count())")
  ap.add_argument("--json", metavar="OUT", help="also write results here")
  args = ap.parse_args()
  if args.n < 2:
    ap.error("--n must be at least 2 (the first question is the compile)")
  torch.set_num_threads(args.torch_threads)
  load = os.getloadavg()[0]
  if load > 0.5:
    print(f"WARNING: 1-min load average {load:.1f} before starting: another"
          " process is using the CPU, timings will be off")

  cfg, params, tok = registry.load("smollm2")
  with tempfile.TemporaryDirectory() as d:
    loaders.save_hf(d, cfg, params)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        d, dtype=torch.float32).eval()
  methods, streams = harness.build_methods([METHOD], relative_top=0.0)
  m = methods[0]
  lol = m.cfg
  n_layers = cfg.num_hidden_layers
  if lol.relative_top != 0.0 or lol.post_softmax or \
      lol.lol.layer_select != "static":
    raise SystemExit("the reference loop implements static LOL with"
                     " relative_top 0 and no post-softmax only")
  by = {s.name: s for s in streams}
  layers = lol.lol.static_layers(n_layers)
  weights = lol.lol.static_weights(n_layers)
  ref = Reference(hf, tok, by[m.expert].prompt_prefix,
                  by[m.amateur].prompt_prefix, layers, weights)
  items = data_lib.load_truthfulqa()[:args.n]
  n_ans = sum(len(it.true_answers) + len(it.false_answers) for it in items)

  print(f"device: {jax.devices()[0].device_kind}"
        f" ({platform.processor() or platform.machine()}, os.cpu_count()="
        f"{os.cpu_count()}), float32; jax {jax.__version__}; torch"
        f" {torch.__version__} with {torch.get_num_threads()} threads;"
        f" transformers {transformers.__version__}; load average {load:.1f}")
  print(f"TruthfulQA-MC, first {args.n} questions ({n_ans} answers), method"
        f" {METHOD}: layers {layers} weights {weights}, relative_top 0,"
        " post_softmax False", flush=True)

  tmp = None
  out_dir = args.out_dir
  if out_dir is None:
    tmp = tempfile.mkdtemp(prefix="tqa_speed_")
    out_dir = os.path.join(tmp, "ours")
  try:
    t_ours, marks, ours_scores = run_ours({"main": (cfg, params)}, tok,
                                          out_dir, args.n)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  print(f"ours done: {t_ours:.1f} s", flush=True)

  with torch.no_grad():  # warm-up call (allocator, first-call overheads)
    hf(input_ids=torch.tensor([tok.encode("warm up")]), use_cache=False)
  ref_scores = []
  t0 = time.perf_counter()
  for it in items:
    ref_scores.append(ref.score(data_lib.build_tqa_prompt(it.question),
                                [data_lib.tqa_continuation(a) for a in
                                 it.true_answers + it.false_answers]))
  t_ref = time.perf_counter() - t0
  print(f"reference done: {t_ref:.1f} s ({ref.forwards} forwards)", flush=True)

  diff_first = float(np.abs(ours_scores[0] - ref_scores[0]).max())
  diff_all = max(float(np.abs(a - b).max())
                 for a, b in zip(ours_scores, ref_scores))
  t_first = marks[0]
  t_later = (marks[-1] - marks[0]) / (args.n - 1)
  ours_817 = t_first + 816 * t_later
  ref_q = t_ref / args.n
  ref_817 = 817 * ref_q
  print()
  print("| | ours (run_truthfulqa) | reference PyTorch loop |"
        " reference / ours |")
  print("|---|---|---|---|")
  print(f"| {args.n} questions, end to end | {t_ours:.1f} s | {t_ref:.1f} s |"
        f" {t_ref / t_ours:.1f}x |")
  print(f"| first question (ours: incl. engine build + compile) |"
        f" {t_first:.1f} s | {ref_q:.2f} s (mean) | |")
  print(f"| per question after the first | {t_later:.3f} s |"
        f" {ref_q:.2f} s (mean) | {ref_q / t_later:.1f}x |")
  print(f"| questions/s after the first | {1 / t_later:.2f} |"
        f" {1 / ref_q:.3f} | |")
  print(f"| extrapolated to 817 questions | {ours_817 / 60:.1f} min |"
        f" {ref_817 / 60:.1f} min | {ref_817 / ours_817:.1f}x |")
  flag = "OK" if diff_all < 1e-2 else "MISMATCH (> 1e-2)"
  print()
  print(f"score agreement ({METHOD}, summed over answer tokens): max |ours -"
        f" reference| = {diff_first:.2e} on question 0, {diff_all:.2e} over"
        f" all {args.n} questions: {flag}")
  print(f"question 0 scores, ours: {np.round(ours_scores[0], 3).tolist()}")
  print(f"question 0 scores, ref:  {np.round(ref_scores[0], 3).tolist()}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"n": args.n, "answers": n_ans, "method": METHOD,
                 "layers": list(layers), "weights": list(weights),
                 "torch_threads": torch.get_num_threads(),
                 "load_average": load, "ours_total_s": t_ours,
                 "ours_first_s": t_first, "ours_later_per_q_s": t_later,
                 "ours_817_s": ours_817, "ref_total_s": t_ref,
                 "ref_per_q_s": ref_q, "ref_817_s": ref_817,
                 "ref_forwards": ref.forwards,
                 "max_abs_diff_first": diff_first,
                 "max_abs_diff_all": diff_all}, f, indent=1)


if __name__ == "__main__":
  main()
