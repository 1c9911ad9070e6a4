"""Generate text with any decoding method (greedy, DoLa, SLED, ICD, LOL...).

  python -m eval.generate --prompt "What happens if you crack your knuckles?" \
      --method lol_prompt --chat --max-new-tokens 48

Models: --model smollm2 (default, offline), gguf:FILE, hf:FOLDER or tiny;
--amateur hf:FOLDER for *_ft methods (a fine-tuned amateur, see
configs/decoding/amateur.py).
"""

import argparse
import sys
import time


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m eval.generate", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prompt", action="append", required=True,
                  help="prompt text; repeat for a batch")
  ap.add_argument("--method", default="base",
                  help="base, dola, sled, icd_prompt, icd_ft, lol_prompt,"
                  " lol_ft (optionally +ps)")
  ap.add_argument("--model", default="smollm2")
  ap.add_argument("--amateur", default="", help="model spec for *_ft methods")
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--temperature", type=float, default=0.0,
                  help="0 = greedy")
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--relative-top", type=float, default=0.1,
                  help="plausibility mask alpha for contrastive methods")
  ap.add_argument("--stop", action="append", default=[],
                  help="stop string (repeatable)")
  ap.add_argument("--chat", action="store_true",
                  help="wrap each prompt in the model's chat template")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  from jaxlib_models.decoding import generation
  from jaxlib_models.lm import registry
  cfg, params, tok = registry.load(args.model)
  models = {"main": (cfg, params)}
  if args.amateur:
    c2, p2, _ = registry.load(args.amateur)
    models["ft"] = (c2, p2)
  t0 = time.time()
  try:
    outs = generation.generate(
        models, tok, args.prompt, args.method,
        max_new_tokens=args.max_new_tokens, relative_top=args.relative_top,
        chat=args.chat, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, stop_strings=tuple(args.stop), progress=True)
  except (KeyError, ValueError) as e:
    ap.error(str(e))
  for p, o in zip(args.prompt, outs):
    print(f"### {p}\n{o}\n")
  print(f"({time.time() - t0:.1f} s)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
