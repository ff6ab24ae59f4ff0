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
TRAIN_FLAGS ?= --max-steps 2500 --eval-every 250 --checkpoint-every 250
SAMPLE_FLAGS ?= --prompt "ROMEO:" --length 500 --temperature 0.8 --seed 1
PYTEST_FLAGS ?=
# The ports of charrnn/deployment.py (HTTP_PORT, GRPC_PORT, ..., written by `make generate`).
include serve/deployment.mk

.PHONY: setup data train evaluate sample export verify plan serve stop demo test test-slow clean help \
        bench soak import perf-input compose-plan compose-up compose-up-cpu compose-down perf \
        images compose-up-slim perf-slim soak-mixed lint format compose-up-scale bench-scale backend \
        compose-up-monitoring generate

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'
	@echo "ports (127.0.0.1): Triton $(HTTP_PORT) HTTP, $(GRPC_PORT) gRPC, $(METRICS_PORT) metrics; the stream model's server $(STREAM_HTTP_PORT), $(STREAM_GRPC_PORT), $(STREAM_METRICS_PORT); the proxy's stats $(STATS_PORT); Prometheus $(PROMETHEUS_PORT)"

generate: setup ## write the deployment files from charrnn/deployment.py and serve/templates/ (after editing either)
	$(PY) -m serve.generate

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON): not found (install Python 3.11 or pass PYTHON=...)"; exit 3; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed ## create .venv and install the pinned dependencies

data: setup ## put Tiny Shakespeare at data/ (from ../shared or downloaded) and verify it
	$(PY) -m train.prepare

train: data ## train the default 2x512 LSTM (about 60-200 min on 2 cores) into $(MODEL)
	$(PY) -m train.train --out $(MODEL) $(TRAIN_FLAGS)

evaluate: data ## test-split perplexity of $(MODEL)
	$(PY) -m train.evaluate --model-dir $(MODEL)

sample: setup ## generate text in-process with TensorFlow (the reference sampler)
	$(PY) -m train.sample --model-dir $(MODEL) $(SAMPLE_FLAGS)

ONNX := $(REPO)/charrnn_onnx/1/model.onnx
DEMO_FLAGS ?= --prompt "ROMEO:" --length 500 --temperature 0.8 --seed 1

$(ONNX): $(MODEL)/model.weights.h5 $(MODEL)/config.json | setup
	$(PY) -m export --model-dir $(MODEL) --repo $(REPO)

export: setup ## TF model -> ONNX -> TensorRT readiness check -> Triton model repository
	$(PY) -m export --model-dir $(MODEL) --repo $(REPO)

verify: $(ONNX) ## Expect/Received parity: ONNX Runtime vs TensorFlow (logits and 1,000 greedy chars)
	$(PY) -m export.verify --model-dir $(MODEL) --onnx $(ONNX)

plan: compose-plan ## TensorRT plan: needs NVIDIA's TensorRT container on a GPU host (docs/model.md)

backend: setup ## build Triton's ONNX Runtime backend from source (../shared/third_party or GitHub) -> build/backends/onnxruntime
	$(PY) -m serve.backend

serve: $(ONNX) backend ## start the local Triton servers (ONNX Runtime + python backends) on the main ports, the stream model on the stream ports
	$(PY) -m serve.local start

stop: setup ## stop the server `make serve` started
	$(PY) -m serve.local stop

demo: $(ONNX) backend ## THE MAIN JOB: local Triton up, ~500 characters generated through it, server down
	$(PY) -m client.demo $(DEMO_FLAGS)

bench: $(ONNX) data backend ## measured sweep: served generation (1..64 sequences) vs in-process baselines -> bench/results/
	$(PY) -m bench.bench

# Import a TF1 char-rnn model (checkpoint or sampleCharRNN .wts); see `python -m train.import_tf1 --help`.
IMPORT_FLAGS ?= --wts data/char-rnn.wts --vocab-builtin samplecharrnn --out models/samplecharrnn-import

soak: $(ONNX) ## 64 sequences x 2,000 characters through the local Triton: 0 errors, server RSS stable (SOAK_FLAGS)
	$(PY) -m bench.soak $(SOAK_FLAGS)

soak-mixed: $(ONNX) ## all python models at once (gRPC/HTTP, per char/chunked/streamed, bad requests) for 10 min
	$(PY) -m bench.mixed_soak $(MIXED_SOAK_FLAGS)

