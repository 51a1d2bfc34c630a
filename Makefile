# Each target creates or reuses .venv and installs the package (editable, with dev tools) first,
# so on a fresh machine `make train` or `make test` is the only command needed. The versions are
# constraints.txt's: the exact set tested here (pyproject.toml keeps a library's ranges).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install constraints train bench gpu-check test lint format clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $@

# constraints.txt from what .venv has (after a pin was moved there and `make install` ran)
constraints: $(INSTALLED)
	$(PY) tools/freeze_constraints.py > constraints.txt

# make train ARGS="optimizer=adamw scheduler=onecycle trainer.epochs=20"
train: $(INSTALLED)
	$(PY) -m cifar_exp.train $(ARGS)

# make bench: the quick subset (minutes); make bench ARGS=--full: every variant on every image
# (an hour on 2 CPU cores); CIFAR_DATA=<folder tree> for the copy
bench: $(INSTALLED)
	$(PY) -m cifar_exp.bench $(ARGS)

# make gpu-check ARGS="--data <CIFAR-10 folder, official folder or .tar.gz>"  (a CUDA GPU; README)
gpu-check: $(INSTALLED)
	$(PY) -m cifar_exp.gpucheck $(ARGS)

# make test ARGS="-k data"  (CIFAR_DATA=<unpacked folder tree> skips unpacking ../shared/data)
test: $(INSTALLED) lint
	$(PY) -m pytest $(ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check cifar_exp tests tools
	$(VENV)/bin/ruff format --check cifar_exp tests tools

format: $(INSTALLED)
	$(VENV)/bin/ruff format cifar_exp tests tools
	$(VENV)/bin/ruff check --fix cifar_exp tests tools

clean:
	rm -rf outputs/*/ .pytest_cache .ruff_cache
