# cleardit: `make demo` and `make test` each build .venv when needed, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch on this kind of machine; set TORCH_SPEC="torch" (or a CUDA build) elsewhere.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_PROMPT ?= a large red circle at the top left and a small blue square at the bottom right on a yellow and white vertical striped background
DEMO_OUTPUT ?= out/demo

.PHONY: install demo serve test test-slow bench bench-quick bench-3d bench-3d-quick bench-parallel bench-step lint format clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,ui]"
	touch $@

install: $(VENV)/.installed

# The shipped mini model at 4x its base size (512 px = 64x64 tokens): its 128 px image, refined at
# 512 px by the two-stage recipe with CLEAR r=8 and with full attention, side by side.
demo: install
	$(VENV)/bin/cleardit generate --prompt "$(DEMO_PROMPT)" --height 512 --width 512 --radius 8 \
		--highres --compare --warmup --output $(DEMO_OUTPUT)
	@echo "demo images in $(DEMO_OUTPUT)/: the 512 px CLEAR image, *-base.png (the 128 px image it started from)," \
		"*-full.png (the same with full attention), *-compare.png (all three side by side)"

# The web page (docs/serve.md) with the shipped mini model on http://127.0.0.1:7860; Ctrl+C stops it.
serve: install
	$(VENV)/bin/cleardit serve

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: install
	$(PY) bench/attention_cpu.py

bench-quick: install
	$(PY) bench/attention_cpu.py --quick

bench-3d: install
	$(PY) bench/attention_cpu_3d.py

bench-3d-quick: install
	$(PY) bench/attention_cpu_3d.py --quick

bench-parallel: install
	$(PY) bench/parallel.py --quick

# STEP-CPU: one 2-layer forward per family, full vs CLEAR vs the no-attention floor (--quick: < 60 s)
bench-step: install
	$(PY) bench/step_cpu.py --quick

lint: install
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples
	$(VENV)/bin/lint-imports --no-cache

format: install
	$(VENV)/bin/ruff format src tests bench examples
	$(VENV)/bin/ruff check --fix src tests bench examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
