# quantgate: `make demo` runs the main job end to end; `make test` runs the tests.
# Both set themselves up on a fresh machine: a .venv with torch==2.13.0 (CPU) installed first,
# so pip never resolves an unpinned (multi-GB CUDA) torch, then the project with its test extra.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quantgate-installed
TORCH_PIN ?= torch==2.13.0

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test,ray,fast]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m service.demo

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo-data bench-data .pytest_cache
