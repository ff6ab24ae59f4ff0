"""`make serve` / `make stop`: a real Triton server without Docker (charrnn/local_triton.py).

    python -m serve.local start [--grpc-port 8001 --http-port 8000 --metrics-port 8002]   # `make serve`
    python -m serve.local stop                                                           # `make stop`
    python -m serve.local status
    python -m serve.local run        # foreground; Ctrl-C stops it

The wheel's server (2.51.0) runs the python backend and Triton's ONNX Runtime backend, built from source by
`make backend` (serve/backend.py); every model that runs without a GPU is loaded: charrnn_onnx and
charrnn_gen_onnx (the exported graphs; Triton keeps each sequence's state), and the python models. `start`
starts two servers: the decoupled charrnn_gen_stream runs in a tritonserver of its own (--stream-*-port,
default 8010-8012), because 2.51 crashes when decoupled and non-decoupled models stream on one server
(docs/failures.md); `--models` asks for one server with those models. With `--tritonserver PATH` (e.g. a real
install's `tritonserver` on PATH) the same launcher runs that binary with its own backends and every model it
can load.
Safe defaults: loopback addresses, model control mode none, restricted admin APIs, logs to a file, and HTTP
inference only with the inference key (header infer-key; $TRITON_INFER_KEY, else a random key that `start`
writes to logs/serve/infer-key). gRPC inference is open.
Exit codes: 0 ok, 2 bad input, 3 the server did not become ready (its log is printed).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time

from charrnn.cli import parser
from charrnn.contract import INFER_KEY_ENV, INFER_KEY_HEADER
from charrnn.errors import UserError, cli
from charrnn.local_triton import DEFAULT_RUN_DIR, ROOT, LocalTriton, group_alive, stop_group
from charrnn.repository import DECOUPLED_MODELS, SHARED_CPU_MODELS

# --- CLI: make serve / make stop --------------------------------------------------------------------
PID_FILE = DEFAULT_RUN_DIR / "triton.pid"
ACTIONS = {
    "start": "start the servers in the background and return once they are ready (`make serve`)",
    "stop": "stop the servers `start` recorded (`make stop`)",
    "run": "start the servers in the foreground; Ctrl-C stops them",
    "status": "say whether the servers `start` recorded are running",
}


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m serve.local", __doc__)
    p.add_argument(
        "action", choices=list(ACTIONS), help="\n".join(f"{k}: {v}" for k, v in ACTIONS.items())
    )
    p.add_argument("--repo", default=str(ROOT / "model_repository"), help="model repository")
    p.add_argument(
        "--http-port", type=int, default=8000, help="HTTP port (inference needs the key)"
    )
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated models for ONE server (default: every local model, the decoupled one "
        "on a second server)",
    )
    p.add_argument(
        "--stream-http-port",
        type=int,
        default=8010,
        help="second server's HTTP port (the decoupled model)",
    )
    p.add_argument("--stream-grpc-port", type=int, default=8011, help="second server's gRPC port")
    p.add_argument(
        "--stream-metrics-port", type=int, default=8012, help="second server's metrics port"
    )
    p.add_argument(
        "--tritonserver",
        default=None,
        metavar="PATH",
        help="use this tritonserver binary (a real install, with all its backends) instead of the "
        "wheel's; a bare name is looked up on PATH (--tritonserver tritonserver)",
    )
    args = p.parse_args(argv)
    if args.tritonserver is not None:
        found = shutil.which(args.tritonserver)
        if found is None:
            raise UserError(
                "--tritonserver",
                f"{args.tritonserver!r} is not an executable file or a command on " "PATH",
                "pass the path of a real Triton install's bin/tritonserver, or leave the "
                "flag out to run the nvidia-pytriton wheel's server",
            )
        args.tritonserver = found

    recorded = (
        [int(line.split()[0]) for line in PID_FILE.read_text().splitlines()]
        if PID_FILE.is_file()
        else []
    )
    if args.action in ("stop", "status"):
        if not recorded:
            print("no local server recorded (make serve starts one)")
            return 0
        for pid in recorded:
            if args.action == "status":
                print(f"local server pid {pid}: {'running' if group_alive(pid) else 'not running'}")
            else:
                stop_group(pid, lambda: None, timeout=20)
                print(f"stopped local server (pid {pid})")
        if args.action == "stop":
            PID_FILE.unlink(missing_ok=True)
        return 0

    # One HTTP inference key for both servers: the user's $TRITON_INFER_KEY, else a random one saved for clients.
    infer_key = os.environ.get(INFER_KEY_ENV) or secrets.token_hex(16)
    common = {"repo": args.repo, "tritonserver": args.tritonserver, "infer_key": infer_key}
    if args.models is not None:
        servers = [
            LocalTriton(
                http_port=args.http_port,
                grpc_port=args.grpc_port,
                metrics_port=args.metrics_port,
                models=tuple(filter(None, args.models.split(","))),
                **common,
            )
        ]
    else:
        servers = [
            LocalTriton(
                http_port=args.http_port,
                grpc_port=args.grpc_port,
                metrics_port=args.metrics_port,
                models=SHARED_CPU_MODELS,
                **common,
            ),
            LocalTriton(
                http_port=args.stream_http_port,
                grpc_port=args.stream_grpc_port,
                metrics_port=args.stream_metrics_port,
                run_dir=DEFAULT_RUN_DIR.parent / "serve-stream",
                models=DECOUPLED_MODELS,
                **common,
            ),
        ]
    if args.action == "start" and any(group_alive(pid) for pid in recorded):
        raise UserError("make serve", "a local server is already running", "`make stop` first")
    started = []
    try:
        for server in servers:
            t0 = time.time()
            started.append(server.start())
            print(
                f"Triton ready in {time.time() - t0:.1f} s: grpc {server.grpc_url}, http {server.http_url}, "
                f"models {', '.join(server.models)}; log {server.log_path}"
            )
    except BaseException:
        for server in started:
            server.stop()
        raise
    key_file = DEFAULT_RUN_DIR / "infer-key"
    key_file.unlink(missing_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(infer_key + "\n")
    print(
        f"HTTP inference needs the header {INFER_KEY_HEADER}: export {INFER_KEY_ENV}=$(cat {key_file}) for the "
        "client (gRPC needs no key)"
    )
    if args.action == "start":
        PID_FILE.write_text("".join(f"{s.process.pid}\n" for s in servers))
        for server in servers:
            server.process = None  # leave it running; `make stop` stops it
        return 0
    try:  # run: foreground until Ctrl-C or a server exits
        while all(s.process.poll() is None for s in servers):
            time.sleep(0.5)  # waiting on either server process to exit
    except KeyboardInterrupt:
        pass
    finally:
        for server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
