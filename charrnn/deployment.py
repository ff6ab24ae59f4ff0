"""The deployment spec: every fact of the serving side written once (ports, which server runs which models,
tritonserver's flags, image names and tags). The models themselves are charrnn/repository.py's table.

`make generate` (python -m serve.generate) writes the deployment files from this table and serve/templates/:
the tritonserver entrypoint (serve/tritonserver.sh) that the local launcher, both images, compose and k8s run,
docker-compose.yml, both haproxy.cfg, the k8s manifests, Prometheus' scrape config and the Makefile's
variables. Each says "generated - do not edit"; tests/test_generated.py fails while one is not current.
Python code (the client's defaults, the local launcher, the benchmarks) imports the values from here.

    python -m serve.generate            # after editing this file
    python -m serve.generate --check    # exit 1 if a generated file is stale
"""

from __future__ import annotations

from dataclasses import dataclass

from charrnn.contract import INFER_KEY_HEADER
from charrnn.repository import CPU_CONFIG_NAME, DECOUPLED_MODELS, SHARED_CPU_MODELS, names


@dataclass(frozen=True)
class Ports:
    http: int  # HTTP/REST (KServe v2): health, metadata, inference with the inference key
    grpc: int  # gRPC: the streaming client, perf_analyzer
    metrics: int  # Prometheus metrics


@dataclass(frozen=True)
class Server:
    """One tritonserver process and the models it loads. Triton 2.51 crashes when decoupled and non-decoupled
    models stream on one server (docs/failures.md), so the decoupled model has a server of its own.
    """

    name: str
    ports: Ports  # on 127.0.0.1 of the host: the local launcher's, and what compose publishes
    env: str  # compose reads the host ports from ${<env>_HTTP_PORT} etc.


# Every port the project publishes is on this address (compose, the local launcher): reach them from elsewhere
# through a reverse proxy with TLS (docs/production.md).
LOOPBACK = "127.0.0.1"


class LoopbackUrls:
    """grpc_url and http_url of a server on LOOPBACK at its `grpc_port` and `http_port` (the local launcher's
    servers, the tests' compose stacks)."""

    http_port: int
    grpc_port: int

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"


MAIN = Server("main", Ports(http=8000, grpc=8001, metrics=8002), env="TRITON")
STREAM = Server("stream", Ports(http=8010, grpc=8011, metrics=8012), env="TRITON_STREAM")
SERVERS = (MAIN, STREAM)
# Inside every container a server listens on the main server's ports (Triton's defaults); compose maps the
# stream server's host ports onto them.
CONTAINER_PORTS = MAIN.ports
# The scale profile's proxy (serve/haproxy.cfg) publishes the main ports plus its statistics; Prometheus its UI.
PROXY_STATS_PORT = 8404
PROMETHEUS_PORT = 9090
# HAProxy's server-template slots: the most replicas the proxy can route to (`make compose-up-scale N=...`).
REPLICA_SLOTS = 8
# The proxy's backends, one per protocol: each lists every replica (serve/scale.py reads their table).
PROXY_BACKENDS = {"http": "triton_http", "grpc": "triton_grpc"}


@dataclass(frozen=True)
class Deployment:
    """A compose service (or k8s Deployment) running tritonserver: its server, image and models."""

    service: str
    server: Server
    image: str  # a key of IMAGES
    models: tuple[str, ...]


# --- images -----------------------------------------------------------------------------------------------------
TRITON_VERSION = "2.51.0"  # the nvidia-pytriton 0.7.0 wheel's server = NGC release 24.10's
# every NGC image (server, SDK, TensorRT); compose's ${TRITON_RELEASE} overrides it
NGC_RELEASE = "24.10"


@dataclass(frozen=True)
class Image:
    name: str
    tag: str

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


IMAGES = {
    # Triton 2.51 from the nvidia-pytriton wheel, python backend + ONNX Runtime backend built from source
    "slim": Image("charrnn-tritonserver-slim", TRITON_VERSION),
    # NVIDIA's server image + our runtime (serve/Dockerfile; a GPU host with nvcr.io access)
    "ngc": Image("charrnn-tritonserver", f"${{TRITON_RELEASE:-{NGC_RELEASE}}}"),
    "proxy": Image("charrnn-haproxy", "2.6-bookworm"),  # Debian 12's HAProxy 2.6
    "prometheus": Image("charrnn-prometheus", "2.42-bookworm"),  # Debian 12's Prometheus 2.42
}

