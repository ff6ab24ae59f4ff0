"""Loss and perplexity of a model directory on the held-out test split (`make evaluate`).

    python -m train.evaluate --model-dir models/shakespeare-lstm-2x512 [--split test|val|train]

Perplexity = exp(mean cross-entropy per predicted character), state carried through the whole split.
Exit codes: 0 ok, 2 bad model directory or data.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

from charrnn.cli import add_model_dir, parser
from charrnn.data import load_splits
from charrnn.errors import cli


def evaluate_loss(
    net, ids: np.ndarray, batch_size: int = 32, seq_len: int = 200, progress: bool = False
) -> tuple[float, int]:
    """Mean cross-entropy (nats) of the network `net` (a charrnn.model.CharRNN) predicting ids[1:] from ids[:-1],
    state carried along B streams.

    The text is cut into `batch_size` contiguous streams (the last < batch_size characters are
    dropped); each stream is read in chunks of `seq_len` with the state carried across chunks, so
    every character except a stream's first is predicted with its full left context in the stream.
    Returns (mean loss, number of predicted characters).
    """
    import tensorflow as tf

    batch_size = max(1, min(batch_size, (len(ids) - 1)))
    per = (len(ids) - 1) // batch_size
    x_all = ids[: batch_size * per].reshape(batch_size, per)  # (B, N)
    y_all = ids[1 : batch_size * per + 1].reshape(batch_size, per)

    chunk_loss = getattr(net, "_charrnn_chunk_loss", None)
    if chunk_loss is None:  # one traced function per network, reused by every evaluation of it

        @tf.function(reduce_retracing=True)
        def chunk_loss(x, y, state):
            logits, state = net(x, state, training=False)  # (B, t, V)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            return tf.reduce_sum(tf.cast(ce, tf.float64)), state

        object.__setattr__(net, "_charrnn_chunk_loss", chunk_loss)

    total, state = 0.0, net.zero_state(batch_size)
    starts = range(0, per, seq_len)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="evaluate", unit="chunk", leave=False)
    for s in starts:
        loss_sum, state = chunk_loss(x_all[:, s : s + seq_len], y_all[:, s : s + seq_len], state)
        total += float(loss_sum)
    count = batch_size * per
    return total / count, count


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m train.evaluate", __doc__)
    add_model_dir(p)
    p.add_argument(
        "--data", default="data/tinyshakespeare.txt", help="corpus the model was trained on"
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="split to evaluate (90/5/5)",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="parallel streams the split is cut into"
    )
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)

    from charrnn.model import load_model_dir, use_cpu_only

    use_cpu_only()
    net, vocab, card = load_model_dir(args.model_dir)
    _, train, val, test = load_splits(args.data, vocab)
    ids = {"train": train, "val": val, "test": test}[args.split]
    t0 = time.time()
    loss, count = evaluate_loss(net, ids, args.batch_size, progress=not args.json)
    result = {
        "split": args.split,
        "loss": loss,
        "perplexity": math.exp(loss),
        "characters": count,
        "seconds": round(time.time() - t0, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.model_dir}: {args.split} loss {loss:.4f} nats/char, perplexity {math.exp(loss):.3f} "
            f"over {count:,} characters ({result['seconds']} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
