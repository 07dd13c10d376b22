# Setup is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Installed first and repeated as a guard, so pip never swaps in a multi-GB CUDA build on a CPU
# machine. On a GPU machine, install torch for your CUDA first and run `make TORCH=torch`.
TORCH ?= torch==2.13.0
DEMO_MODEL := .cache/demo-model

.PHONY: demo test setup clean

demo: $(VENV)/.installed $(DEMO_MODEL)/model.safetensors
	$(VENV)/bin/roletune train configs/demo.yaml --overwrite
	$(VENV)/bin/roletune eval runs/demo --max-new-tokens 32
	@echo "loss curves: runs/demo/loss.png"

test: $(VENV)/.installed $(DEMO_MODEL)/model.safetensors
	$(PY) -m pytest

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TORCH)" -e ".[test,demo]"
	touch $@

$(DEMO_MODEL)/model.safetensors: $(VENV)/.installed src/roletune/demo/tiny-qwen2.json
	rm -rf $(DEMO_MODEL)
	$(PY) -m roletune.demo $(DEMO_MODEL)

clean:
	rm -rf $(VENV) .cache runs
