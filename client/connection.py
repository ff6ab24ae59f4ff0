"""Talking to Triton: connect, pick a model, read its vocabulary, and send sequence requests.

`Connection` hides the two protocols behind one call, `send(request_id, model, inputs, sequence_id, start,
end, shard, key)`, whose answers arrive on `results`: a queue of Answer(request_id or None, tritonclient
InferResult or None, error or None, arrival time, shard). A decoupled model answers one request with several.
gRPC uses ONE bidirectional stream for every sequence (what the sequence batcher batches across); its errors
carry no request id (None). HTTP has no streaming and tritonclient.http (gevent) is not thread-safe, so `send`
runs the request synchronously and queues its result: sequences then take turns, one request at a time.

Behind a proxy in front of several replicas (`shards` > 1; compose profile `scale`): gRPC opens one stream per
shard, each with its own routing header (ROUTING_HEADER, hashed by the proxy, so a stream and every sequence on
it stay on one replica), and a broken stream is reopened alone (`reopen(shard)`); HTTP sends each sequence's
key in that header on every request.
"""

from __future__ import annotations

import os
import queue
import secrets
import time
from typing import NamedTuple

import numpy as np

from charrnn.contract import (
    ADMISSION_TIMEOUT_US,
    INFER_KEY_ENV,
    INFER_KEY_HEADER,
    NOISE,
    ROUTING_HEADER,
    TRITON_DTYPE,
)
from charrnn.errors import UnavailableError, UserError
from charrnn.repository import GEN, STEP, names, vocab_of
from charrnn.vocab import Vocab


class Answer(NamedTuple):
    request_id: str | None  # None: a gRPC stream error (it names no request)
    result: object  # tritonclient InferResult, or None with an error
    error: object
    arrived: float  # time.perf_counter()
    shard: int  # the gRPC stream it came on (0 over HTTP)
    generation: (
        int  # of that shard's connection: answers of a connection closed by reopen() are stale
    )


