"""Per-sequence recurrent state for python-backend models, which get no implicit state from Triton.

`SequenceStates` keeps each live sequence's packed state (S, L, H) keyed by correlation id, gathers a
batch of them for one model call, scatters the new states back, frees a sequence on END, and evicts
sequences idle longer than the sequence batcher's max_sequence_idle_microseconds (Triton frees the
slot then but does not tell the model). `load_stateful_model` is what every python-backend model's
initialize() checks and loads: its config (batching, oldest sequence batcher, idle timeout, ORT threads)
and its model.onnx, opened with ONNX Runtime and checked against the tensors the model needs.
`SequenceStates` also counts what happens to sequences (`stats()`) and reports every change to an `on_change`
hook; `MetricsSink` turns those changes (and the model's character counts) into increments of the custom
metrics in `METRICS`, which `create_metrics` makes with the model's pb_utils (docs/production.md, "Metrics").
Free of Triton's pb_utils (errors are ValueError, which the models turn into TritonModelException), so the
python backend's model.py files (and serve.runtime.gen_model) drive it and the tests can call it directly.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from charrnn.contract import INPUTS, LIVE_ID_MESSAGE, OUTPUTS, ErrorCode, tensors
from charrnn.onnx_runtime import ort_session

START, END = 1, 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END


def check_ids(ids: np.ndarray, vocab_size: int, max_t: int, name: str = "INPUT_IDS") -> str | None:
    """None if `ids` is a valid (1, T) int32 request tensor, else the error message."""
    if ids.dtype != np.int32:
        return f"{name}: dtype must be INT32, got {ids.dtype}"
    if ids.ndim != 2 or ids.shape[0] != 1 or not 1 <= ids.shape[1] <= max_t:
        return f"{name}: shape must be [1, T] with 1 <= T <= {max_t}, got {list(ids.shape)} (send long prompts in chunks)"
    if ids.min() < 0 or ids.max() >= vocab_size:
        # Triton 2.51 casts HTTP JSON integers to INT32 by truncation (http_server.cc): 2^63-1 arrives as -1 and
        # 2^32 + 30 as 30, which no check here can tell from a real 30 (docs/failures.md).
        hint = (
            " (an HTTP JSON value outside the INT32 range arrives wrapped)" if ids.min() < 0 else ""
        )
        return f"{name}: ids must be in 0..{vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}{hint}"
    return None


# The custom metrics of the python-backend models, labelled model="<model name>" (model.py creates them with
# pb_utils.MetricFamily / Metric; docs/production.md "Metrics"): (name, kind, help, the MetricsSink key feeding it).
METRICS = (
    (
        "charrnn_live_sequences",
        "GAUGE",
        "Sequences holding state in the model now (started, not yet ended or evicted)",
        "live",
    ),
    (
        "charrnn_sequences_started_total",
        "COUNTER",
        "Requests flagged sequence_start that the model ran",
        "started",
    ),
    (
        "charrnn_sequences_evicted_total",
        "COUNTER",
        "Sequences freed because they were idle longer than max_sequence_idle_microseconds (+1 s), without an END",
        "evicted",
    ),
    (
        "charrnn_characters_generated_total",
        "COUNTER",
        "Characters the model returned: one per successful request of a step model (LOGITS for one character), "
        "K per successful request of a generation model (OUTPUT_IDS)",
        "characters",
    ),
)


class SequenceStates:
    """Packed states by correlation id. Counters (`stats()`): live, started, ended, evicted; every change is
    reported to `on_change({"live": d, "started": d, "ended": d, "evicted": d})` (non-zero deltas only) from the
    thread that made it: execute()'s (scatter, with `lock` held by the caller) or the reaper's (lock released).
    """

    def __init__(
        self,
        state_dims: tuple[int, ...],
        idle_seconds: float,
        log: Callable[[str], None] = print,
        on_change: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.zero = np.zeros(state_dims, np.float32)
        # Evict a little after Triton frees the slot, never before (a request Triton accepts must find its state).
        self.idle_s = idle_seconds + 1.0
        self.states: dict[object, np.ndarray] = {}  # correlation id -> (S, L, H)
        self.last_used: dict[object, float] = {}  # correlation id -> time.monotonic()
        self.lock = threading.Lock()
        self.started = 0  # requests flagged START that ran (scatter)
        self.ended = 0  # sequences freed by END
        self.evicted = 0  # sequences freed by the idle timeout
        self._log = log
        self._on_change = on_change
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="sequence-reaper", daemon=True)
        self._reaper.start()

    def __len__(self) -> int:
        return len(self.states)

    def stats(self) -> dict[str, int]:
        """live: sequences holding state now; started / ended / evicted: totals since this store was created."""
        with self.lock:
            return {
                "live": len(self.states),
                "started": self.started,
                "ended": self.ended,
                "evicted": self.evicted,
            }

    def _report(self, delta: dict[str, int]) -> None:
        delta = {k: v for k, v in delta.items() if v}
        if delta and self._on_change is not None:
            self._on_change(delta)

    def check(self, corr, flags: int) -> tuple[ErrorCode, str] | None:
        """None if a request with this correlation id and flags can run, else (its error code, the message):
        the model answers charrnn.contract.server_error(code, message, corr)."""
        if corr in (0, ""):
            return (
                ErrorCode.SEQUENCE_ID_MISSING,
                "sequence id: missing (this model is stateful: send sequence_id, sequence_start, sequence_end)",
            )
        if not flags & START and corr not in self.states:
            return ErrorCode.UNKNOWN_SEQUENCE, (
                f"unknown sequence (never started, ended, or idle longer than {self.idle_s - 1.0:g} s) "
                "(start it again with sequence_start=True)"
            )
        if flags & START and corr in self.states and not self._idle(corr):
            # Another client's id (ids are the only identity), or one never ended: resetting it would silently
            # change its owner's text. An id idle past Triton's timeout (Triton freed its slot) may start again.
            return ErrorCode.SEQUENCE_ID_IN_USE, (
                f"{LIVE_ID_MESSAGE} (draw sequence ids at random; end a sequence with sequence_end "
                "before starting its id again)"
            )
        return None

    def _idle(self, corr) -> bool:
        """Idle longer than the sequence batcher's timeout (Triton has freed its slot; the reaper comes later)."""
        return time.monotonic() - self.last_used[corr] >= self.idle_s - 1.0

    def gather(self, members: list[tuple[object, int]]) -> np.ndarray:
        """States of [(corr, flags), ...] as one (B, S, L, H) batch; zeros for sequence starts."""
        return np.stack(
            [self.zero if flags & START else self.states[corr] for corr, flags in members]
        )

    def scatter(self, members: list[tuple[object, int]], new_state: np.ndarray) -> None:
        """Keep row b of new_state (B, S, L, H) for member b; free the sequences that END. Caller holds lock."""
        now = time.monotonic()
        live, started, ended = len(self.states), 0, 0
        for row, (corr, flags) in enumerate(members):
            started += bool(flags & START)
            if flags & END:
                # START|END: one request, never held
                ended += self.states.pop(corr, None) is not None
                self.last_used.pop(corr, None)
            else:
                self.states[corr] = new_state[row].copy()  # own memory: no view pins the batch
                self.last_used[corr] = now
        self.started += started
        self.ended += ended
        self._report({"live": len(self.states) - live, "started": started, "ended": ended})

    def evict_idle(self) -> int:
        """Free the sequences idle longer than idle_s (the reaper's pass; one clock read); returns how many."""
        cutoff = time.monotonic() - self.idle_s
        with self.lock:
            idle = [c for c, t in self.last_used.items() if t < cutoff]
            for c in idle:
                self.states.pop(c, None)
                self.last_used.pop(c, None)
            self.evicted += len(idle)
            live = len(self.states)
        if idle:
            self._log(f"evicted {len(idle)} idle sequence(s); {live} live")
            self._report({"live": -len(idle), "evicted": len(idle)})
        return len(idle)

    def _reap(self) -> None:
        period = min(max(self.idle_s / 4, 0.05), 5.0)
        while not self._stopping.wait(period):
            try:
                self.evict_idle()
            except Exception as e:  # e.g. the metrics hook failing: keep evicting
                self._log(f"sequence reaper: {type(e).__name__}: {e}")

    def close(self) -> None:
        """Stop the reaper and drop every state (the model unloads: the live sequences are reported gone)."""
        self._stopping.set()
        self._reaper.join(timeout=5)
        with self.lock:
            live = len(self.states)
            self.states.clear()
            self.last_used.clear()
        self._report({"live": -live})