DEPLOYMENTS = (
    Deployment("triton", MAIN, "ngc", names(decoupled=False)),  # GPU host: TensorRT too
    Deployment("triton-cpu", MAIN, "ngc", names(gpu_only=False, decoupled=False)),
    Deployment("triton-stream", STREAM, "ngc", DECOUPLED_MODELS),
    Deployment("triton-slim", MAIN, "slim", SHARED_CPU_MODELS),
    Deployment("triton-slim-stream", STREAM, "slim", DECOUPLED_MODELS),
    Deployment(
        "triton-replica", MAIN, "slim", SHARED_CPU_MODELS
    ),  # the scale profile, behind the proxy
)
BY_SERVICE = {d.service: d for d in DEPLOYMENTS}

# --- tritonserver -----------------------------------------------------------------------------------------------
# The keys come from the environment (compose's .env, the k8s Secret, the local launcher's run directory):
# a default written here would be public.
ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"
ADMIN_HEADER = "admin-key"
# Admin API categories: they need the admin key header. Health, metadata, model-config, statistics and gRPC
# inference stay open: clients and perf_analyzer need them.
RESTRICTED_APIS = "model-repository,shared-memory,logging,trace"
# On SIGTERM Triton stops taking new sequences and waits this long for requests in flight; compose's
# stop_grace_period and k8s' terminationGracePeriodSeconds are longer, so neither kills it first. The local
# launcher (a developer's Ctrl-C, the tests) waits less.
EXIT_TIMEOUT_S = 30
LOCAL_EXIT_TIMEOUT_S = 5
GRPC_ALLOCATION_POOL = 1024
# The flags every server of the project runs with, each with the reason it is there (the entrypoint's comments).
# $VARS are read by the entrypoint from its environment ($admin_key, $infer_key: the keys, which it takes out of
# the environment that the python backend's stubs would inherit).
TRITONSERVER_FLAGS: tuple[tuple[str, str], ...] = (
    ('--model-repository="${TRITON_MODEL_REPOSITORY:-/models}"', "the models this server loads"),
    (
        "--model-control-mode=none",
        "load what is in the repository at start and never change it at run time: loading through the "
        'API or by polling "can lead to arbitrary code execution" (Triton deploy guide)',
    ),
    ("--strict-readiness=true", "/v2/health/ready turns 200 only once every model has loaded"),
    (
        f'--exit-timeout-secs="${{TRITON_EXIT_TIMEOUT_S:-{EXIT_TIMEOUT_S}}}"',
        "on SIGTERM, wait this long for requests in flight",
    ),
    (
        f"--grpc-infer-allocation-pool-size={GRPC_ALLOCATION_POOL}",
        "at least one gRPC request object per request in flight: the default crashes 2.51 past ~32 "
        "streaming sequences (docs/failures.md, allocation pool)",
    ),
    (
        f'--http-address="$TRITON_ADDRESS" --http-port={CONTAINER_PORTS.http}',
        "every endpoint on TRITON_ADDRESS, at the container ports (the local launcher appends its own ports)",
    ),
    (f'--grpc-address="$TRITON_ADDRESS" --grpc-port={CONTAINER_PORTS.grpc}', ""),
    (f'--metrics-address="$TRITON_ADDRESS" --metrics-port={CONTAINER_PORTS.metrics}', ""),
    (
        f'--http-restricted-api={RESTRICTED_APIS}:{ADMIN_HEADER}="$admin_key"',
        "admin categories need the admin key header",
    ),
    (f'--grpc-restricted-protocol={RESTRICTED_APIS}:{ADMIN_HEADER}="$admin_key"', ""),
    (
        f'--http-restricted-api=inference:{INFER_KEY_HEADER}="$infer_key"',
        "HTTP inference needs the inference key: 2.51 sizes a JSON input from its declared shape "
        "before reading the data, and one request declaring [1, 2**40] aborts the server; this check "
        "runs first",
    ),
    (
        '${TRITON_MODEL_CONFIG_NAME:+--model-config-name="$TRITON_MODEL_CONFIG_NAME"}',
        f"with TRITON_MODEL_CONFIG_NAME={CPU_CONFIG_NAME} (CPU-only servers) the ONNX Runtime models "
        f"load configs/{CPU_CONFIG_NAME}.pbtxt (KIND_CPU) instead of config.pbtxt (KIND_AUTO)",
    ),
)
# Where images install the entrypoint (on PATH), and its name there.
ENTRYPOINT = "charrnn-tritonserver"
ENTRYPOINT_SOURCE = "serve/tritonserver.sh"
