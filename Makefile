# Each target creates or reuses .venv and installs the package (editable, with every extra and
# the dev tools) first, so on a fresh machine `make train` or `make test` is the only command
# needed. The versions are constraints.txt's: the exact set tested here (pyproject.toml keeps a
# library's ranges).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: help install constraints train bench gpu-check test test-quick lint format clean

# make help: every target below with its description (the text after "##" on its line)
help: ## list the targets and what each does
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(INSTALLED) ## create .venv (or reuse it) and install the package, every extra and the dev tools

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[dev,search,cluster,tensorboard]'
	touch $@

# constraints.txt from what .venv has (after a pin was moved there and `make install` ran)
constraints: $(INSTALLED) ## rewrite constraints.txt from what .venv has installed
	$(PY) tools/freeze_constraints.py > constraints.txt

# make train ARGS="optimizer=adamw scheduler=onecycle trainer.epochs=20"
train: $(INSTALLED) ## train one run (or a sweep with ARGS="-m ..."): python -m cifar_exp.train $(ARGS)
	$(PY) -m cifar_exp.train $(ARGS)

# make bench: the quick subset (minutes); make bench ARGS=--full: every variant on every image
# (an hour on 2 CPU cores); the data where CIFAR_DATA or conf/local/ say
bench: $(INSTALLED) ## benchmark the speed options against the naive path (docs/speed.md)
	$(PY) -m cifar_exp.bench $(ARGS)

# make gpu-check ARGS="--data <CIFAR-10 folder, official folder or .tar.gz>"  (a CUDA GPU; docs/scaling.md)
gpu-check: $(INSTALLED) ## check and measure training on a CUDA GPU (ARGS="--data <CIFAR-10>")
	$(PY) -m cifar_exp.gpucheck $(ARGS)

# make test ARGS="-k data"  (the tests read the data where CIFAR_DATA or conf/local/ say)
test: $(INSTALLED) lint ## the lint, then every test: pytest $(ARGS) (what CI runs)
	$(PY) -m pytest $(ARGS)

# The edit loop: the tests not marked slow (those that train or run a command for seconds)
test-quick: $(INSTALLED) lint ## the lint, then the tests not marked slow (the edit loop)
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: $(INSTALLED) ## ruff check, ruff format --check, and the import layers (lint-imports)
	$(VENV)/bin/ruff check cifar_exp conf hydra_plugins tests tools
	$(VENV)/bin/ruff format --check cifar_exp conf hydra_plugins tests tools
	$(VENV)/bin/lint-imports --no-cache

format: $(INSTALLED) ## ruff format and ruff check --fix
	$(VENV)/bin/ruff format cifar_exp conf hydra_plugins tests tools
	$(VENV)/bin/ruff check --fix cifar_exp conf hydra_plugins tests tools

clean: ## remove the run folders under outputs/ and the tools' caches
	rm -rf outputs/*/ .pytest_cache .ruff_cache
