# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
comma  := ,
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# Extra pip arguments for the torch install, e.g. --index-url of a CPU-only wheel index.
TORCH_PIP_ARGS ?=
# Extras installed with the project; EXTRAS=test,reference adds NeMo for the reference tests.
EXTRAS ?= test

.PHONY: demo test venv clean

# The virtual environment, torch first (the CPU wheel where no torch is importable: an unpinned
# torch would pull several GB of CUDA wheels), then the project with its test extra.
$(VENV)/.installed-$(subst $(comma),-,$(EXTRAS)): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

demo: venv
	$(VENV)/bin/salm demo

test: venv
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache
