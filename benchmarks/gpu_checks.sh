#!/usr/bin/env bash
# The library's GPU checks in one short run (for a lent GPU machine whose
# Python already has jax[cuda], flax, optax, orbax, chex, pytest, torch):
#   bash benchmarks/gpu_checks.sh [OUTDIR]
# Extra wheels the image lacks (ml_collections, constriction) may be put in
# .whl/; they are installed to /tmp/site first. Each part has its own time
# limit so one hang cannot eat the others' time. Results go to OUTDIR
# (default runs/gpu_checks): pallas_tests.txt, score_gpu.json, mfu.json.
set -u
OUT_DIR=${1:-runs/gpu_checks}
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
echo "== 1. Pallas gauss_attention kernel, compiled (pytest -m gpu)"
JAX_PLATFORMS=cuda,cpu timeout 180 python3 -m pytest -q -p no:cacheprovider \
  -m gpu tests/kernels 2>&1 | tee "$OUT_DIR/pallas_tests.txt" | tail -15
echo "== 2. Pallas vs XLA scan timing (benchmarks/score_speed.py --only gpu)"
timeout 120 python3 benchmarks/score_speed.py --only gpu \
  --json "$OUT_DIR/score_gpu.json"
echo "== 3. LM train-step MFU (benchmarks/lm_mfu.py)"
timeout ${MFU_TIMEOUT:-300} python3 benchmarks/lm_mfu.py \
  --presets ${MFU_PRESETS:-tinyllama-1.1b@none,tinyllama-1.1b,smollm2-1.7b,llama-3.2-3b@full} --json "$OUT_DIR/mfu.json"
echo "== done"
