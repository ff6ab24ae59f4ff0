"""Generate text through a Triton server (`python -m client`).

    python -m client --prompt "ROMEO:" --length 500                    # local server from `make serve`
    python -m client -u 127.0.0.1:8001 -m charrnn_trt --greedy
    python -m client -u http://127.0.0.1:8000 --seed 1                 # HTTP (needs $TRITON_INFER_KEY)
    python -m client -u triton.example:8001 --ssl --root-certificates ca.pem -H "x-team:nlp"
    python -m client --num-sequences 8 --seed 1 --temperature 0.8       # 8 sequences on one gRPC stream
    python -m client --chunk 32 --seed 1                               # 32 characters per request (server samples)

The vocabulary comes from the server (the model config's vocab_json parameter). Without --chunk the server
returns the next character's logits and the client samples with the TensorFlow reference's sampler
(charrnn.sampling); with --chunk K a generation model (charrnn_gen_*, gRPC only) samples K characters per
request from the noise the client sends. Either way, with --greedy or a --seed the text equals `make sample`'s
(top-k works with --chunk, top-p does not). With --num-sequences N, sequence i uses seed + i.

Restart-safe: the text generated so far is kept here. If the server goes away or forgets a sequence, the
client reconnects (up to --retries times, waiting --retry-delay, doubling, at most --retry-max-wait in all),
re-primes a new sequence with prompt + generated text and continues: with --greedy or a --seed the final
text equals an uninterrupted run. If it gives up, what was generated so far is printed to stdout first.
HTTP inference needs the server's inference key in $TRITON_INFER_KEY or -H infer-key:KEY (gRPC needs none).
TLS (--ssl and the PEM files) is for gRPC only: for HTTPS, put a TLS-terminating proxy in front.
Every flag is checked before connecting; --top-k's upper bound (the vocabulary size) right after.
Exit codes: 0 ok, 1 --expect mismatch, 2 bad input (flags, prompt, a model the server does not have, a
header the server requires and did not get, tritonclient not installed), 3 server unreachable / model not ready
/ server error (after the retries), 130 interrupted (the sequences are ended on the server first).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from charrnn.cli import parser
from charrnn.contract import MAX_K
from charrnn.deployment import MAIN
from charrnn.errors import CheckFailed, cli
from charrnn.repository import GEN, STEP, names
from charrnn.sampling import add_sampling_flags, sampling_params


def connection_options(args: argparse.Namespace) -> dict:
    """The flags both check_connection and Connection take: timeout, shards and TLS."""
    return {
        "timeout": args.client_timeout,
        "shards": args.shards,
        "ssl": args.ssl,
        "root_certificates": args.root_certificates,
        "private_key": args.private_key,
        "certificate_chain": args.certificate_chain,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("python -m client", __doc__)
    g = p.add_argument_group("server")
    g.add_argument(
        "-u",
        "--url",
        default=None,
        help="host:port, or grpc://host:port / http://host:port (the scheme sets the protocol); "
        f"default 127.0.0.1:{MAIN.ports.grpc} (gRPC), 127.0.0.1:{MAIN.ports.http} with -i http",
    )
    g.add_argument(
        "-i",
        "--protocol",
        default=None,
        choices=["grpc", "http"],
        help="grpc: one bidirectional stream for all sequences; http: one request at a time each "
        "(default: the --url scheme's, else grpc)",
    )
    g.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="a header sent with every request (gRPC: on the stream and each call); repeatable",
    )
    g.add_argument(
        "--client-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="timeout for connecting and for each non-streaming call",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="tritonclient's verbose output and the client's progress, on stderr",
    )
    t = p.add_argument_group("TLS (gRPC only; --ssl with HTTP is an error)")
    t.add_argument("--ssl", action="store_true", help="connect over TLS")
    t.add_argument(
        "--root-certificates",
        metavar="FILE",
        help="PEM: the CAs to trust (default: the system's)",
    )
    t.add_argument("--private-key", metavar="FILE", help="PEM: the client's key (mutual TLS)")
    t.add_argument(
        "--certificate-chain",
        metavar="FILE",
        help="PEM: the client's certificate chain (mutual TLS)",
    )
    g.add_argument(
        "--shards",
        type=int,
        default=1,
        metavar="K",
        help="behind a proxy in front of N replicas (compose profile scale): K >= 2N gRPC streams, each "
        "routed by its own key; with HTTP, any K > 1 routes each sequence by its key",
    )
    g.add_argument(
        "-m",
        "--model",
        default=None,
        help=f"model to use (default: the first ready of {', '.join(names(graph=STEP))}; with "
        f"--chunk, of {', '.join(names(graph=GEN))})",
    )
    add_sampling_flags(p)
    g.add_argument(
        "--chunk",
        type=int,
        default=None,
        metavar="K",
        help=f"server-side generation: K characters per request (1..{MAX_K}) on a charrnn_gen_* model",
    )
    g = p.add_argument_group("retries")
    g.add_argument(
        "--retries",
        type=int,
        default=5,
        help="reconnect attempts per server outage before giving up (0: give up at once)",
    )
    g.add_argument(
        "--retry-delay",
        type=float,
        default=0.5,
        help="seconds before the first reconnect attempt; doubled per attempt (at most 8 s)",
    )
    g.add_argument(
        "--retry-max-wait",
        type=float,
        default=60.0,
        help="give up when the waits of one outage would exceed this many seconds",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--num-sequences", type=int, default=1, help="independent sequences generated in parallel"
    )
    g.add_argument(
        "--expect",
        default=None,
        help="exit 1 unless the generated text (of sequence 0) equals this",
    )
    g.add_argument("--quiet", action="store_true", help="print only the final texts")
    return check_args(p.parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Every flag checked before anything connects (exit 2), by the library's own checks (the ones Connection
    and complete() run on their arguments): client.connection.check_connection, client.generate.check_plan.
    After connecting only --top-k's upper bound (the vocabulary size) and the model remain. Resolves --url /
    --protocol, --header and the retry policy.
    """
    from .connection import check_connection
    from .generate import RetryPolicy, check_plan

    args.url, args.protocol, args.headers = check_connection(
        args.url, args.protocol, headers=args.header, **connection_options(args)
    )
    retry = RetryPolicy(retries=args.retries, delay=args.retry_delay, max_wait=args.retry_max_wait)
    _, args.retry = check_plan(
        [args.prompt],
        args.length,
        sampling_params(args),
        args.chunk,
        args.protocol,
        retry,
        sequences=args.num_sequences,
    )
    return args


