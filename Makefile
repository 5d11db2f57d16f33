# Two entry points for a fresh machine: `make demo` and `make test`.
# Both build .venv themselves; torch is pinned first so pip takes the local CPU wheel.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM = false
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: venv demo test bench gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,ray]" "$(TORCH)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/eoslab demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[dev,ray,bench]" "$(TORCH)"
	# learnability.py trains every regime at its defaults (hours on a 2-core CPU): run it on its own
	# (spread.py is the benches' summary helper, not a bench)
	for f in $(filter-out %/learnability.py %/spread.py,$(wildcard experiments/bench/*.py)); do \
		$(BIN)/python $$f || exit 1; done

# The GPU path's checks, on a machine with CUDA (CI has none): the DEVICES-parametrized tests on the GPU, then
# scale.py's 4x256 and Pythia-160m shapes with bf16 training and float32 probes. GPU_PY: a python that has the
# project's dependencies and a CUDA build of torch (this venv's torch is the CPU build).
GPU_PY ?= $(BIN)/python
gpu-check:
	$(GPU_PY) -m pytest -q -k cuda tests/test_run.py tests/test_probes_hvp.py tests/test_probes_memory.py
	$(GPU_PY) experiments/bench/scale.py --models 4x256 160m --gap 10 --autocast bfloat16 --head-chunk 1024

clean:
	rm -rf $(VENV) runs .pytest_cache
