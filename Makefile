# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
comma  := ,
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# Extra pip arguments for the torch install, e.g. --index-url of a CPU-only wheel index.
TORCH_PIP_ARGS ?=
# Extras installed with the project (`make test-reference` adds NeMo on top).
EXTRAS ?= test
# `make demo BESTOW=1` trains BESTOW instead of SALM.
DEMO_ARGS := $(if $(BESTOW),--arch bestow)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-reference gpu-check venv espeak clean

# The virtual environment, torch first (the CPU wheel where no torch is importable: an unpinned
# torch would pull several GB of CUDA wheels), then the project with its test extra.
$(VENV)/.installed-$(subst $(comma),-,$(EXTRAS)): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

# espeak-ng speaks the demo's dataset; installed from the system's package manager if absent.
espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "installing espeak-ng (speech synthesis for the demo's dataset)"; \
	  if command -v apt-get >/dev/null 2>&1; then \
	    $(SUDO) apt-get install -y -q espeak-ng >/dev/null 2>&1 || \
	    { $(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q espeak-ng >/dev/null; }; \
	  elif command -v brew >/dev/null 2>&1; then brew install espeak-ng; fi; \
	  command -v espeak-ng >/dev/null 2>&1 || { \
	    echo "could not install espeak-ng: install it with your package manager" \
	         "(apt-get install espeak-ng, brew install espeak-ng) and run make again"; exit 1; }; }

demo: venv espeak
	$(VENV)/bin/salm demo $(DEMO_ARGS)

# The demo's test needs espeak-ng too; without it that test is skipped (with the reason).
# NeMo-Run (recipes/ and their tests) goes on top of the installed set: resolved together with
# NeMo's dependencies, pip backtracked into building old source distributions.
test: venv
	-@$(MAKE) --no-print-directory espeak
	@$(PY) -c "import nemo_run" 2>/dev/null || $(PY) -m pip install --quiet -e ".[launch]"
	$(PY) -m pytest tests

# The tests that compare with NeMo's own modules (marked `reference`), with NeMo on top of the
# test set in the same environment.
test-reference: venv
	@$(PY) -c "import nemo.collections.asr" 2>/dev/null || $(PY) -m pip install --quiet -e ".[reference]"
	$(PY) -m pytest -m reference tests

# On a machine with one CUDA GPU: the GPU tests, a 1B-class SALM/BESTOW step in bf16 with MFU, and
# the decoding benchmark, into gpu-check.log (tools/gpu_check.sh). Transformer Engine comes with
# the Dockerfile's image, or with `make gpu-check EXTRAS=test,gpu`.
gpu-check: venv
	PY=$(PY) tools/gpu_check.sh gpu-check.log

clean:
	rm -rf $(VENV) .pytest_cache
