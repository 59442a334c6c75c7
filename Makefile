# quantgate: `make demo` runs the main job end to end; `make test` runs the tests.
# Both set themselves up on a fresh machine: a .venv with torch==2.13.0 installed first from
# TORCH_INDEX (the CPU build by default), so pip never resolves an unpinned (multi-GB CUDA) torch,
# then the project with every extra and the test tools ([all,test]).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quantgate-installed
TORCH_PIN ?= torch==2.13.0
# Where torch comes from, as an extra index: its local-version build (2.13.0+cpu) outranks PyPI's
# 2.13.0 (CUDA). For a GPU machine: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
# An unreachable index is skipped with a warning (pip then takes what its other sources offer).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= all,test

.PHONY: setup test demo bench container-test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# setuptools >= 77 is the build backend pyproject.toml names (the bare-install test builds the wheel with it)
	$(PY) -m pip install --quiet --upgrade pip 'setuptools>=77'
	$(PY) -m pip install --quiet $(TORCH_PIN) --extra-index-url $(TORCH_INDEX)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]' $(TORCH_PIN)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m quantgate.service.demo

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Builds the Docker image on a local Debian base and runs it (root, docker.io, debootstrap; ~20 min).
# Not part of `make test`. See tests/container/container_test.sh.
container-test: $(STAMP)
	PYTHON=$(abspath $(PY)) tests/container/container_test.sh

clean:
	rm -rf $(VENV) demo-data bench-data .pytest_cache
