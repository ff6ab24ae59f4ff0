"""`make demo`: start the local Triton server, generate text through it, stop the server.

    python -m client.demo [--length 500] [--prompt "ROMEO:"] [client flags...]

Ports are picked free on 127.0.0.1, so the demo never collides with a running `make serve`.
Exit codes: those of `python -m client` (0 ok, 2 bad input, 3 server problems).
"""

from __future__ import annotations

import sys
import time

from charrnn.cli import parser
from charrnn.errors import cli


@cli
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only -h/--help is the demo's own (answered before a server starts); every other flag goes to the client.
    parser(
        "python -m client.demo",
        __doc__,
        usage="%(prog)s [-h] [client flags ...]",
        allow_abbrev=False,
    ).parse_known_args(argv)
    from charrnn.local_triton import LocalTriton

    from .__main__ import main as client_main

    t0 = time.time()
    server = LocalTriton.on_free_ports()
    print(f"starting the local Triton server (log {server.log_path}) ...", file=sys.stderr)
    with server:
        print(
            f"ready in {time.time() - t0:.1f} s on {server.grpc_url}; generating:\n",
            file=sys.stderr,
        )
        rc = client_main(["--url", server.grpc_url, *argv])
    print("server stopped.", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
