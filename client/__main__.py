"""Generate text through a Triton server (`python -m client`).

    python -m client --prompt "ROMEO:" --length 500                    # local server from `make serve`
    python -m client --url 127.0.0.1:8001 --model charrnn_trt --greedy
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
HTTP inference needs the server's inference key in $TRITON_INFER_KEY (gRPC needs none).
Exit codes: 0 ok, 1 --expect mismatch, 2 bad input, 3 server unreachable / model not ready / server error
(after the retries), 130 interrupted (the sequences are ended on the server first).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from charrnn.cli import parser
from charrnn.contract import MAX_K, MAX_SEQUENCES
from charrnn.errors import CheckFailed, UserError, cli
from charrnn.repository import GEN, STEP, names
from charrnn.sampling import add_sampling_flags, sampling_params


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("python -m client", __doc__)
    g = p.add_argument_group("server")
    g.add_argument("--url", default="127.0.0.1:8001", help="host:port (gRPC 8001, HTTP 8000)")
    g.add_argument(
        "--protocol",
        default="grpc",
        choices=["grpc", "http"],
        help="grpc: one bidirectional stream for all sequences; http: one request at a time each",
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
    args = p.parse_args(argv)
    if args.length < 1:
        raise UserError("--length", f"must be >= 1, got {args.length}")
    if not args.prompt:
        raise UserError("--prompt", "is empty", "give at least one character")
    if not 1 <= args.num_sequences <= MAX_SEQUENCES:
        raise UserError(
            "--num-sequences",
            f"must be in 1..{MAX_SEQUENCES} (the sequence slots of a model "
            f"instance), got {args.num_sequences}",
            "run several clients one after another",
        )
    from .generate import RetryPolicy, check_chunk

    check_chunk(args.chunk)
    if args.chunk is not None and args.protocol != "grpc":
        raise UserError(
            "--chunk",
            "needs gRPC (one stream for every sequence; streaming responses)",
            "use --protocol grpc and the gRPC port (8001)",
        )
    args.retry = RetryPolicy(
        retries=args.retries, delay=args.retry_delay, max_wait=args.retry_max_wait
    ).validate()
    return args


def print_texts(
    seqs, vocab, model: str, args, params, stream_one: bool, partial: bool = False
) -> list[str]:
    """The final texts on stdout (a streamed single sequence is already there: end its line)."""
    texts = [vocab.decode(s.generated) for s in seqs]
    if stream_one:
        sys.stdout.write("\n")
        sys.stdout.flush()
        return texts
    for seq, text in zip(seqs, texts):
        note = (
            f"; partial: {len(text)} of {args.length} characters"
            if partial and len(text) < args.length
            else ""
        )
        print(
            f"=== sequence {seq.index} ({model}, seed {params[seq.index].seed}{note}) ===\n{args.prompt}{text}\n"
        )
    sys.stdout.flush()
    return texts


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = sampling_params(args)
    replace(base, top_k=0).validate(1)  # all but top-k (it needs the vocabulary) before connecting
    from .connection import Connection
    from .generate import GenerationFailed, generate

    conn = Connection(args.url, args.protocol, shards=args.shards)
    try:
        model = conn.pick_model(args.model, STEP if args.chunk is None else GEN)
        vocab = conn.vocabulary(model)
        params = [base.validate(len(vocab))]
        params += [
            replace(base, seed=None if base.seed is None else base.seed + i)
            for i in range(1, args.num_sequences)
        ]
        stream_one = args.num_sequences == 1 and not args.quiet
        if stream_one:
            sys.stdout.write(args.prompt)
            sys.stdout.flush()

        mid_line = [False]  # a streamed line of text is open on stdout

        def on_text(index: int, text: str) -> None:
            if stream_one:
                sys.stdout.write(text)
                sys.stdout.flush()
                mid_line[0] = True

        def on_retry(message: str) -> None:  # on stderr, on a line of its own
            print(("\n" if mid_line[0] else "") + message, file=sys.stderr, flush=True)
            mid_line[0] = False

        try:
            seqs = generate(
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
            print_texts(e.sequences, vocab, model, args, params, stream_one, partial=True)
            raise
    finally:
        conn.close()
    texts = print_texts(seqs, vocab, model, args, params, stream_one)
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
