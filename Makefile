# Setup is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Installed first and repeated as a guard, so pip never swaps in a multi-GB CUDA build on a CPU
# machine. On a GPU machine, install torch for your CUDA first and run `make TORCH=torch`.
TORCH ?= torch==2.13.0
DEMO_MODEL := .cache/demo-model

.PHONY: demo test test-oldest setup clean

demo: $(VENV)/.installed $(DEMO_MODEL)/model.safetensors
	$(VENV)/bin/roletune train configs/demo.yaml --overwrite
	$(VENV)/bin/roletune eval runs/demo --max-new-tokens 32
	@echo "loss curves: runs/demo/loss.png"

test: $(VENV)/.installed $(DEMO_MODEL)/model.safetensors
	$(PY) -m pytest

# The suite again on the oldest transformers pyproject.toml accepts: its 5.x releases rename and drop
# Trainer arguments, and a run must not depend on which one is installed.
OLDEST_VENV := .venv-oldest
OLDEST := transformers==5.17.0
test-oldest: $(OLDEST_VENV)/.installed $(DEMO_MODEL)/model.safetensors
	$(OLDEST_VENV)/bin/python -m pytest

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TORCH)" -e ".[test,demo]"
	touch $@

$(OLDEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(OLDEST_VENV)/bin/python -m pip install -q "$(TORCH)" "$(OLDEST)" -e ".[test,demo]"
	touch $@

$(DEMO_MODEL)/model.safetensors: $(VENV)/.installed src/roletune/demo/tiny-qwen2.json
	rm -rf $(DEMO_MODEL)
	$(PY) -m roletune.demo $(DEMO_MODEL)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .cache runs