class MetricsSink:
    """Feeds the custom metrics: `sink(delta)` increments metric[key] by delta[key] for the keys of METRICS
    ("live", "started", "evicted", "characters"; others, e.g. "ended", are ignored). Pass it as SequenceStates'
    on_change and call it with {"characters": n} after answering requests.

    `metrics` maps a key to anything with increment(value): in Triton a pb_utils.Metric (a GAUGE takes negative
    increments). Only deltas are sent, never set(): instances of one model that share a series (same name and
    labels) add up. Calls are serialised (execute() and the reaper thread both report); a metric that fails is
    logged once and then skipped."""

    def __init__(
        self, metrics: dict[str, object] | None = None, log: Callable[[str], None] = print
    ) -> None:
        self.metrics = dict(metrics or {})
        self._log = log
        self._lock = threading.Lock()

    def __call__(self, delta: dict[str, int]) -> None:
        with self._lock:
            for key, value in delta.items():
                metric = self.metrics.get(key)
                if metric is None or not value:
                    continue
                try:
                    metric.increment(float(value))
                except Exception as e:
                    self.metrics.pop(key)
                    self._log(f"metric {key!r} disabled: {type(e).__name__}: {e}")

    def close(self) -> None:
        """Drop the metric objects (before their families: Triton wants a family deleted after its metrics)."""
        with self._lock:
            self.metrics.clear()


