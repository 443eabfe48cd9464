# Every target mirrors a command in README.md. `make help` lists them.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 3000
export BENTOML_DO_NOT_TRACK := true

.DEFAULT_GOAL := help
.PHONY: help setup demo serve run test lint build bench

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: ## Create .venv and install the locked dependencies (serving + training + dev)
	PYTHON=$(PYTHON) VENV=$(VENV) bash .ci/setup

demo: setup ## Train the demo (churn), promote through the gates, import into the BentoML store
	$(BIN)/python -m training demo

serve: ## Serve the imported models on http://127.0.0.1:$(PORT)
	$(BIN)/bentoml serve service:Scoring --host 127.0.0.1 --port $(PORT)

run: demo serve ## The README's first command: set up, train the demo, serve it on :3000

test: setup ## The README's second command: the whole test suite
	$(BIN)/python -m pytest

lint: setup ## ruff + mypy
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

build: ## bentoml build (models pinned) from the current BentoML store
	$(BIN)/bentoml build

bench: setup ## Benchmark a real `bentoml serve` against the in-process limit and a naive FastAPI baseline
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || sudo apt-get install -y wrk
	$(BIN)/python -m benchmarks --repeat $(or $(REPEAT),1)
