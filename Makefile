# `make demo` and `make test` each set up everything on a fresh machine: Debian packages,
# a virtual environment in .venv with the pinned CPU build of PyTorch, and dodo itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dodo-installed
PYTEST_ARGS ?=

.PHONY: install demo test clean

install: $(STAMP)

# The venv's tools (pip's ninja, cmake) come first for anything the install builds.
$(STAMP): export PATH := $(abspath $(BIN)):$(PATH)

$(STAMP): setup.cfg pyproject.toml hpc/install-system-deps.sh
	bash hpc/install-system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# clip_benchmark: only its shipped class-name / template lists are read (dodo/eval/classnames.py);
	# it declares torchvision and open_clip, which we neither need nor can install: --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps 'clip_benchmark>=1.6,<2'
	# open_clip_torch and timm build models without torchvision (docs/models.md): --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps 'open_clip_torch>=3.0,<4' 'timm>=1.0.17,<2'
	@# No compiled DeepSpeed op is needed: dodo skips DeepSpeed's CPU comm op (it is only used
	@# for inference all-reduce), so no rank ever JIT-compiles (dodo/distributed/engine.py).
	touch $(STAMP)

demo: install
	$(BIN)/dodo submit jobs/demo.yaml

# The Slurm tests run against a real two-node Slurm on this machine (needs root; it stays up
# afterwards, `bash hpc/testcluster/slurm-testcluster.sh stop` stops it). Where it cannot start
# they are skipped with the reason, except under CI=true, where that fails the run.
test: install
	@bash hpc/testcluster/slurm-testcluster.sh start || { \
	  if [ "$${CI:-}" = true ]; then echo "dodo: the test Slurm cluster did not start (CI=true: a failure)" >&2; exit 1; fi; \
	  echo "dodo: the test Slurm cluster did not start; the Slurm tests will be skipped" >&2; }
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
