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

TLS (gRPC only): ssl=True with root_certificates / private_key / certificate_chain (PEM files), as tritonclient.grpc
takes them. headers: sent with every request (gRPC: on each stream and each call; HTTP: on each request), under
our own (the routing header; the inference key from $TRITON_INFER_KEY unless headers carry one). timeout: seconds
for connecting and for every non-streaming call. check_connection holds every check of these arguments
(`python -m client` runs it on its flags before connecting). A server that requires a header the client does not
send (charrnn.contract RESTRICTED_MESSAGE) is a caller mistake: HeaderRefused (exit 2) names it.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import threading
import time
from typing import NamedTuple

import numpy as np

from charrnn.contract import (
    ADMISSION_TIMEOUT_US,
    INFER_KEY_ENV,
    INFER_KEY_HEADER,
    NOISE,
    RESTRICTED_MESSAGE,
    ROUTING_HEADER,
    TRITON_DTYPE,
)
from charrnn.deployment import MAIN
from charrnn.errors import UnavailableError, UserError
from charrnn.repository import GEN, STEP, names, vocab_of
from charrnn.vocab import Vocab


class Answer(NamedTuple):
    request_id: str | None  # None: a gRPC stream error (it names no request)
    result: object  # tritonclient InferResult, or None with an error
    error: object
    arrived: float  # time.perf_counter()
    shard: int  # the gRPC stream it came on (0 over HTTP)
    # the shard's connection epoch (reopen() counts it up): answers of an older connection are stale
    stream_epoch: int


