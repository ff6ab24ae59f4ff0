# The whole pipeline: data -> train -> export -> model repository -> serve -> client.
# On a fresh machine:  make demo   (generation through a real Triton server)
#                      make test   (the test suite; what CI runs)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= models/shakespeare-lstm-2x512
REPO ?= model_repository
# The shipped model was trained with exactly these flags (see its model_card.json).
TRAIN_FLAGS ?= --max-steps 1300 --eval-every 100 --checkpoint-every 100
SAMPLE_FLAGS ?= --prompt "ROMEO:" --length 500 --temperature 0.8 --seed 1
PYTEST_FLAGS ?=

.PHONY: setup data train evaluate sample export verify plan serve stop demo test test-slow clean help

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON): not found (install Python 3.11 or pass PYTHON=...)"; exit 3; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed ## create .venv and install the pinned dependencies

data: setup ## put Tiny Shakespeare at data/ (from ../shared or downloaded) and verify it
	$(PY) -m train.prepare

train: data ## train the default 2x512 LSTM (about 100 min on 2 cores) into $(MODEL)
	$(PY) -m train.train --out $(MODEL) $(TRAIN_FLAGS)

evaluate: data ## test-split perplexity of $(MODEL)
	$(PY) -m train.evaluate --model $(MODEL)

sample: setup ## generate text in-process with TensorFlow (the reference sampler)
	$(PY) -m train.sample --model $(MODEL) $(SAMPLE_FLAGS)

test: setup data ## the test suite (what CI runs); slow suites are excluded
	$(PY) -m pytest -m "not slow" $(PYTEST_FLAGS)

test-slow: setup data ## only the slow suites
	$(PY) -m pytest -m slow $(PYTEST_FLAGS)

clean: ## remove generated artifacts (keeps .venv, data and the shipped model)
	rm -rf logs export/build $(REPO)/*/1/model.onnx .pytest_cache
