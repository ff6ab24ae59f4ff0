"""Build perf_analyzer's `--input-data` JSON from the real test split: one stream of requests per sequence.

    python -m bench.perf_input --out bench/results/perf_input.json
    python -m bench.perf_input --streams 64 --prompt-length 64 --steps 256 --seed 0
    python -m bench.perf_input --chunk 32 --out bench/results/perf_input_gen.json    # charrnn_gen_python

With --chunk K the streams are for the generation models (charrnn_gen_*): each request asks for K characters,
so a stream is steps / K requests, the first carrying the prompt and each later one the next real character.
Every request also carries NOISE (K, V) seeded uniforms in (0, 1) (base64, float32 little-endian),
TEMPERATURE [1.0] and TOP_K [0]: what `python -m client --chunk K --seed S` sends.

Each stream is what a real client sends for one generation: the prompt as ONE request (INPUT_IDS of shape
[prompt_length]), then one request per generated character (shape [1]). Instead of sampled characters it sends
the next real character of the test split (teacher forcing): the load has the shapes of real traffic, is
reproducible, and needs no sampling loop inside perf_analyzer. Stream k is the test-split window
test[offset_k : offset_k + prompt_length + steps]; the offsets are distinct and drawn with --seed.

Format (perf_analyzer docs/input_data.md): {"data": [stream, stream, ...]}, each stream a list of steps, each step
{"INPUT_IDS": {"content": [ids], "shape": [T]}} with the shape WITHOUT the batch dim (the server config has
max_batch_size > 0, so perf_analyzer prepends the batch of 1). perf_analyzer plays one stream back on one sequence
id; run it with `--sequence-length <prompt steps + 1> --sequence-length-variation 0` (printed below) so every
sequence is exactly one stream. The ids use the corpus vocabulary, which is the model's vocabulary when the model
was trained on the same corpus (train.train builds it the same way).

Exit codes: 0 ok, 2 bad input.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np

from charrnn.cli import parser
from charrnn.contract import (
    GEN,
    INPUT_IDS,
    MAX_K,
    MAX_T,
    NOISE,
    STEP,
    TEMPERATURE,
    TOP_K,
    Tensor,
    request_inputs,
)
from charrnn.errors import UserError, cli


def pick_offsets(n_test: int, streams: int, window: int, seed: int) -> list[int]:
    """`streams` distinct start offsets of a `window`-character slice of an `n_test`-character split, sorted."""
    n_offsets = n_test - window + 1
    if n_offsets < 1:
        raise UserError(
            "--prompt-length/--steps",
            f"a stream needs {window:,} characters but the test split has only {n_test:,}",
            "use a smaller --prompt-length or --steps, or a larger corpus",
        )
    if streams > n_offsets:
        raise UserError(
            "--streams",
            f"{streams:,} distinct streams of {window:,} characters do not fit in a "
            f"{n_test:,}-character test split ({n_offsets:,} possible offsets)",
            "use fewer --streams or shorter streams",
        )
    rng = np.random.default_rng(seed)
    return sorted(int(o) for o in rng.choice(n_offsets, size=streams, replace=False))


def perf_tensor(t: Tensor, value) -> dict:
    """One input of one perf_analyzer step: `value` without the batch dim, in the table's dtype; a tensor of more
    than one dim as "b64" (little-endian), others as "content"."""
    a = np.asarray(value, t.dtype)
    if a.ndim > 1:
        return {
            "b64": base64.b64encode(a.astype(a.dtype.newbyteorder("<")).tobytes()).decode(),
            "shape": list(a.shape),
        }
    return {"content": a.tolist(), "shape": list(a.shape)}


def perf_step(graph: str, values: dict) -> dict:
    """One request of a stream: every input a client sends to a model of `graph` (charrnn.contract's table)."""
    return {t.name: perf_tensor(t, values[t.name]) for t in request_inputs(graph)}


def build_input_data(
    test_ids: np.ndarray, offsets: list[int], prompt_length: int, steps: int
) -> dict:
    """The perf_analyzer JSON object: per offset one stream = prompt request + `steps` one-character requests."""
    data = []
    for off in offsets:
        window = test_ids[off : off + prompt_length + steps].tolist()
        prompt, rest = window[:prompt_length], window[prompt_length:]
        stream = [perf_step(STEP, {INPUT_IDS: prompt})]
        stream += [perf_step(STEP, {INPUT_IDS: [i]}) for i in rest]
        data.append(stream)
    return {"data": data}


def build_gen_input_data(
    test_ids: np.ndarray,
    offsets: list[int],
    prompt_length: int,
    steps: int,
    k: int,
    vocab_size: int,
    seed: int,
) -> dict:
    """The perf_analyzer JSON for a generation model: per offset one stream of steps // k requests of k
    characters; the first carries the prompt, each later one the next real character (teacher-forced).
    """
    rng = np.random.default_rng(seed)
    data = []
    for off in offsets:
        window = test_ids[off : off + prompt_length + steps].tolist()
        stream = []
        for r in range(steps // k):
            ids = window[:prompt_length] if r == 0 else [window[prompt_length + r * k - 1]]
            noise = rng.uniform(np.finfo(np.float32).tiny, 1.0, (k, vocab_size))  # (K, V)
            values = {INPUT_IDS: ids, NOISE: noise, TEMPERATURE: [1.0], TOP_K: [0]}
            stream.append(perf_step(GEN, values))
        data.append(stream)
    return {"data": data}


def write_json(obj: dict, out: Path) -> None:
    """Write atomically (temp file + rename) so perf_analyzer never reads a half-written file."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n")
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(str(out), f"cannot write ({e.strerror})", "check --out") from e


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.perf_input", __doc__)
    p.add_argument(
        "--out", type=Path, default=Path("bench/results/perf_input.json"), help="JSON file to write"
    )
    p.add_argument(
        "--data", default="data/tinyshakespeare.txt", help="corpus; its fixed test split is used"
    )
    p.add_argument(
        "--streams",
        type=int,
        default=64,
        help="distinct streams (perf_analyzer hands them to new sequences round-robin)",
    )
    p.add_argument(
        "--prompt-length",
        type=int,
        default=64,
        help=f"characters in the first request of each stream (1..{MAX_T}, the per-request limit)",
    )
    p.add_argument("--steps", type=int, default=256, help="one-character requests after the prompt")
    p.add_argument(
        "--seed", type=int, default=0, help="seed for the stream offsets (and the NOISE)"
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        metavar="K",
        help=f"streams for a generation model (charrnn_gen_*): K characters per request (1..{MAX_K}, "
        "a divisor of --steps)",
    )
    args = p.parse_args(argv)

    # Check the flags before reading the corpus.
    if args.streams < 1:
        raise UserError("--streams", f"must be >= 1, got {args.streams}")
    if not 1 <= args.prompt_length <= MAX_T:
        raise UserError(
            "--prompt-length",
            f"must be in 1..{MAX_T}, got {args.prompt_length}",
            f"the served models accept at most MAX_T={MAX_T} characters per request",
        )
    if args.steps < 1:
        raise UserError("--steps", f"must be >= 1, got {args.steps}")
    if args.seed < 0:
        raise UserError("--seed", f"must be >= 0, got {args.seed}")
    if args.chunk is not None and not (1 <= args.chunk <= MAX_K and args.steps % args.chunk == 0):
        raise UserError(
            "--chunk", f"must be in 1..{MAX_K} and divide --steps ({args.steps}), got {args.chunk}"
        )

    from charrnn.data import load_splits  # NumPy-only part of charrnn.data

    text_vocab, _, _, test_ids = load_splits(args.data)
    offsets = pick_offsets(len(test_ids), args.streams, args.prompt_length + args.steps, args.seed)
    if args.chunk is None:
        write_json(build_input_data(test_ids, offsets, args.prompt_length, args.steps), args.out)
        requests = args.steps + 1
        what = f"prompt {args.prompt_length} chars, then {args.steps} x 1"
    else:
        write_json(
            build_gen_input_data(
                test_ids,
                offsets,
                args.prompt_length,
                args.steps,
                args.chunk,
                len(text_vocab),
                args.seed,
            ),
            args.out,
        )
        requests = args.steps // args.chunk
        what = (
            f"K = {args.chunk} characters each, the first with a {args.prompt_length}-char prompt"
        )
    print(
        f"{args.out}: {len(offsets)} streams x {requests} requests ({what}) from the test split of "
        f"{args.data}; perf_analyzer --sequence-length {requests} --sequence-length-variation 0"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
