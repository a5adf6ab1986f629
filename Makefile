# cleardit: `make demo` and `make test` each build .venv when needed, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch on this kind of machine; set TORCH_SPEC="torch" (or a CUDA build) elsewhere.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-slow bench bench-quick bench-parallel lint format clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/cleardit flops --height 8192 --width 8192 --radius 8
	$(VENV)/bin/cleardit check

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: install
	$(PY) bench/attention_cpu.py

bench-quick: install
	$(PY) bench/attention_cpu.py --quick

bench-parallel: install
	$(PY) bench/parallel.py --quick

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
