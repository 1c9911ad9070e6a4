#!/usr/bin/env bash
# The library's GPU checks in one short run (for a lent GPU machine whose
# Python already has jax[cuda], flax, optax, orbax, chex, pytest, torch):
#   bash benchmarks/gpu_checks.sh [OUTDIR]
# Extra wheels the image lacks (ml_collections, constriction) may be put in
# .whl/; they are installed to /tmp/site first. Each part has its own time
# limit so one hang cannot eat the others' time. Results go to OUTDIR
# (default runs/gpu_checks): pallas_tests.txt, score_gpu.json, mfu.json,
# streamv2v_fps.json, bank_attention.txt. Parts 4-5 (issue 7) also need the
# wheels regex and open-clip-torch (its BPE vocabulary only) in .whl/.
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
echo "== 4. StreamV2V end-to-end FPS, SD-1.5 + TAESD, 512x512, fp16 (issue 7)"
timeout ${FPS_TIMEOUT:-300} python3 benchmarks/streamv2v_fps.py --arch sd15 \
  --size 512 --frames ${FPS_FRAMES:-100} --json "$OUT_DIR/streamv2v_fps.json"
echo "== 5. bank attention: Pallas vs XLA vs cuDNN-less dot_product_attention"
timeout 120 python3 benchmarks/bank_attention_speed.py 2>&1 \
  | tee "$OUT_DIR/bank_attention.txt" | tail -20
echo "== done"
