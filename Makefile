# Two commands on a fresh machine: `make test` and `make demo`. Both create .venv when missing.
# GPU users: keep the tested torch version but take a CUDA build, e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
DEMO_DIR ?= runs/demo
PY := $(VENV)/bin/python

.PHONY: setup test test-deploy demo bench bundles clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# the MONAI Deploy app's test, in its own environment: the SDK brings holoscan and a CUDA runtime (~1.5 GB)
DEPLOY_VENV ?= .venv-deploy
test-deploy:
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(DEPLOY_VENV)/bin/python -m pip install -q -e ".[test,deploy]"
	ulimit -s 32768; $(DEPLOY_VENV)/bin/python -m pytest -n 0 tests/workflows/test_deploy_app.py

demo: setup
	$(PY) -m workflows demo --out $(DEMO_DIR)

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

bundles: setup
	$(PY) -m workflows package-bundles --out_dir dist

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) runs dist .pytest_cache
