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

.PHONY: venv demo test bench clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
