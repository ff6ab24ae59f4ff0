"""`make demo`: start the local Triton server, generate text through it, stop the server.

    python -m client.demo [--length 500] [--prompt "ROMEO:"] [client flags...]

The server loads the exported graph on Triton's ONNX Runtime backend (built from source by `make backend`):
charrnn_onnx, the project's main path (one character per request; Triton keeps each sequence's LSTM state as
implicit state), and charrnn_gen_onnx (`--chunk K`: K characters per request, sampled in the graph). With
`--model NAME` it serves and uses that model instead (a charrnn_*_python model keeps the state in Python).
Ports are picked free on 127.0.0.1, so the demo never collides with a running `make serve`.
The server is started by the serving stage's launcher (serve/local_triton.py, LocalTriton): the demo is the
one module of client/ that needs the serve extra (nvidia-pytriton, psutil), and imports nothing else of serve/.
Exit codes: those of `python -m client` (0 ok, 2 bad input, 3 server problems).
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from charrnn.cli import parser
from charrnn.contract import INFER_KEY_ENV
from charrnn.errors import UserError, cli
from charrnn.repository import BY_NAME, DECOUPLED_MODELS, GEN_ONNX, LOCAL_MODELS, ONNX

BACKENDS = {
    "onnxruntime": "Triton's ONNX Runtime backend, built from source; Triton kept the state (implicit state)",
    "python": "Triton's python backend; model.py kept the state",
}


def serving_stage(module: str):
    """A module of the serving stage: serve.<module> in a checkout, charrnn_serve.<module> installed (where this
    module is charrnn_client.demo; the stage folders install as charrnn_<stage>)."""
    stage = "charrnn_serve" if __package__ == "charrnn_client" else "serve"
    return importlib.import_module(f"{stage}.{module}")


@cli
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only -h/--help is the demo's own (answered before a server starts); every other flag goes to the client,
    # whose parser checks them all first (a bad flag never starts a server) and tells which model to serve.
    parser(
        "python -m client.demo",
        __doc__,
        usage="%(prog)s [-h] [client flags ...]",
        allow_abbrev=False,
    ).parse_known_args(argv)
    from .__main__ import parse_args

    flags = parse_args(argv)
    model = flags.model or (ONNX if flags.chunk is None else GEN_ONNX)
    if model not in LOCAL_MODELS:
        raise UserError(
            "--model",
            f"{model!r} is not served by the local server",
            f"choose one of {', '.join(LOCAL_MODELS)}",
        )
    launcher = serving_stage("local_triton")

    from .__main__ import main as client_main

    t0 = time.time()
    served = (
        (model,) if model in DECOUPLED_MODELS else tuple(dict.fromkeys((ONNX, GEN_ONNX, model)))
    )
    server = launcher.LocalTriton.on_free_ports(models=served)
    print(f"starting the local Triton server (log {server.log_path}) ...", file=sys.stderr)
    with server:
        print(
            f"ready in {time.time() - t0:.1f} s on {server.grpc_url}; generating:\n",
            file=sys.stderr,
        )
        client_argv = argv if flags.model else ["--model", model, *argv]
        url = server.http_url if flags.protocol == "http" else server.grpc_url
        if flags.protocol == "http":  # the local server's inference key, unless -H carries one
            os.environ.setdefault(INFER_KEY_ENV, server.infer_key)
        rc = client_main(["--url", url, *client_argv])
    print(
        f"server stopped. {'Generated' if rc == 0 else 'Tried'} through {model} on "
        f"{BACKENDS[BY_NAME[model].backend]}.",
        file=sys.stderr,
    )
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
