# Setup is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every package the suite was last run with, at its version: a fresh clone installs exactly that.
# docs/installs.md says how to refresh them (`make pins`).
PINS := requirements/pins.txt
OLDEST_PINS := requirements/pins-oldest.txt
# torch is pinned by version only, so the same pin takes the CPU wheel on a CPU machine and PyPI's CUDA
# build elsewhere. It is installed first and repeated as a guard, so pip never swaps in a multi-GB CUDA
# build on a CPU machine. TORCH names another (`make test TORCH=torch==2.11.0`, the one a GPU has).
TORCH ?= $(shell grep '^torch==' $(PINS))
EXTRAS := test,demo
GGUF_EXTRAS := test,demo,gguf
DEMO_MODEL := .cache/demo-model
# Programs and files the slow tests use, installed or fetched once (their rules are below).
BROWSER := /usr/bin/chromium
GO := /usr/bin/go
CONVERTER := .cache/llama.cpp/convert_hf_to_gguf.py
LLAMA_CPP := $(VENV)/.gguf-installed

.PHONY: demo test test-slow test-oldest test-latest test-latest-oldest pins setup clean

demo: $(VENV)/.installed $(DEMO_MODEL)/model.safetensors
	$(VENV)/bin/roletune train configs/demo.yaml --overwrite
	$(VENV)/bin/roletune eval runs/demo --overwrite
	@echo "loss curves: runs/demo/loss.png; model card: runs/demo/README.md"
	@echo "roletune is installed in $(VENV): run $(VENV)/bin/roletune, or 'source $(VENV)/bin/activate' first,"
	@echo "then for instance: roletune chat runs/demo"

# The fast suite (minutes on two cores); test-slow runs the tests marked slow: whole training runs, process
# launches (servers, a browser, llama.cpp's converter), compiles, lever A/B runs, and the benchmarks' rehearsals.
test: $(VENV)/.installed $(DEMO_MODEL)/model.safetensors
	$(PY) -m pytest -m "not slow"

test-slow: $(VENV)/.installed $(DEMO_MODEL)/model.safetensors $(LLAMA_CPP) $(CONVERTER) $(BROWSER) $(GO)
	ROLETUNE_BROWSER=$(BROWSER) ROLETUNE_GO=$(GO) $(PY) -m pytest -m slow

# The web page's tests drive Debian's Chromium through Playwright, whose own browser download needs a
# network; the Ollama export's tests render its template with Go's text/template, as Ollama does. With
# ROLETUNE_BROWSER and ROLETUNE_GO set, a missing program fails those tests instead of skipping them.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_INSTALL = @command -v apt-get >/dev/null || { echo "the tests need $(1) (Debian's package $(2))"; exit 1; }; \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null || \
	{ $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; }
$(BROWSER):
	$(call APT_INSTALL,Chromium,chromium)
$(GO):
	$(call APT_INSTALL,Go,golang-go)

# llama.cpp's runtime and quantizer, for the export tests: the gguf extra, whose llama-cpp-python pip compiles
# (minutes on two cores, once: pip keeps the wheel), without the multimodal library roletune does not use.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
$(LLAMA_CPP): $(VENV)/.installed
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[$(GGUF_EXTRAS)]"
	touch $@

# llama.cpp's converter, for the export tests: taken once from the llama-cpp-python source distribution.
$(CONVERTER): | $(VENV)/.installed
	$(PY) -m roletune.export.llama_cpp fetch $(dir $@)

# The suite again on the oldest transformers pyproject.toml accepts, with pins of its own: its 5.x releases rename
# and drop Trainer arguments, and a run must not depend on which one is installed. The benchmark rehearsals, GGUF
# exports, the web page and the multi-rank and kill-and-resume runs are left out (pyproject.toml's markers say why).
OLDEST_VENV := .venv-oldest
OLDEST := transformers==5.17.0
test-oldest: $(OLDEST_VENV)/.installed $(DEMO_MODEL)/model.safetensors
	$(OLDEST_VENV)/bin/python -m pytest -m "not benchmark and not export and not browser and not ranks"

setup: $(VENV)/.installed

# install VENV [PINS] [EXTRA REQUIREMENTS]: a new environment. With PINS it holds the pinned versions (they
# constrain everything but torch, which TORCH names); without, the newest releases pyproject.toml accepts.
define install
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q "$(TORCH)"
	$(if $(2),grep -v '^torch==' $(2) > $(1)/constraints.txt)
	$(1)/bin/python -m pip install -q $(if $(2),-c $(1)/constraints.txt) "$(TORCH)" $(3) -e ".[$(or $(4),$(EXTRAS))]"
endef

$(VENV)/.installed: pyproject.toml $(PINS)
	$(call install,$(VENV),$(PINS))
	touch $@

$(OLDEST_VENV)/.installed: pyproject.toml $(OLDEST_PINS)
	$(call install,$(OLDEST_VENV),$(OLDEST_PINS))
	touch $@

# The newest releases pyproject.toml accepts (torch aside: TORCH still names it), in environments made
# afresh each time. Not part of CI: it tells whether upstream releases broke something before the pins move.
LATEST_VENV := .venv-latest
LATEST_OLDEST_VENV := .venv-latest-oldest
test-latest: $(DEMO_MODEL)/model.safetensors
	$(call install,$(LATEST_VENV),,,$(GGUF_EXTRAS))
	$(LATEST_VENV)/bin/python -m pytest

test-latest-oldest: $(DEMO_MODEL)/model.safetensors
	$(call install,$(LATEST_OLDEST_VENV),,$(OLDEST),$(GGUF_EXTRAS))
	$(LATEST_OLDEST_VENV)/bin/python -m pytest

# Refresh the pins: when the suite passes on the newest releases (and on them with the oldest
# transformers), what they installed becomes the pins. Commit requirements/ and docs/installs.md.
pins: test-latest test-latest-oldest
	$(PYTHON) requirements/freeze.py $(LATEST_VENV) $(PINS)
	$(PYTHON) requirements/freeze.py $(LATEST_OLDEST_VENV) $(OLDEST_PINS)

$(DEMO_MODEL)/model.safetensors: $(VENV)/.installed src/roletune/demo/tiny-qwen2.json
	rm -rf $(DEMO_MODEL)
	$(PY) -m roletune.demo $(DEMO_MODEL)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(LATEST_VENV) $(LATEST_OLDEST_VENV) .cache runs
