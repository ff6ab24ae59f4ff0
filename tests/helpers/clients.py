"""What the server tests drive servers with: served() (the client library's complete()), chunked(), the client
command line, and RawStream (raw requests on one gRPC stream)."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading

import numpy as np
import pytest

from charrnn.repository import PYTHON
from tests.helpers.common import ROOT
from tests.helpers.reference import GEN_LENGTH


def served(server, prompts, length, params, protocol="grpc", model=None, sequences=False, **kw):
    """Texts of the client library's complete() through `server` (anything with grpc_url / http_url /
    infer_key). model: None picks the first ready one, as the client does; kw: chunk, sequence_ids, retry,
    on_text, on_retry. sequences=True returns (texts, the client's Sequence objects)."""
    from client.connection import Connection
    from client.generate import complete

    conn = Connection(
        server.grpc_url if protocol == "grpc" else server.http_url,
        protocol,
        infer_key=server.infer_key,
    )
    try:
        model = conn.pick_model(None) if model is None else model
        vocab = conn.vocabulary(model)
        seqs = complete(conn, model, vocab, prompts, length, params, **kw)
    finally:
        conn.close()
    texts = [vocab.decode(s.generated) for s in seqs]
    return (texts, seqs) if sequences else texts


def chunked(server, model, prompts, params, chunk, length=GEN_LENGTH, on_text=None):
    from client.connection import Connection
    from client.generate import complete

    conn = Connection(server.grpc_url)
    try:
        vocab = conn.vocabulary(model)
        seqs = complete(
            conn, model, vocab, list(prompts), length, list(params), chunk=chunk, on_text=on_text
        )
    finally:
        conn.close()
    return [s.generated for s in seqs], seqs


def client_cmd(server, *args) -> list[str]:
    return [sys.executable, "-m", "client", "--url", server.grpc_url, "--model", PYTHON, *args]


def run_client_on(server, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m client --url <server> --model charrnn_python <args>`."""
    return subprocess.run(
        client_cmd(server, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# --- raw requests on one gRPC stream ------------------------------------------------------------------
class RawStream:
    """tritonclient requests on ONE stream; successes are routed by request id, errors (which carry no id
    on a stream) go to `errors`. Thread-safe sends: async_stream_infer only enqueues."""

    def __init__(self, url: str, model: str = PYTHON) -> None:
        import tritonclient.grpc as tc

        self.tc, self.model = tc, model
        self.client = tc.InferenceServerClient(url)
        self.results: dict[str, queue.Queue] = {}
        self.errors: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.client.start_stream(callback=self._callback)

    def _callback(self, result, error) -> None:
        if error is not None:
            self.errors.put(str(error))
            return
        rid = result.get_response().id
        with self.lock:
            q = self.results.setdefault(rid.split("/")[0], queue.Queue())
        q.put((rid, result.as_numpy("LOGITS")[0]))

    def send(self, rid: str, ids, seq: int, start=False, end=False, dtype="INT32") -> None:
        array = ids if isinstance(ids, np.ndarray) else np.asarray(ids, np.int32)
        inp = self.tc.InferInput("INPUT_IDS", list(array.shape), dtype)
        inp.set_data_from_numpy(array)
        self.client.async_stream_infer(
            self.model,
            [inp],
            request_id=rid,
            sequence_id=seq,
            sequence_start=start,
            sequence_end=end,
        )

    def logits(self, route: str, timeout=60.0) -> np.ndarray:
        with self.lock:
            q = self.results.setdefault(route, queue.Queue())
        try:
            return q.get(timeout=timeout)[1]
        except queue.Empty:
            pytest.fail(
                f"no result for {route} after {timeout:.0f} s; errors: {list(self.errors.queue)}"
            )

    def error(self, timeout=60.0) -> str:
        try:
            return self.errors.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no error response after {timeout:.0f} s")

    def close(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def ids_of(server, text: str) -> np.ndarray:
    from client.connection import Connection

    conn = Connection(server.grpc_url)
    try:
        return conn.vocabulary(PYTHON).encode(text).reshape(1, -1).astype(np.int32)
    finally:
        conn.close()
