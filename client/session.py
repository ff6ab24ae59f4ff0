"""Talking to Triton: connect, pick a model, read its vocabulary, and send sequence requests.

`Connection` hides the two protocols behind one call, `send(request_id, ids, sequence_id, start, end)`,
whose results arrive on `results` (a queue of (request_id, logits (V,) or None, error or None, seconds)).
gRPC uses ONE bidirectional stream for every sequence (what the sequence batcher batches across), driven
directly on Triton's gRPC service stub (`GrpcStream`: requests built as protobufs from a template, the
logits read straight from the response bytes), because tritonclient.grpc's per-request Python work
(InferInput, request assembly, InferResult) costs more than the server's own step; tritonclient still does
everything else (health, model readiness, config). HTTP has no streaming and tritonclient.http (gevent) is not thread-safe, so `send` runs the request
synchronously and queues its result: sequences then take turns, one request at a time.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from typing import Callable

from charrnn.contract import INPUT_IDS, LOGITS, VOCAB_PARAMETER
from charrnn.errors import UnavailableError, UserError
from charrnn.vocab import Vocab

MODEL_PREFERENCE = ("charrnn_trt", "charrnn_onnx", "charrnn_python")


class GrpcStream:
    """One ModelStreamInfer bidirectional stream: `send(request)` queues a ModelInferRequest; a reader
    thread calls on_response(ModelStreamInferResponse) for each answer and on_error(exception) once if the
    stream dies (server gone, cancelled)."""

    def __init__(self, url: str, on_response: Callable, on_error: Callable) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self._channel = grpc.insecure_channel(url)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._responses = stub.ModelStreamInfer(iter(self._requests.get, None))
        self._on_response, self._on_error = on_response, on_error
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="grpc-stream-reader", daemon=True)
        self._reader.start()

    def send(self, request) -> None:
        if not self._reader.is_alive():
            raise _stream_error("the stream is no longer in valid state (its connection was lost)", "UNAVAILABLE")
        self._requests.put(request)

    def _read(self) -> None:
        try:
            for response in self._responses:
                self._on_response(response)
        except Exception as e:  # grpc.RpcError: UNAVAILABLE (server gone), CANCELLED (closed), ...
            if not self._closing:
                code = e.code() if hasattr(e, "code") else None
                details = e.details() if hasattr(e, "details") else str(e)
                self._on_error(_stream_error(details or str(e), str(code or "")))

    def close(self, cancel: bool = False) -> None:
        """Finish the stream: wait for the answers in flight, or (cancel) drop them."""
        self._closing = cancel
        if cancel:
            self._responses.cancel()
        self._requests.put(None)  # ends the request iterator: the server finishes and closes the stream
        self._reader.join(timeout=None if not cancel else 5)
        self._channel.close()


def _stream_error(message: str, status: str):
    from tritonclient.utils import InferenceServerException

    return InferenceServerException(msg=message, status=status)


class Connection:
    def __init__(self, url: str, protocol: str = "grpc", timeout: float = 10.0) -> None:
        if protocol not in ("grpc", "http"):
            raise UserError("--protocol", f"must be grpc or http, got {protocol!r}")
        if not url or "/" in url.split("://")[-1] or ":" not in url.split("://")[-1]:
            raise UserError("--url", f"expected host:port, got {url!r}", "e.g. 127.0.0.1:8001 for gRPC")
        self.url, self.protocol, self.timeout = url.split("://")[-1], protocol, timeout
        self.results: queue.Queue = queue.Queue()
        self._sent: dict[str, float] = {}
        self._stream: GrpcStream | None = None
        self._templates: dict[str, object] = {}  # model -> ModelInferRequest with everything but the data
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
        if self._stream is not None:
            try:
                self._stream.close(cancel=True)
            except Exception:
                pass
            self._stream = None
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

    def _on_result(self, request_id: str | None, logits: np.ndarray | None, error) -> None:
        seconds = time.perf_counter() - self._sent.pop(request_id, time.perf_counter())
        self.results.put((request_id, logits, error, seconds))

    def _on_stream_response(self, response) -> None:
        """A ModelStreamInferResponse: logits (1, V) fp32 in its raw bytes, or an error message."""
        r = response.infer_response
        request_id = r.id or None
        if response.error_message:
            error = _stream_error(response.error_message, "")
            if request_id is None:  # older servers send no id with stream errors: find it in the message
                request_id = _request_id_from(error, self._sent)
            self._on_result(request_id, None, error)
            return
        seconds = time.perf_counter() - self._sent.pop(request_id, time.perf_counter())
        self.results.put((request_id, np.frombuffer(r.raw_output_contents[0], np.float32), None, seconds))

    def _grpc_request(self, request_id: str, ids: np.ndarray, model: str, sequence_id: int, start: bool,
                      end: bool):
        from tritonclient.grpc import service_pb2

        template = self._templates.get(model)
        if template is None:
            template = service_pb2.ModelInferRequest(model_name=model)
            inp = template.inputs.add(name=INPUT_IDS, datatype="INT32")
            inp.shape.extend([1, 1])
            template.outputs.add(name=LOGITS)
            self._templates[model] = template
        request = service_pb2.ModelInferRequest()
        request.CopyFrom(template)
        request.id = request_id
        request.inputs[0].shape[1] = len(ids)
        params = request.parameters
        params["sequence_id"].int64_param = sequence_id
        params["sequence_start"].bool_param = start
        params["sequence_end"].bool_param = end
        request.raw_input_contents.append(np.ascontiguousarray(ids, np.int32).tobytes())
        return request

    def send(self, request_id: str, ids: np.ndarray, model: str, sequence_id: int, start: bool, end: bool) -> None:
        self._sent[request_id] = time.perf_counter()
        if self.protocol == "grpc":
            if self._stream is None:
                results = self.results  # a stream's late answers never reach a reopened connection's queue

                def on_response(response) -> None:
                    if self.results is results:
                        self._on_stream_response(response)

                def on_error(error) -> None:
                    if self.results is results:
                        self.results.put((None, None, error, 0.0))

                self._stream = GrpcStream(self.url, on_response, on_error)
            self._stream.send(self._grpc_request(request_id, ids, model, sequence_id, start, end))
        else:
            try:
                r = self.client.infer(model, self._inputs(ids), request_id=request_id, sequence_id=sequence_id,
                                      sequence_start=start, sequence_end=end)
                self._on_result(request_id, r.as_numpy(LOGITS)[0], None)
            except Exception as e:  # tritonclient.utils.InferenceServerException, connection errors
                self._on_result(request_id, None, e)

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:
                pass
            self._stream = None
        try:
            self.client.close()
        except Exception:
            pass


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
