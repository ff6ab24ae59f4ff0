"""Talking to Triton: connect, pick a model, read its vocabulary, and send sequence requests.

`Connection` hides the two protocols behind one call, `send(request_id, model, inputs, sequence_id, start,
end)`, whose answers arrive on `results`: a queue of (request_id or None, tritonclient InferResult or None,
error or None, arrival time). A decoupled model answers one request with several results.
gRPC uses ONE bidirectional stream for every sequence (what the sequence batcher batches across); its errors
carry no request id (None). HTTP has no streaming and tritonclient.http (gevent) is not thread-safe, so `send`
runs the request synchronously and queues its result: sequences then take turns, one request at a time.
"""

from __future__ import annotations

import os
import queue
import time

import numpy as np

from charrnn.contract import INFER_KEY_ENV, INFER_KEY_HEADER, NOISE, TRITON_DTYPE
from charrnn.errors import UnavailableError, UserError
from charrnn.repository import GEN, STEP, names, vocab_of
from charrnn.vocab import Vocab


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
            raise UnavailableError(f"server {self.url}", f"unreachable over {protocol} ({short(e)})",
                                   "start it with `make serve`, or pass --url/--protocol") from e
        if not live:
            raise UnavailableError(f"server {self.url}", "not live", "check the server log")

    def reopen(self) -> None:
        """Connect again from scratch (after the server went away): a new client and, on first send, a new
        stream. Results still in flight on the old connection are dropped (`results` is a new queue).
        Raises UnavailableError while the server is not reachable."""
        self.abort()
        self.results = queue.Queue()
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

    def close(self) -> None:
        try:
            if self._stream:
                self.client.stop_stream()
                self._stream = False
            self.client.close()
        except Exception:
            pass

    # --- model and vocabulary ---------------------------------------------------------------------
    def config(self, model: str) -> dict:
        config = self.client.get_model_config(model, as_json=True) if self.protocol == "grpc" else \
            self.client.get_model_config(model)
        return config.get("config", config)

    def pick_model(self, requested: str | None, graph: str = STEP) -> str:
        """The requested model if ready, else the first ready of the served models of `graph` (STEP: the client
        samples; GEN: the server samples K characters per request). A requested model must be of that graph."""
        candidates = [requested] if requested else list(names(graph=graph))
        for name in candidates:
            try:
                if not self.client.is_model_ready(name):
                    continue
                is_gen = NOISE in {i["name"] for i in self.config(name).get("input", [])}
            except Exception:  # a model that does not exist answers with an error
                continue
            if is_gen != (graph == GEN):
                raise UserError("--model", f"{name} is {'' if is_gen else 'not '}a server-side generation model",
                                "use --chunk K with charrnn_gen_* models, and no --chunk with the others")
            return name
        what = f"model {requested}" if requested else "models " + ", ".join(candidates)
        raise UnavailableError(what, f"not ready on {self.url}", "check `make serve` / the server log, or --model")

    def vocabulary(self, model: str) -> Vocab:
        try:
            return vocab_of(self.config(model))
        except KeyError as e:
            raise UnavailableError(f"model {model}", "its config has no vocabulary parameter",
                                   "export it with `make export`") from e

    # --- requests ---------------------------------------------------------------------------------
    def send(self, request_id: str, model: str, inputs: dict[str, np.ndarray], sequence_id: int, start: bool,
             end: bool) -> None:
        """One request of a sequence; inputs: name -> array with the batch dim (1, ...)."""
        tensors = []
        for name, value in inputs.items():
            t = self.tc.InferInput(name, list(value.shape), TRITON_DTYPE[value.dtype])
            t.set_data_from_numpy(value)
            tensors.append(t)
        kw = dict(request_id=request_id, sequence_id=sequence_id, sequence_start=start, sequence_end=end)
        if self.protocol == "grpc":
            if not self._stream:
                results = self.results  # a stream's late callbacks never reach a reopened connection's queue
                self.client.start_stream(callback=lambda result, error: self._stream_callback(results, result, error))
                self._stream = True
            self.client.async_stream_infer(model, tensors, **kw)
            return
        try:
            result = self.client.infer(model, tensors, headers=self.headers, **kw)
            self.results.put((request_id, result, None, time.perf_counter()))
        except Exception as e:  # tritonclient.utils.InferenceServerException, connection errors
            if "restricted" in str(e):  # no key, or a wrong one: nothing a retry can fix
                raise infer_key_error(e) from e
            self.results.put((request_id, None, e, time.perf_counter()))

    def _stream_callback(self, results: queue.Queue, result, error) -> None:
        if results is self.results:
            request_id = result.get_response().id if result is not None else None
            results.put((request_id, result, error, time.perf_counter()))


def infer_key_error(e: Exception) -> UserError:
    have = "a wrong key" if os.environ.get(INFER_KEY_ENV) else "no key"
    return UserError("--protocol http", f"the server refused HTTP inference with {have} ({short(e)})",
                     f"set {INFER_KEY_ENV} to the server's key: `export {INFER_KEY_ENV}=$(cat logs/serve/infer-key)` "
                     "for `make serve`, or the value in .env for compose; or use gRPC, which needs none")


def short(e: Exception) -> str:
    """The first line of an error, at most 200 characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]
