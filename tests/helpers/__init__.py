"""Helpers of the test suite (everything that is not a fixture or a pytest hook: those stay in tests/conftest.py).
Test files import them from here: `from tests.helpers import ROOT, served, wait_for`.

- common: the checkout's paths (ROOT, the corpus, the shipped model, the committed repository), the test
  environment (no GPU, quiet TensorFlow), run(), read_json(), all_strings();
- models: the tiny model's training flags and train_tiny(), Exported (a tiny export of one cell), op_counts(),
  committed_text();
- reference: the TensorFlow reference texts (tiny_text, tf_text) and the generation graph's prompts and
  parameters (GEN_*, SEEDED, GREEDY), first_difference();
- waiting: wait_for(), the deadline-bounded wait (no fixed sleeps);
- servers: local Triton servers (start, kill, restart, their logs and counts);
- clients: served() (the client library's complete()), chunked(), the client command line, RawStream (raw
  requests on one gRPC stream);
- docker: Docker compose projects (docker_or_skip, ComposeStack).

(A package of tests/, imported as `tests.helpers` like the test files import each other: `tests` is a namespace
package here, shared with a `tests` folder that tf2onnx installs, which has no `helpers`.)
"""

from tests.helpers.clients import (
    RawStream,
    chunked,
    client_cmd,
    ids_of,
    run_client_on,
    served,
)
from tests.helpers.common import (
    COMMITTED_REPO,
    CORPUS,
    PY,
    ROOT,
    SHIPPED_MODEL,
    all_strings,
    read_json,
    run,
)
from tests.helpers.docker import REQUIRE_DOCKER, ComposeStack, docker_or_skip
from tests.helpers.models import (
    TINY_FLAGS,
    TINY_OTHER_CELL,
    Exported,
    committed_text,
    export_model,
    op_counts,
    train_tiny,
)
from tests.helpers.reference import (
    GEN_LENGTH,
    GEN_PROMPTS,
    GREEDY,
    LONG_PROMPT,
    SEEDED,
    first_difference,
    tf_text,
    tiny_text,
)
from tests.helpers.servers import (
    EVICTED,
    SHORT_IDLE_US,
    ensure_up,
    evictions,
    group_pids,
    inference_count,
    kill_server,
    log_size,
    log_text,
    restart_later,
    start_server,
    with_idle_timeout,
)
from tests.helpers.waiting import wait_for

__all__ = [
    "COMMITTED_REPO",
    "CORPUS",
    "EVICTED",
    "GEN_LENGTH",
    "GEN_PROMPTS",
    "GREEDY",
    "LONG_PROMPT",
    "PY",
    "REQUIRE_DOCKER",
    "ROOT",
    "SEEDED",
    "SHIPPED_MODEL",
    "SHORT_IDLE_US",
    "TINY_FLAGS",
    "TINY_OTHER_CELL",
    "ComposeStack",
    "Exported",
    "RawStream",
    "all_strings",
    "chunked",
    "client_cmd",
    "committed_text",
    "docker_or_skip",
    "ensure_up",
    "evictions",
    "export_model",
    "first_difference",
    "group_pids",
    "ids_of",
    "inference_count",
    "kill_server",
    "log_size",
    "log_text",
    "op_counts",
    "read_json",
    "restart_later",
    "run",
    "run_client_on",
    "served",
    "start_server",
    "tf_text",
    "tiny_text",
    "train_tiny",
    "wait_for",
    "with_idle_timeout",
]
