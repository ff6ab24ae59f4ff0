"""Generate text through a Triton server, character by character (`python -m client`).

    python -m client --prompt "ROMEO:" --length 500                    # local server from `make serve`
    python -m client --url 127.0.0.1:8001 --model charrnn_trt --greedy
    python -m client --num-sequences 8 --seed 1 --temperature 0.8       # 8 sequences on one gRPC stream

The vocabulary comes from the server (the model config's vocab_json parameter). Sampling is the same
code as the TensorFlow reference sampler (charrnn.sampling), so with --greedy or a --seed the text equals
`make sample`'s. With --num-sequences N, sequence i uses seed + i.
Exit codes: 0 ok, 1 --expect mismatch, 2 bad input, 3 server unreachable / model not ready / server error,
130 interrupted (the sequences are ended on the server first).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from charrnn.errors import CheckFailed, UserError, cli
from train.sample import add_sampling_flags, sampling_params


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = p.add_argument_group("server")
    g.add_argument("--url", default="127.0.0.1:8001", help="host:port (gRPC 8001, HTTP 8000)")
    g.add_argument("--protocol", default="grpc", choices=["grpc", "http"],
                   help="grpc: one bidirectional stream for all sequences; http: one request at a time each")
    g.add_argument("--model", default=None,
                   help="model to use (default: first ready of charrnn_trt, charrnn_onnx, charrnn_python)")
    add_sampling_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--num-sequences", type=int, default=1, help="independent sequences generated in parallel")
    g.add_argument("--expect", default=None, help="exit 1 unless the generated text (of sequence 0) equals this")
    g.add_argument("--quiet", action="store_true", help="print only the final texts")
    args = p.parse_args(argv)
    if args.length < 1:
        raise UserError("--length", f"must be >= 1, got {args.length}")
    if not args.prompt:
        raise UserError("--prompt", "is empty", "give at least one character")
    if args.num_sequences < 1:
        raise UserError("--num-sequences", f"must be >= 1, got {args.num_sequences}")
    return args


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = sampling_params(args)
    from client.generate import generate
    from client.session import Connection

    conn = Connection(args.url, args.protocol)
    try:
        model = conn.pick_model(args.model)
        vocab = conn.vocabulary(model)
        params = [base.validate(len(vocab))]
        params += [replace(base, seed=None if base.seed is None else base.seed + i)
                   for i in range(1, args.num_sequences)]
        stream_one = args.num_sequences == 1 and not args.quiet
        if stream_one:
            sys.stdout.write(args.prompt)
            sys.stdout.flush()

        def on_char(index: int, char: str) -> None:
            if stream_one:
                sys.stdout.write(char)
                sys.stdout.flush()

        seqs = generate(conn, model, vocab, [args.prompt] * args.num_sequences, args.length, params, on_char)
    finally:
        conn.close()
    texts = [vocab.decode(s.generated) for s in seqs]
    if stream_one:
        sys.stdout.write("\n")
    else:
        for seq, text in zip(seqs, texts):
            seed = params[seq.index].seed
            print(f"=== sequence {seq.index} ({model}, seed {seed}) ===\n{args.prompt}{text}\n")
    print(f"[{model} via {args.protocol}://{conn.url}: {args.num_sequences} x {args.length} characters]",
          file=sys.stderr)
    if args.expect is not None and texts[0] != args.expect:
        raise CheckFailed("--expect", "the generated text differs from the expected text")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
