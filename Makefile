# One-command set-up: every target below creates .venv (if missing) and installs the toolkit into it first.
# torch, torchvision and timm are resolved together by one pip call in a fresh venv (README, Development).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help setup demo test lint data clean

help:
	@echo "make demo   set up .venv if needed, then analyse tf_efficientnet_lite0 (bundled ImageNet weights) on 212 photo"
	@echo "            stamps (make data; without them on 320 texture crops of the embedded photos)"
	@echo "make test   set up .venv if needed, then ruff and the whole test suite (PYTEST_ARGS=--runslow for slow tests)"
	@echo "make data   install from Debian: the Tux Paint photo stamps (tuxpaint-stamps-default) and Fashion-MNIST"
	@echo "            (dataset-fashion-mnist, 31 MB)"
	@echo "make clean  remove .venv and caches"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

# The demo needs >= 200 real images for intervals narrow enough to read: the stamps when installed, else textures.
DEMO_DATA = $(shell test -d $${CKA_SCALE_STAMPS_DIR:-/usr/share/tuxpaint/stamps} && echo stamps || echo textures)

demo: $(STAMP)
	@echo "demo data: $(DEMO_DATA) (run \`make data\` for the 212 photo stamps)"
	$(BIN)/cka-scale analyze tf_efficientnet_lite0 --scales 32,64,128,224 --layers stages --data $(DEMO_DATA) --out runs/demo
	$(BIN)/cka-scale analyze tf_efficientnet_lite0 --scales 32,64,128,224 --layers blocks --data $(DEMO_DATA) \
		--out runs/demo-blocks
	@echo "demo done: figures and report in runs/demo and runs/demo-blocks"

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

DATA_PACKAGES = dataset-fashion-mnist tuxpaint-stamps-default

data:
	@missing=""; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	[ -d /usr/share/tuxpaint/stamps ] || missing="$$missing tuxpaint-stamps-default"; \
	if [ -z "$$missing" ]; then echo "$(DATA_PACKAGES): already installed"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y --no-install-recommends $$missing; \
	else sudo apt-get install -y --no-install-recommends $$missing; fi

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