def print_texts(
    seqs, vocab, model: str, args, params, stream_one: bool, partial: bool = False, out=None
) -> list[str]:
    """The final texts on stdout (a streamed single sequence is already there: end its line)."""
    out = out or sys.stdout
    texts = [vocab.decode(s.generated) for s in seqs]
    if stream_one:
        out.write("\n")
        out.flush()
        return texts
    for seq, text in zip(seqs, texts):
        note = (
            f"; partial: {len(text)} of {args.length} characters"
            if partial and len(text) < args.length
            else ""
        )
        print(
            f"=== sequence {seq.index} ({model}, seed {params[seq.index].seed}{note}) ===\n{args.prompt}{text}\n",
            file=out,
        )
    out.flush()
    return texts


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .connection import import_tritonclient

    import_tritonclient(args.protocol)  # not installed: exit 2, naming the extra
    out = sys.stdout  # the text; with --verbose, tritonclient's prints (to stdout) go to stderr
    if args.verbose:
        sys.stdout = sys.stderr
    try:
        return run(args, out)
    finally:
        sys.stdout = out


def run(args: argparse.Namespace, out) -> int:
    """Connect, pick the model, generate; the text goes to `out`."""
    from .connection import Connection
    from .generate import GenerationFailed, complete

    base = sampling_params(args)

    def note(message: str) -> None:
        if args.verbose:
            print(f"client: {message}", file=sys.stderr, flush=True)

    note(f"connecting to {args.protocol}://{args.url}{' (TLS)' if args.ssl else ''}")
    conn = Connection(
        args.url,
        args.protocol,
        headers=args.headers,
        verbose=args.verbose,
        **connection_options(args),
    )
    try:
        model = conn.pick_model(args.model, STEP if args.chunk is None else GEN)
        vocab = conn.vocabulary(model)
        note(f"model {model}: ready, vocabulary of {len(vocab)} characters")
        params = [base.validate(len(vocab))]
        params += [
            replace(base, seed=None if base.seed is None else base.seed + i)
            for i in range(1, args.num_sequences)
        ]
        stream_one = args.num_sequences == 1 and not args.quiet
        if stream_one:
            out.write(args.prompt)
            out.flush()

        mid_line = [False]  # a streamed line of text is open on stdout

        def on_text(index: int, text: str) -> None:
            if stream_one:
                out.write(text)
                out.flush()
                mid_line[0] = True

        def on_retry(message: str) -> None:  # on stderr, on a line of its own
            print(("\n" if mid_line[0] else "") + message, file=sys.stderr, flush=True)
            mid_line[0] = False

        try:
            seqs = complete(
                conn,
                model,
                vocab,
                [args.prompt] * args.num_sequences,
                args.length,
                params,
                chunk=args.chunk,
                on_text=on_text,
                retry=args.retry,
                on_retry=on_retry,
            )
        except GenerationFailed as e:  # nothing lost: print what was generated before giving up
            print_texts(e.sequences, vocab, model, args, params, stream_one, True, out)
            raise
    finally:
        conn.close()
    texts = print_texts(seqs, vocab, model, args, params, stream_one, out=out)
    per = f", {args.chunk} per request, {sum(s.sent for s in seqs)} requests" if args.chunk else ""
    print(
        f"[{model} via {args.protocol}://{conn.url}: {args.num_sequences} x {args.length} characters{per}]",
        file=sys.stderr,
    )
    if args.expect is not None and texts[0] != args.expect:
        raise CheckFailed("--expect", "the generated text differs from the expected text")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
