# One-command set-up: every target below creates .venv (if missing) and installs the toolkit into it first.
# torch, torchvision and timm are resolved together by one pip call in a fresh venv (README, Development).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help setup demo test lint data clean

help:
	@echo "make demo   set up .venv if needed, then analyse tf_efficientnet_lite0 (bundled ImageNet weights) on the embedded photos"
	@echo "make test   set up .venv if needed, then ruff and the whole test suite (PYTEST_ARGS=--runslow for slow tests)"
	@echo "make data   install the full Fashion-MNIST set from Debian (dataset-fashion-mnist, 31 MB)"
	@echo "make clean  remove .venv and caches"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/cka-scale analyze tf_efficientnet_lite0 --scales 32,64,128,224 --layers stages --out runs/demo
	$(BIN)/cka-scale analyze tf_efficientnet_lite0 --scales 32,64,128,224 --layers blocks --out runs/demo-blocks
	@echo "demo done: figures and report in runs/demo and runs/demo-blocks"

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST already installed"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y dataset-fashion-mnist; \
	else sudo apt-get install -y dataset-fashion-mnist; fi

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