def create_metrics(pb_utils, model_name: str) -> tuple[list, MetricsSink]:
    """(the MetricFamily objects, a MetricsSink of their Metric labelled model=<name>) for a python-backend model;
    `pb_utils` is the triton_python_backend_utils module the model imported (this module stays free of Triton).
    No metrics, one log line, if this Triton's python backend has no custom metrics API (or the server was built
    without metrics)."""
    log = pb_utils.Logger.log_warn
    families, metrics = [], {}
    try:
        for name, kind, description, key in METRICS:
            family = pb_utils.MetricFamily(
                name=name, description=description, kind=getattr(pb_utils.MetricFamily, kind)
            )
            families.append(family)
            metrics[key] = family.Metric(labels={"model": model_name})
    # AttributeError: no pb_utils.MetricFamily; the server's "metrics not supported"
    except Exception as e:
        log(
            f"{model_name}: custom metrics unavailable, serving without them ({type(e).__name__}: {e})"
        )
        metrics.clear()
    return families, MetricsSink(metrics, log)


@dataclass
class StatefulModel:
    """What a python-backend model's initialize() gets from load_stateful_model."""

    config: dict  # the model's config, as Triton passes it (JSON)
    session: object  # onnxruntime.InferenceSession of <version>/model.onnx
    io: dict  # tensor name -> onnxruntime NodeArg (inputs and outputs)
    idle_seconds: float  # the sequence batcher's max_sequence_idle_microseconds
    threads: int  # ONNX Runtime intra-op threads (config parameter intra_op_threads)


def graph_types(graph: str) -> dict[str, str]:
    """{name: ONNX Runtime type} of every input and output of `graph` (charrnn.contract's table): what
    load_stateful_model checks a model.onnx against."""
    return {t.name: t.ort_type for kind in (INPUTS, OUTPUTS) for t in tensors(graph, kind)}


def load_stateful_model(args: dict, tensors: dict[str, str]) -> StatefulModel:
    """Check the config Triton passes to initialize(args) and open <version>/model.onnx with ONNX Runtime;
    `tensors` {name: ORT type, e.g. "tensor(int32)"} must all be in the graph. ValueError("<model> requires X,
    got Y") on anything else."""
    config = json.loads(args["model_config"])
    name = args["model_name"]
    max_batch_size = int(config.get("max_batch_size", 0))
    if max_batch_size < 1:
        raise ValueError(f"{name} requires max_batch_size >= 1, got {max_batch_size}")
    seq = config.get("sequence_batching")
    if not seq:
        raise ValueError(f"{name} requires sequence_batching, got none")
    if "direct" in seq:
        raise ValueError(
            f"{name} requires the oldest strategy, got direct (direct pads batches with null requests)"
        )
    idle_us = int(seq.get("max_sequence_idle_microseconds") or 1_000_000)  # Triton's default: 1 s
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    threads = params.get("intra_op_threads", "1")
    if not (threads.isascii() and threads.isdigit()) or int(threads) < 1:
        raise ValueError(
            f"{name} requires parameter intra_op_threads to be an integer >= 1, got {threads!r}"
        )
    threads = int(threads)

    onnx_path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
    if not onnx_path.is_file():
        raise ValueError(f"{name} requires {onnx_path}, got no such file (run `make export`)")
    session = ort_session(onnx_path, threads)
    io = {t.name: t for t in session.get_inputs() + session.get_outputs()}
    for tensor, dtype in tensors.items():
        if tensor not in io or io[tensor].type != dtype:
            raise ValueError(
                f"{name} requires ONNX {tensor} {dtype}, got "
                f"{io[tensor].type if tensor in io else 'no such tensor'}"
            )
    return StatefulModel(config, session, io, idle_us / 1e6, threads)