PROTOCOLS = ("grpc", "http")
# Seconds a send on a broken gRPC stream waits for the stream's error (tritonclient reports it to the callback
# right after it marks the stream broken).
STREAM_ERROR_WAIT_S = 1.0
DEFAULT_PORTS = {"grpc": MAIN.ports.grpc, "http": MAIN.ports.http}
# An HTTP header name (RFC 9110 token); gRPC metadata takes the same names, lower-cased.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_url(url: str | None, protocol: str | None = None) -> tuple[str, str]:
    """(host:port, protocol) from --url and --protocol: a grpc:// or http:// scheme sets the protocol (one that
    contradicts an explicit protocol is an error); no url: 127.0.0.1 on the protocol's default port.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise UserError("--protocol", f"must be grpc or http, got {protocol!r}")
    if url is None:
        protocol = protocol or "grpc"
        return f"127.0.0.1:{DEFAULT_PORTS[protocol]}", protocol
    address = url
    if "://" in url:
        scheme, address = url.split("://", 1)
        if scheme.lower() not in PROTOCOLS:
            raise UserError(
                "--url",
                f"unknown scheme {scheme + '://'!r} in {url!r}",
                "use grpc://host:port or http://host:port; for TLS, --ssl (gRPC only)",
            )
        scheme = scheme.lower()
        if protocol is not None and protocol != scheme:
            raise UserError(
                "--url",
                f"{url!r} says {scheme}, but --protocol says {protocol}",
                "drop one of them, or make them agree",
            )
        protocol = scheme
    protocol = protocol or "grpc"
    host, _, port = address.rpartition(":")
    if not host or "/" in address or not port:
        raise UserError(
            "--url",
            f"expected host:port, got {url!r}",
            f"e.g. 127.0.0.1:{DEFAULT_PORTS[protocol]} for {protocol}",
        )
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise UserError("--url", f"port {port!r} of {url!r} is not a number in 1..65535")
    return address, protocol


def parse_headers(specs: list[str] | None) -> dict[str, str]:
    """{name: value} from "Name:Value" strings (-H/--header); names lower-cased (gRPC metadata must be)."""
    out = {}
    for spec in specs or ():
        name, sep, value = spec.partition(":")
        name, value = name.strip().lower(), value.strip()
        if not sep or not _HEADER_NAME.match(name):
            raise UserError(
                "--header", f"expected Name:Value, got {spec!r}", "e.g. -H 'x-request-tag:demo'"
            )
        if name.startswith("grpc-"):
            raise UserError("--header", f"{spec!r}: names starting with grpc- are gRPC's own")
        if not (value.isprintable() and value.isascii()):
            raise UserError("--header", f"{spec!r}: the value must be printable ASCII")
        out[name] = value
    return out


def check_tls_files(**files: str | None) -> None:
    """Each PEM file named by a TLS flag (keyword: the flag's name with _) exists and is readable."""
    for flag, path in files.items():
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise UserError(
                "--" + flag.replace("_", "-"), f"cannot read {path!r} ({e.strerror or e})"
            ) from e


def check_connection(
    url: str | None,
    protocol: str | None = None,
    *,
    timeout: float = 10.0,
    shards: int = 1,
    ssl: bool = False,
    root_certificates: str | None = None,
    private_key: str | None = None,
    certificate_chain: str | None = None,
    headers: list[str] | dict[str, str] | None = None,
) -> tuple[str, str, dict[str, str]]:
    """Every check of how to connect (UserError, exit 2), before connecting: `python -m client` runs it on its
    flags, Connection on its arguments. headers: "Name:Value" strings (-H) or {name: value}. Returns (host:port,
    protocol, {lower-case name: value})."""
    url, protocol = parse_url(url, protocol)
    if isinstance(headers, dict):
        headers = {k.lower(): v for k, v in headers.items()}
    else:
        headers = parse_headers(headers)
    tls = any(f is not None for f in (root_certificates, private_key, certificate_chain))
    if (ssl or tls) and protocol != "grpc":
        raise UserError(
            "--ssl",
            "TLS is supported over gRPC only",
            "use -i grpc, or put a TLS-terminating proxy in front of HTTP",
        )
    if tls and not ssl:
        raise UserError(
            "--ssl", "is needed with --root-certificates / --private-key / --certificate-chain"
        )
    check_tls_files(
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )
    if not timeout > 0:
        raise UserError("--client-timeout", f"must be > 0 seconds, got {timeout}")
    if not 1 <= shards <= 64:
        raise UserError(
            "--shards", f"must be in 1..64, got {shards}", "2 per replica behind the proxy"
        )
    return url, protocol, headers


def import_tritonclient(protocol: str):
    """tritonclient.grpc or tritonclient.http; not installed: a UserError naming the extra to install."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
    except ImportError as e:
        raise UserError(
            "tritonclient",
            f"not installed, or incomplete for {protocol} ({short(e)})",
            'install the client extra: pip install "charrnn-triton[client]"',
        ) from e
    return tc


class Connection:
    def __init__(
        self,
        url: str,
        protocol: str | None = None,
        timeout: float = 10.0,
        infer_key: str | None = None,
        shards: int = 1,
        *,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        headers: dict[str, str] | None = None,
        verbose: bool = False,
    ) -> None:
        """url: host:port, or grpc://host:port / http://host:port (the scheme must agree with `protocol`;
        protocol None: the scheme's, else gRPC). infer_key: the server's HTTP inference key (default
        $TRITON_INFER_KEY, or an infer-key in `headers`); gRPC needs none. shards: gRPC streams, each with its
        own routing header (> 1 only behind a proxy: at least 2 per replica). ssl, root_certificates,
        private_key, certificate_chain: gRPC over TLS (PEM file paths). headers: {name: value} sent with every
        request. timeout: seconds, connecting and each non-streaming call. verbose: tritonclient's verbose.
        """
        self.url, self.protocol, self.user_headers = check_connection(
            url,
            protocol,
            timeout=timeout,
            shards=shards,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            headers=headers or {},
        )
        self.timeout = timeout
        self.ssl = dict(
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )
        self.verbose = verbose
        key = infer_key if infer_key is not None else os.environ.get(INFER_KEY_ENV)
        http_key = {INFER_KEY_HEADER: key} if key and self.protocol == "http" else {}
        # every request's headers: the inference key (HTTP), then the user's (which may carry the key)
        self.headers = {**http_key, **self.user_headers} or None
        protocol = self.protocol
        self.shards = shards if protocol == "grpc" else 1
        # behind a proxy: routing headers, and sequence ids that carry an epoch
        self.routed = shards > 1
        tag = secrets.token_hex(4)  # this client's shard keys differ from every other client's
        self.shard_keys = [f"{tag}-{k}" for k in range(self.shards)]
        self.results: queue.Queue = queue.Queue()
        self.clients: list = [None] * self.shards
        self._streaming = [False] * self.shards
        # bumped on reopen: a closed stream's late callbacks are dropped
        self._stream_epoch = [0] * self.shards
        # the last error each shard's current stream reported, and whether it reported one (reset on reopen)
        self._stream_error: list = [None] * self.shards
        self._stream_erred = [threading.Event() for _ in range(self.shards)]
        for k in range(self.shards):
            self._open(k)

    @property
    def client(self):
        """The client for everything but inference (model readiness, configs)."""
        return self.clients[0]

    def _call(self) -> dict:
        """Keyword arguments of every non-streaming call: the headers, and (gRPC) the timeout."""
        kw = {"headers": self.headers}
        if self.protocol == "grpc":
            kw["client_timeout"] = self.timeout
        return kw

    def _open(self, shard: int) -> None:
        """Create the shard's tritonclient client and check the server is live (UnavailableError if not)."""
        protocol, timeout = self.protocol, self.timeout
        tc = import_tritonclient(protocol)  # not installed: a UserError (exit 2), not an outage
        try:
            if protocol == "grpc":
                client = tc.InferenceServerClient(self.url, verbose=self.verbose, **self.ssl)
            else:
                client = tc.InferenceServerClient(
                    self.url,
                    verbose=self.verbose,
                    connection_timeout=timeout,
                    network_timeout=timeout,
                )
            self.tc, self.clients[shard] = tc, client
            live = client.is_server_live(**self._call())
        # tritonclient raises InferenceServerException, gRPC/geventhttp errors, ...
        except Exception as e:
            # a header the server requires is missing or wrong
            if is_restricted(e):
                raise header_refused(self.url, e) from e
            raise UnavailableError(
                f"server {self.url}",
                f"unreachable over {protocol}{' with TLS' if self.ssl['ssl'] else ''} ({short(e)})",
                "start it with `make serve`, or pass --url/--protocol"
                + (" and the right --root-certificates" if self.ssl["ssl"] else ""),
            ) from e
        if not live:
            raise UnavailableError(f"server {self.url}", "not live", "check the server log")

    def reopen(self, shard: int | None = None) -> None:
        """Connect again (after the server went away): a new client and, on first send, a new stream, for one
        shard or (None) all of them. Results still in flight on what was closed are dropped. Raises
        UnavailableError while the server is not reachable."""
        for k in range(self.shards) if shard is None else [shard]:
            self._close(k, wait=False)
            self._stream_epoch[k] += 1
            self._stream_error[k], self._stream_erred[k] = None, threading.Event()
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
            self.client.get_model_config(model, as_json=True, **self._call())
            if self.protocol == "grpc"
            else self.client.get_model_config(model, **self._call())
        )
        return config.get("config", config)

    def exists(self, model: str) -> bool:
        """Whether the server has `model` in its repository, ready or not. Triton 2.51 answers the metadata of a
        model it does not have "Request for unknown model: '<name>' is not found", of one that failed to load or
        is loading "... has no available versions" (gRPC NOT_FOUND / HTTP 404 both times)."""
        try:
            self.client.get_model_metadata(model, **self._call())
            return True
        except Exception as e:
            if "is not found" in str(e):
                return False
            if "no available versions" in str(e):
                return True
            raise

    def served_models(self) -> list[str]:
        """The ready models of the server: its repository index (an admin API, often restricted: then pass
        the admin key with -H), else the ready ones of this project's models."""
        try:
            index = (
                self.client.get_model_repository_index(as_json=True, **self._call())
                if self.protocol == "grpc"
                else self.client.get_model_repository_index(**self._call())
            )
            models = index.get("models", []) if isinstance(index, dict) else index
            return sorted({m["name"] for m in models if m.get("state", "READY") == "READY"})
        except Exception:  # restricted, or an older server
            ready = []
            for name in names():
                try:
                    if self.client.is_model_ready(name, **self._call()):
                        ready.append(name)
                except Exception:
                    pass
            return ready

    def pick_model(self, requested: str | None, graph: str = STEP) -> str:
        """The requested model if ready, else the first ready of the served models of `graph` (STEP: the client
        samples; GEN: the server samples K characters per request). A requested model must be of that graph.
        """
        candidates = [requested] if requested else list(names(graph=graph))
        for name in candidates:
            try:
                if not self.client.is_model_ready(name, **self._call()):
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
        try:
            known = [name for name in candidates if self.exists(name)]
        except Exception:  # cannot tell: the server is going away, say "not ready" as before
            known = candidates
        if not known:  # not an outage: the server does not have it
            ready = self.served_models()
            raise UserError(
                "--model" if requested else what,
                (
                    f"{requested} is not served by {self.url}"
                    if requested
                    else f"none of them is served by {self.url}"
                ),
                (
                    f"it serves {', '.join(ready)}"
                    if ready
                    else "no model of this project is ready there"
                )
                + ("; with --chunk, a charrnn_gen_* model" if graph == GEN else ""),
            )
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
                stream_epoch = self._stream_epoch[shard]
                headers = dict(self.headers or {})
                if self.routed:
                    headers[ROUTING_HEADER] = self.shard_keys[shard]
                self.clients[shard].start_stream(
                    callback=lambda result, error: self._stream_callback(
                        shard, stream_epoch, result, error
                    ),
                    headers=headers or None,
                )
                self._streaming[shard] = True
            try:
                self.clients[shard].async_stream_infer(model, tensors, **kw)
            except Exception as e:
                # A stream the server refused or broke takes no more requests, and why reaches the callback a
                # moment later. Refused for a header it requires (at once, often before the first request):
                # a caller mistake to report, not an outage to reconnect from.
                self._stream_erred[shard].wait(STREAM_ERROR_WAIT_S)
                cause = self._stream_error[shard]
                if cause is not None and is_restricted(cause):
                    raise header_refused(self.url, cause) from e
                raise
            return
        headers = dict(self.headers or {})
        if self.routed and key is not None:
            headers[ROUTING_HEADER] = key
        try:
            result = self.client.infer(model, tensors, headers=headers or None, **kw)
            self.results.put(
                Answer(request_id, result, None, time.perf_counter(), 0, self._stream_epoch[0])
            )
        except Exception as e:  # tritonclient.utils.InferenceServerException, connection errors
            # no key, or a wrong one: nothing a retry can fix
            if is_restricted(e):
                if required_header(e) in (INFER_KEY_HEADER, None):
                    raise infer_key_error(e) from e
                raise header_refused(self.url, e) from e
            self.results.put(
                Answer(request_id, None, e, time.perf_counter(), 0, self._stream_epoch[0])
            )

    def _stream_callback(self, shard: int, stream_epoch: int, result, error) -> None:
        request_id = result.get_response().id if result is not None else None
        if error is not None and stream_epoch == self._stream_epoch[shard]:
            self._stream_error[shard] = error
            self._stream_erred[shard].set()
        self.results.put(
            Answer(request_id, result, error, time.perf_counter(), shard, stream_epoch)
        )

    def stale(self, answer: Answer) -> bool:
        """True for an answer of a stream or client that reopen() has replaced since (e.g. its cancellations)."""
        return answer.stream_epoch != self._stream_epoch[answer.shard]


