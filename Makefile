# Every target mirrors a command in README.md. `make help` lists them.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 3000
export BENTOML_DO_NOT_TRACK := true

.DEFAULT_GOAL := help
.PHONY: help setup setup-app demo serve run test test-all lint build image image-test image-run bench cluster

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: ## Create .venv with every locked dependency: serving, training, spark, dev tools
	PYTHON=$(PYTHON) VENV=$(VENV) bash .ci/setup dev

setup-app: ## Create .venv with only what training and serving need (the first command)
	PYTHON=$(PYTHON) VENV=$(VENV) bash .ci/setup

demo: setup-app ## Train the demo (churn), promote through the gates, import into the BentoML store
	$(BIN)/python -m training demo

serve: ## Serve the imported models on http://127.0.0.1:$(PORT)
	$(BIN)/bentoml serve service:Scoring --host 127.0.0.1 --port $(PORT)

run: demo serve ## The README's first command: set up, train the demo, serve it on :3000

test: setup ## The fast lane: every test that starts no process (about a minute)
	$(BIN)/python -m pytest -m "not process"

test-all: setup ## The README's second command: the whole test suite (what CI runs)
	$(BIN)/python -m pytest

lint: setup ## ruff + mypy
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

build: ## bentoml build (models pinned) from the current BentoML store
	$(BIN)/bentoml build

# IMAGE_BACKEND, BASE_IMAGE (or =local), EXTRA_CA_CERTS, IMAGE_TAG: docs/container.md
BENTO ?= scoring:latest
image: setup ## Lint the Dockerfile and build the container image of $(BENTO) (packaging/image.sh)
	PYTHON=$(BIN)/python bash packaging/image.sh build $(BENTO)

image-test: setup ## Prove an image serves: IMAGE=<tag> make image-test (or build and test one)
	SCORING_TEST_IMAGE=$(IMAGE) $(BIN)/python -m pytest -m image tests/test_image.py

image-run: ## Run IMAGE (default: the image of $(BENTO)) on http://127.0.0.1:$(PORT)
	eval "$$(bash packaging/image.sh env)" && $$CONTAINER_CLI run --rm -p 127.0.0.1:$(PORT):3000 \
		$(or $(IMAGE),$$($(BIN)/python -c 'import bentoml; print(bentoml.bentos.get("$(BENTO)").tag)'))

bench: setup ## Benchmark `bentoml serve` (as shipped and lean) beside plain FastAPI and MLServer (docs/performance.md)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || sudo apt-get install -y wrk
	$(BIN)/python -m benchmarks --sweeps $(or $(SWEEPS),2)

cluster: setup ## 2 replicas of the imported models behind HAProxy + Prometheus on PostgreSQL (docs/scale-out.md)
	command -v haproxy >/dev/null && command -v prometheus >/dev/null || (apt-get update -qq && apt-get install -y -qq haproxy prometheus) || sudo apt-get install -y haproxy prometheus
	$(BIN)/python -m tests.cluster --replicas $(or $(REPLICAS),2)