import: setup ## import a TF1 char-rnn checkpoint or sampleCharRNN .wts dump into a model directory (IMPORT_FLAGS)
	$(PY) -m train.import_tf1 $(IMPORT_FLAGS)

test: setup data lint backend ## the test suite (what CI runs): lint, then every suite but the slow ones
	$(PY) -m pytest -m "not slow" $(PYTEST_FLAGS)

lint: setup ## ruff and black, as configured in pyproject.toml (no changes; `make format` applies them)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/black --check --quiet . || { echo "error: black: files need formatting (run make format)"; exit 1; }

format: setup ## apply black and ruff's fixes
	$(VENV)/bin/ruff check --fix --quiet . || true
	$(VENV)/bin/black --quiet .

test-slow: setup data ## only the slow suites
	$(PY) -m pytest -m slow $(PYTEST_FLAGS)

# Every generated artifact (.gitignore's): server and soak logs, build/ (the backend and its sources, the images'
# wheelhouses, TLS files), the exported ONNX graphs and TensorRT plans, perf_analyzer's inputs and per-run files,
# caches, the editable install's egg-info. Kept: .venv, data/, models/ (the shipped model, and a training run's
# checkpoints/ and logs/ for --resume), .env (the keys of a compose stack that may be up) and the committed results.
clean: ## remove generated artifacts (keeps .venv, data, .env and models/)
	rm -rf logs build export/build .pytest_cache .ruff_cache *.egg-info
	rm -f $(REPO)/*/1/model.onnx $(REPO)/*/1/model.plan
	rm -f bench/results/*.tmp bench/results/perf_input*.json bench/results/perf_*_c*.csv bench/results/perf_*_c*.log
	find . \( -path ./$(VENV) -o -path ./data -o -path ./models \) -prune -o \
	  \( -name __pycache__ -o -name '*.plan' -o -name '*.engine' \) -prune -exec rm -rf {} +

# ---- docker compose. Needs Docker >= 20.10 and Compose v2 (`docker compose`); make installs no system packages.
# The slim stack (any Docker host, no GPU, no NGC registry): Triton 2.51 from the nvidia-pytriton wheel serving the
# python-backend models, and perf_analyzer from PyPI. The NGC services (`triton`, `triton-cpu`, `export-trt`,
# `perf`) are for GPU hosts with access to nvcr.io.
PERF_FLAGS ?= --streams 64 --prompt-length 64 --steps 256 --seed 0
PERF_K ?= 32
# bench/perf.sh's settings (docs/flags.md), each passed to the container (`run -e`) when set, so `make perf` and
# `make perf-slim` both honour them; unset, the compose service's default holds.
PERF_MODELS ?=
PERF_CONCURRENCY ?=
PERF_INTERVAL_MS ?=
PERF_MAX_TRIALS ?=
PERF_STABILITY ?=
PERF_PERCENTILE ?=
perf_env = $(if $(strip $(1)),-e '$(2)=$(strip $(1))')
PERF_ENV = $(call perf_env,$(PERF_MODELS),MODELS) $(call perf_env,$(PERF_CONCURRENCY),CONCURRENCY) \
           $(call perf_env,$(PERF_INTERVAL_MS),MEASUREMENT_INTERVAL_MS) \
           $(call perf_env,$(PERF_MAX_TRIALS),MAX_TRIALS) $(call perf_env,$(PERF_STABILITY),STABILITY) \
           $(call perf_env,$(PERF_PERCENTILE),PERCENTILE)
# Where perf-input writes and perf-slim's container reads and writes (mounted at /results). The NGC `perf`
# service mounts bench/results whatever this says, so `make perf` keeps bench/results.
PERF_RESULTS ?= bench/results
COMPOSE ?= docker compose
export HOST_UID := $(shell id -u)
export HOST_GID := $(shell id -g)

# docker compose reads .env: Triton's admin key for the restricted APIs and the HTTP inference key (clients read
# TRITON_INFER_KEY), random, each created once (gitignored, mode 600).
.env: FORCE
	@umask 077 && touch $@ && for key in TRITON_ADMIN_KEY TRITON_INFER_KEY; do \
	  grep -q "^$$key=" $@ || { printf '%s=%s\n' $$key "$$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" >> $@; \
	  echo "added a random $$key to .env (see docker-compose.yml)"; }; done
FORCE:

perf-input: data ## perf_analyzer input from the test split -> bench/results/perf_input.json, perf_input_gen.json
	$(PY) -m bench.perf_input --out $(PERF_RESULTS)/perf_input.json $(PERF_FLAGS)
	$(PY) -m bench.perf_input --out $(PERF_RESULTS)/perf_input_gen.json --chunk $(PERF_K) $(PERF_FLAGS)

compose-plan: .env ## GPU host: build model.plan in NVIDIA's TensorRT container (after make export)
	$(COMPOSE) --profile export run --rm export-trt

compose-up: .env ## GPU host: every model on the main ports, the stream model on the stream ports (waits until ready)
	$(COMPOSE) up -d --build --wait triton triton-stream

compose-up-cpu: .env ## CPU-only host (nvcr.io): the models that need no GPU, the stream model on the stream ports
	$(COMPOSE) up -d --build --wait triton-cpu triton-stream

compose-down: .env ## stop whatever compose services of the project are up (containers and network removed)
	$(COMPOSE) --profile cpu --profile export --profile perf --profile slim --profile perf-slim --profile scale --profile monitoring down --remove-orphans

perf: override PERF_RESULTS := bench/results
perf: $(ONNX) perf-input .env ## GPU host: perf_analyzer sweep in the SDK container -> bench/results/perf_<model>.csv
	$(COMPOSE) --profile perf run --rm $(PERF_ENV) perf

images: setup ## build the slim stack's images (host-made wheelhouse; base from Debian's archive if Docker Hub is unreachable)
	$(PY) -m serve.images

compose-up-slim: $(ONNX) .env ## Triton in Docker, no GPU/NGC: the CPU models on the main ports, the stream model on the stream ports
	$(PY) -m serve.images triton-slim
	$(COMPOSE) --profile slim up -d --wait triton-slim triton-slim-stream

# gRPC over TLS (docs/production.md): a CA and certificates of our own in build/tls/ (kept while valid), and the
# slim stack with docker-compose.tls.yml; TRITON_GRPC_TLS_MUTUAL=true adds mutual TLS (client certificates).
.PHONY: tls-certs compose-up-tls
tls-certs: setup ## self-signed CA, server and client certificates for gRPC over TLS -> build/tls/ (server.key for uid 1000)
	$(PY) -m serve.tls

compose-up-tls: $(ONNX) .env tls-certs ## the slim stack with gRPC over TLS (docker-compose.tls.yml): both gRPC ports take TLS only
	$(PY) -m serve.images triton-slim
	$(COMPOSE) -f docker-compose.yml -f docker-compose.tls.yml --profile slim up -d --wait triton-slim triton-slim-stream

# N replicas of triton-slim's server behind HAProxy (docs/scaling.md). The proxy takes triton-slim's host ports:
# run one of the two. Services are named: `--profile scale up` alone would also start the profile-less NGC ones.
N ?= 2
compose-up-scale: $(ONNX) .env ## N Triton replicas (N=2) behind HAProxy on the main HTTP and gRPC ports and the stats port; waits until all are UP
	$(PY) -m serve.images triton-slim proxy
	$(COMPOSE) --profile scale up -d --wait --scale triton-replica=$(N) proxy triton-replica
	$(PY) -c 'import sys; from serve.scale import wait_for_replicas; sys.exit(wait_for_replicas($(N)))'

# Prometheus next to whatever Triton servers run (after compose-up-slim or compose-up-scale): serve/monitoring/.
compose-up-monitoring: .env ## Prometheus on its port scraping every Triton server up, with alerting rules (docs/production.md)
	$(PY) -m serve.images prometheus
	$(COMPOSE) --profile monitoring up -d --wait prometheus

bench-scale: $(ONNX) ## chars/s of 64 sequences: one replica direct vs 1, 2, 3 behind the proxy (Docker) -> bench/results/scale.*
	$(PY) -m serve.images triton-slim proxy
	$(PY) -m bench.scale $(BENCH_SCALE_FLAGS)

# The slim server it measures needs the exported models and its image: built here, not left to an earlier target.
perf-slim: $(ONNX) perf-input .env ## perf_analyzer (container) vs our client against the slim stack -> bench/results/perf*
	$(PY) -m serve.images triton-slim perf-slim
	PERF_RESULTS=$(abspath $(PERF_RESULTS)) $(COMPOSE) --profile slim --profile perf-slim run --rm $(PERF_ENV) perf-slim
	$(PY) -m bench.perf_report --results $(PERF_RESULTS) --url 127.0.0.1:$${TRITON_GRPC_PORT:-$(GRPC_PORT)}
