"""Talking to Triton: connect, pick a model, read its vocabulary, and send sequence requests.

`Connection` hides the two protocols behind one call, `send(request_id, ids, sequence_id, start, end)`,
whose results arrive on `results` (a queue of (request_id, logits (V,) or None, error or None, seconds)).
gRPC uses ONE bidirectional stream for every sequence (what the sequence batcher batches across);
HTTP has no streaming and tritonclient.http (gevent) is not thread-safe, so `send` runs the request
synchronously and queues its result: sequences then take turns, one request at a time.
"""

from __future__ import annotations

import os
import queue
import time

import numpy as np

from charrnn.contract import INFER_KEY_ENV, INFER_KEY_HEADER, INPUT_IDS, LOGITS, VOCAB_PARAMETER
from charrnn.errors import UnavailableError, UserError
from charrnn.vocab import Vocab

MODEL_PREFERENCE = ("charrnn_trt", "charrnn_onnx", "charrnn_python")


class Connection:
    def __init__(self, url: str, protocol: str = "grpc", timeout: float = 10.0, infer_key: str | None = None) -> None:
        """infer_key: the server's HTTP inference key (default $TRITON_INFER_KEY); gRPC needs none."""
        if protocol not in ("grpc", "http"):
            raise UserError("--protocol", f"must be grpc or http, got {protocol!r}")
        if not url or "/" in url.split("://")[-1] or ":" not in url.split("://")[-1]:
            raise UserError("--url", f"expected host:port, got {url!r}", "e.g. 127.0.0.1:8001 for gRPC")
        self.url, self.protocol, self.timeout = url.split("://")[-1], protocol, timeout
        key = infer_key if infer_key is not None else os.environ.get(INFER_KEY_ENV)
        self.headers = {INFER_KEY_HEADER: key} if key and protocol == "http" else None
        self.results: queue.Queue = queue.Queue()
        self._sent: dict[str, float] = {}
        self._stream = False
        self._open()

    def _open(self) -> None:
        """Create the tritonclient client and check the server is live (UnavailableError if not)."""
        protocol, timeout = self.protocol, self.timeout
        try:
            if protocol == "grpc":
                import tritonclient.grpc as tc

                self.client = tc.InferenceServerClient(self.url)
            else:
                import tritonclient.http as tc

                self.client = tc.InferenceServerClient(self.url, connection_timeout=timeout,
                                                       network_timeout=timeout)
            self.tc = tc
            live = self.client.is_server_live()
        except Exception as e:  # tritonclient raises InferenceServerException, gRPC/geventhttp errors, ...
            raise UnavailableError(f"server {self.url}", f"unreachable over {protocol} ({_short(e)})",
                                   "start it with `make serve`, or pass --url/--protocol") from e
        if not live:
            raise UnavailableError(f"server {self.url}", "not live", "check the server log")

    def reopen(self) -> None:
        """Connect again from scratch (after the server went away): a new client and, on first send, a new
        stream. Results still in flight on the old connection are dropped (`results` is a new queue).
        Raises UnavailableError while the server is not reachable."""
        self.abort()
        self.results = queue.Queue()
        self._sent = {}
        self._open()

    def abort(self) -> None:
        """Close without waiting for requests in flight (close() waits for them on a live stream)."""
        try:
            if self._stream:
                self.client.stop_stream(cancel_requests=True)
        except Exception:
            pass
        self._stream = False
        try:
            self.client.close()
        except Exception:
            pass

    # --- model and vocabulary ---------------------------------------------------------------------
    def pick_model(self, requested: str | None) -> str:
        """The requested model if ready, else the first ready of MODEL_PREFERENCE."""
        candidates = [requested] if requested else list(MODEL_PREFERENCE)
        for name in candidates:
            try:
                if self.client.is_model_ready(name):
                    return name
            except Exception:  # a model that does not exist answers with an error
                continue
        what = f"model {requested}" if requested else "models " + ", ".join(MODEL_PREFERENCE)
        raise UnavailableError(what, f"not ready on {self.url}", "check `make serve` / the server log, or --model")

    def vocabulary(self, model: str) -> Vocab:
        config = self.client.get_model_config(model, as_json=True) if self.protocol == "grpc" else \
            self.client.get_model_config(model)
        config = config.get("config", config)
        try:
            return Vocab.from_json(config["parameters"][VOCAB_PARAMETER]["string_value"])
        except KeyError as e:
            raise UnavailableError(f"model {model}", f"its config has no {VOCAB_PARAMETER} parameter",
                                   "export it with `make export`") from e

    # --- requests ---------------------------------------------------------------------------------
    def _inputs(self, ids: np.ndarray):
        inp = self.tc.InferInput(INPUT_IDS, [1, len(ids)], "INT32")
        inp.set_data_from_numpy(np.asarray(ids, np.int32).reshape(1, -1))
        return [inp]

    def _on_result(self, request_id: str, result, error) -> None:
        seconds = time.perf_counter() - self._sent.pop(request_id, time.perf_counter())
        if error is not None:
            self.results.put((request_id, None, error, seconds))
        else:
            self.results.put((request_id, result.as_numpy(LOGITS)[0], None, seconds))

    def _stream_callback(self, result, error) -> None:
        request_id = result.get_response().id if result is not None else None
        if request_id is None and error is not None:  # gRPC errors carry no id: find it in the message
            request_id = _request_id_from(error, self._sent)
        self._on_result(request_id, result, error)

    def send(self, request_id: str, ids: np.ndarray, model: str, sequence_id: int, start: bool, end: bool) -> None:
        self._sent[request_id] = time.perf_counter()
        if self.protocol == "grpc":
            if not self._stream:
                results = self.results  # a stream's late callbacks never reach a reopened connection's queue
                self.client.start_stream(callback=lambda result, error: self._stream_callback(result, error)
                                         if self.results is results else None)
                self._stream = True
            self.client.async_stream_infer(model, self._inputs(ids), request_id=request_id,
                                           sequence_id=sequence_id, sequence_start=start, sequence_end=end)
        else:
            try:
                r = self.client.infer(model, self._inputs(ids), request_id=request_id, sequence_id=sequence_id,
                                      sequence_start=start, sequence_end=end, headers=self.headers)
                self._on_result(request_id, r, None)
            except Exception as e:  # tritonclient.utils.InferenceServerException, connection errors
                if "restricted" in str(e):  # no key, or a wrong one: nothing a retry can fix
                    raise infer_key_error(e) from e
                self._on_result(request_id, None, e)

    def close(self) -> None:
        try:
            if self._stream:
                self.client.stop_stream()
                self._stream = False
            self.client.close()
        except Exception:
            pass


def infer_key_error(e: Exception) -> UserError:
    have = "a wrong key" if os.environ.get(INFER_KEY_ENV) else "no key"
    return UserError("--protocol http", f"the server refused HTTP inference with {have} ({_short(e)})",
                     f"set {INFER_KEY_ENV} to the server's key: `export {INFER_KEY_ENV}=$(cat logs/serve/infer-key)` "
                     "for `make serve`, or the value in .env for compose; or use gRPC, which needs none")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def _request_id_from(error, pending: dict[str, float]) -> str | None:
    """gRPC stream errors have no response id; with one request per sequence in flight, match the text."""
    text = str(error)
    matches = [rid for rid in pending if f"sequence {rid.split(':')[0]}" in text]
    if len(matches) == 1:
        return matches[0]
    return next(iter(pending)) if len(pending) == 1 else None  # None: cannot tell which sequence failed