class Connection:
    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        timeout: float = 10.0,
        infer_key: str | None = None,
        shards: int = 1,
    ) -> None:
        """infer_key: the server's HTTP inference key (default $TRITON_INFER_KEY); gRPC needs none.
        shards: gRPC streams, each with its own routing header (> 1 only behind a proxy: at least 2 per replica).
        """
        if not 1 <= shards <= 64:
            raise UserError(
                "--shards", f"must be in 1..64, got {shards}", "2 per replica behind the proxy"
            )
        if protocol not in ("grpc", "http"):
            raise UserError("--protocol", f"must be grpc or http, got {protocol!r}")
        if not url or "/" in url.split("://")[-1] or ":" not in url.split("://")[-1]:
            raise UserError(
                "--url", f"expected host:port, got {url!r}", "e.g. 127.0.0.1:8001 for gRPC"
            )
        self.url, self.protocol, self.timeout = url.split("://")[-1], protocol, timeout
        key = infer_key if infer_key is not None else os.environ.get(INFER_KEY_ENV)
        self.headers = {INFER_KEY_HEADER: key} if key and protocol == "http" else None
        self.shards = shards if protocol == "grpc" else 1
        self.routed = (
            shards > 1
        )  # behind a proxy: routing headers, and sequence ids that carry an epoch
        tag = secrets.token_hex(4)  # this client's shard keys differ from every other client's
        self.shard_keys = [f"{tag}-{k}" for k in range(self.shards)]
        self.results: queue.Queue = queue.Queue()
        self.clients: list = [None] * self.shards
        self._streaming = [False] * self.shards
        self._generation = [
            0
        ] * self.shards  # bumped on reopen: a closed stream's late callbacks are dropped
        for k in range(self.shards):
            self._open(k)

    @property
    def client(self):
        """The client for everything but inference (model readiness, configs)."""
        return self.clients[0]

    def _open(self, shard: int) -> None:
        """Create the shard's tritonclient client and check the server is live (UnavailableError if not)."""
        protocol, timeout = self.protocol, self.timeout
        try:
            if protocol == "grpc":
                import tritonclient.grpc as tc

                client = tc.InferenceServerClient(self.url)
            else:
                import tritonclient.http as tc

                client = tc.InferenceServerClient(
                    self.url, connection_timeout=timeout, network_timeout=timeout
                )
            self.tc, self.clients[shard] = tc, client
            live = client.is_server_live()
        except (
            Exception
        ) as e:  # tritonclient raises InferenceServerException, gRPC/geventhttp errors, ...
            raise UnavailableError(
                f"server {self.url}",
                f"unreachable over {protocol} ({short(e)})",
                "start it with `make serve`, or pass --url/--protocol",
            ) from e
        if not live:
            raise UnavailableError(f"server {self.url}", "not live", "check the server log")

    def reopen(self, shard: int | None = None) -> None:
        """Connect again (after the server went away): a new client and, on first send, a new stream, for one
        shard or (None) all of them. Results still in flight on what was closed are dropped. Raises
        UnavailableError while the server is not reachable."""
        for k in range(self.shards) if shard is None else [shard]:
            self._close(k, wait=False)
            self._generation[k] += 1
            self._open(k)

    def abort(self) -> None:
        """Close without waiting for requests in flight (close() waits for them on a live stream)."""
        for k in range(self.shards):
            self._close(k, wait=False)

    def close(self) -> None:
        for k in range(self.shards):
            self._close(k, wait=True)

    def _close(self, shard: int, wait: bool) -> None:
        client = self.clients[shard]
        try:
            if self._streaming[shard]:
                client.stop_stream(cancel_requests=not wait)
        except Exception:
            pass
        self._streaming[shard] = False
        try:
            client.close()
        except Exception:
            pass

    # --- model and vocabulary ---------------------------------------------------------------------
    def config(self, model: str) -> dict:
        config = (
            self.client.get_model_config(model, as_json=True)
            if self.protocol == "grpc"
            else self.client.get_model_config(model)
        )
        return config.get("config", config)

    def pick_model(self, requested: str | None, graph: str = STEP) -> str:
        """The requested model if ready, else the first ready of the served models of `graph` (STEP: the client
        samples; GEN: the server samples K characters per request). A requested model must be of that graph.
        """
        candidates = [requested] if requested else list(names(graph=graph))
        for name in candidates:
            try:
                if not self.client.is_model_ready(name):
                    continue
                is_gen = NOISE in {i["name"] for i in self.config(name).get("input", [])}
            except Exception:  # a model that does not exist answers with an error
                continue
            if is_gen != (graph == GEN):
                raise UserError(
                    "--model",
                    f"{name} is {'' if is_gen else 'not '}a server-side generation model",
                    "use --chunk K with charrnn_gen_* models, and no --chunk with the others",
                )
            return name
        what = f"model {requested}" if requested else "models " + ", ".join(candidates)
        raise UnavailableError(
            what, f"not ready on {self.url}", "check `make serve` / the server log, or --model"
        )

    def vocabulary(self, model: str) -> Vocab:
        try:
            return vocab_of(self.config(model))
        except KeyError as e:
            raise UnavailableError(
                f"model {model}",
                "its config has no vocabulary parameter",
                "export it with `make export`",
            ) from e

    # --- requests ---------------------------------------------------------------------------------
    def send(
        self,
        request_id: str,
        model: str,
        inputs: dict[str, np.ndarray],
        sequence_id: int | str,
        start: bool,
        end: bool,
        shard: int = 0,
        key: str | None = None,
    ) -> None:
        """One request of a sequence; inputs: name -> array with the batch dim (1, ...). gRPC: on the stream of
        `shard`; HTTP: with the sequence's routing `key` (when routed)."""
        tensors = []
        for name, value in inputs.items():
            t = self.tc.InferInput(name, list(value.shape), TRITON_DTYPE[value.dtype])
            t.set_data_from_numpy(value)
            tensors.append(t)
        # A START waits for a free sequence slot at most ADMISSION_TIMEOUT_US, then Triton answers "at capacity".
        kw = dict(
            request_id=request_id,
            sequence_id=sequence_id,
            sequence_start=start,
            sequence_end=end,
            timeout=ADMISSION_TIMEOUT_US if start else None,
        )
        if self.protocol == "grpc":
            if not self._streaming[shard]:
                generation = self._generation[shard]
                headers = {ROUTING_HEADER: self.shard_keys[shard]} if self.routed else None
                self.clients[shard].start_stream(
                    callback=lambda result, error: self._stream_callback(
                        shard, generation, result, error
                    ),
                    headers=headers,
                )
                self._streaming[shard] = True
            self.clients[shard].async_stream_infer(model, tensors, **kw)
            return
        headers = dict(self.headers or {})
        if self.routed and key is not None:
            headers[ROUTING_HEADER] = key
        try:
            result = self.client.infer(model, tensors, headers=headers or None, **kw)
            self.results.put(
                Answer(request_id, result, None, time.perf_counter(), 0, self._generation[0])
            )
        except Exception as e:  # tritonclient.utils.InferenceServerException, connection errors
            if "restricted" in str(e):  # no key, or a wrong one: nothing a retry can fix
                raise infer_key_error(e) from e
            self.results.put(
                Answer(request_id, None, e, time.perf_counter(), 0, self._generation[0])
            )

    def _stream_callback(self, shard: int, generation: int, result, error) -> None:
        request_id = result.get_response().id if result is not None else None
        self.results.put(Answer(request_id, result, error, time.perf_counter(), shard, generation))

    def stale(self, answer: Answer) -> bool:
        """True for an answer of a stream or client that reopen() has replaced since (e.g. its cancellations)."""
        return answer.generation != self._generation[answer.shard]


def infer_key_error(e: Exception) -> UserError:
    have = "a wrong key" if os.environ.get(INFER_KEY_ENV) else "no key"
    return UserError(
        "--protocol http",
        f"the server refused HTTP inference with {have} ({short(e)})",
        f"set {INFER_KEY_ENV} to the server's key: `export {INFER_KEY_ENV}=$(cat logs/serve/infer-key)` "
        "for `make serve`, or the value in .env for compose; or use gRPC, which needs none",
    )


def short(e: Exception) -> str:
    """The first line of an error, at most 200 characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]