class HeaderRefused(UserError):
    """The server requires a header (a restricted API or protocol) that the request lacked or had wrong."""


def is_restricted(e) -> bool:
    """Whether the server refused for a header it requires (RESTRICTED_MESSAGE), missing or wrong."""
    return RESTRICTED_MESSAGE in str(e).lower()


def required_header(e: Exception) -> str | None:
    """The header a refusal (RESTRICTED_MESSAGE) names: "... expecting header '<name>'"; None if none."""
    found = re.search(r"expecting header '([^']+)'", str(e))
    return found.group(1) if found else None


def header_refused(url: str, e: Exception) -> HeaderRefused:
    """A caller mistake (exit 2), never an outage to retry: Triton 2.51 refuses gRPC with UNAVAILABLE."""
    name = required_header(e)
    return HeaderRefused(
        f"server {url}",
        f"requires the header {name or '(unnamed)'}, which the request lacked or had wrong ({short(e)})",
        f"pass it with -H {name or 'NAME'}:VALUE",
    )


def infer_key_error(e: Exception) -> HeaderRefused:
    have = "a wrong key" if os.environ.get(INFER_KEY_ENV) else "no key"
    return HeaderRefused(
        "--protocol http",
        f"the server refused HTTP inference with {have} ({short(e)})",
        f"set {INFER_KEY_ENV} to the server's key: `export {INFER_KEY_ENV}=$(cat logs/serve/infer-key)` "
        "for `make serve`, or the value in .env for compose; or use gRPC, which needs none",
    )


def short(e: Exception) -> str:
    """The first line of an error, at most 200 characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]
