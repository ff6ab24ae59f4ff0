"""Import a TF1 char-rnn model (a TensorFlow checkpoint or a sampleCharRNN .wts dump) into a model directory.

    python -m train.import_tf1 --wts char-rnn.wts --vocab-builtin samplecharrnn --out models/samplecharrnn
    python -m train.import_tf1 --checkpoint pretrained_shakespeare/best_model --out models/crazydonkey
    python -m train.import_tf1 --checkpoint save/ --vocab save/chars_vocab.pkl --trust-pickle --out models/sl

Sources (TF1 `tf.nn.rnn_cell` models; the checkpoint is read with tf.train.load_checkpoint, no graph):
  --checkpoint   a TF1 checkpoint: prefix (model-70280), its .index/.data file, or the directory
  --wts          TensorRT's samples/common/dumpTFWts.py dump: v2 (binary, the char-rnn.wts sampleCharRNN
                 loads) or v1 (hex); names are the checkpoint's with '/' -> '_'

Variable names (--naming; `auto` tries each):
  crazydonkey    crazydonkey200/tensorflow-char-rnn (sampleCharRNN's model): embedding,
                 rnn/multi_rnn_cell/cell_N/basic_lstm_cell/kernel|bias, softmax/softmax_w|softmax_b
  samplecharrnn  the same names as sampleCharRNN looks them up in the .wts (rnn_multi_rnn_cell_cell_0_...)
  sherjilozair   sherjilozair/char-rnn-tensorflow: embedding, rnnlm/multi_rnn_cell/cell_N/<cell>/...,
                 rnnlm/softmax_w|softmax_b
  --map OURNAME=THEIRNAME renames single variables; OURNAME is one of embedding, softmax_w, softmax_b,
  cell_N (a layer's cell scope), cell_N/kernel, cell_N/bias, cell_N/gates/kernel|bias,
  cell_N/candidate/kernel|bias.

Cells: BasicLSTMCell / LSTMCell (no peepholes, no projection) -> keras LSTM, GRUCell -> keras GRU
(reset_after=False), BasicRNNCell -> keras SimpleRNN. TF1 adds the LSTM forget_bias at run time (it is not in
the checkpoint); the importer adds it to the forget-gate bias. Its default follows the naming: 0.0 for
crazydonkey/samplecharrnn (that project hard-codes forget_bias=0.0), TF's default 1.0 otherwise.

Vocabulary (ids must be the model's): --vocab FILE (our vocab.json {"chars": [...]}, crazydonkey's
vocab.json {char: id}, or a text file whose characters, in order, are ids 0..V-1), --vocab-builtin
samplecharrnn (the 65-character map compiled into sampleCharRNN), or a pickle (sherjilozair's
chars_vocab.pkl / vocab.pkl) with --trust-pickle (loaded data-only: a pickle that imports or calls anything is
refused). Without --vocab, a vocab.json next to the checkpoint is used.

Exit codes: 0 ok, 2 bad flags, files, names or shapes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from charrnn.cli import parser
from charrnn.data import md5_of
from charrnn.errors import UserError, cli
from charrnn.vocab import Vocab

from .convert import CONVERSION_NOTES, build_keras, choose_forget_bias, convert
from .naming import MAP_HELP, NAMINGS, choose_plan, parse_maps
from .sources import CheckpointStore, WtsStore
from .vocab import BUILTIN_VOCABS, find_vocab, load_vocab

PROG = "python -m train.import_tf1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(PROG, __doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", metavar="PATH", help="TF1 checkpoint prefix, .index file or directory"
    )
    src.add_argument("--wts", metavar="FILE", help="TensorRT .wts dump (dumpTFWts.py, v1 or v2)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--force", action="store_true", help="overwrite a model already in --out")
    voc = p.add_mutually_exclusive_group()
    voc.add_argument(
        "--vocab",
        metavar="FILE",
        help="vocab.json ({'chars': [...]} or {char: id}), text, or pickle",
    )
    voc.add_argument(
        "--vocab-builtin",
        choices=sorted(BUILTIN_VOCABS),
        help="samplecharrnn: the 65-character map compiled into sampleCharRNN",
    )
    p.add_argument("--naming", choices=NAMINGS, default="auto", help="variable naming scheme")
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="OURNAME=THEIRNAME",
        help=f"rename one variable (repeatable); OURNAME: {MAP_HELP}",
    )
    p.add_argument(
        "--cell", choices=["lstm", "gru", "rnn"], help="expected cell (default: detected)"
    )
    p.add_argument(
        "--forget-bias",
        type=float,
        default=None,
        help="LSTM forget_bias the model was trained with (default: 0.0 for crazydonkey/"
        "samplecharrnn naming, else TF's 1.0; required when cells are named with --map)",
    )
    p.add_argument(
        "--input",
        choices=["auto", "embedding", "onehot"],
        default="auto",
        help="embedding variable, or one-hot characters (auto: embedding if present)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickled vocabulary (unpickling can run arbitrary code)",
    )
    return p.parse_args(argv)


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    maps = parse_maps(args.map)
    out = Path(args.out)
    if out.is_dir() and not args.force:
        from charrnn.model import (
            WEIGHTS_FILE,  # imports TensorFlow (seconds): only when there is a dir to look in
        )

        if (out / WEIGHTS_FILE).exists():
            raise UserError(
                str(out), "already holds a model", "pass --force to overwrite it, or another --out"
            )
    source = args.checkpoint or args.wts
    if not Path(source).exists() and args.wts:
        raise UserError(source, ".wts file not found", "check --wts")

    # The vocabulary first: it is cheap, and a pickle refusal should not wait for TensorFlow.
    vocab_path = None
    if args.vocab_builtin:
        vocab = Vocab(list(BUILTIN_VOCABS[args.vocab_builtin]))
        vocab_source = f"builtin:{args.vocab_builtin}"
    else:
        vocab_path = (
            Path(args.vocab)
            if args.vocab
            else (find_vocab(Path(source)) if args.checkpoint else None)
        )
        if vocab_path is None:
            raise UserError(
                "vocabulary",
                "the weights do not say which character each id is",
                "pass --vocab FILE (vocab.json, chars_vocab.pkl with --trust-pickle, ...) or "
                "--vocab-builtin samplecharrnn for sampleCharRNN's char-rnn.wts",
            )
        vocab = load_vocab(str(vocab_path), args.trust_pickle)
        vocab_source = str(vocab_path)

    store = WtsStore(source) if args.wts else CheckpointStore(source)
    plan = choose_plan(store, args.naming, maps, args.cell, source)
    forget_bias = choose_forget_bias(args.forget_bias, maps, plan.scheme)
    imp = convert(store, plan, args.cell, forget_bias, args.input, source)
    if len(vocab) != imp.vocab_size:
        raise UserError(
            "vocabulary",
            f"{vocab_source} has {len(vocab)} characters but the weights "
            f"{imp.vocab_size} (softmax_b {plan.names['softmax_b']})",
            "pass the vocabulary the model was trained with",
        )

    from charrnn.model import use_cpu_only

    use_cpu_only()  # before TensorFlow's first op, building the network (the checkpoint reader starts no device)
    config, net = build_keras(imp)
    from charrnn.model import keras, save_model_dir, tf  # already imported by build_keras

    fb_note = (
        f"--forget-bias {forget_bias}"
        if args.forget_bias is not None
        else f"default for {plan.scheme.name}: {plan.scheme.forget_bias_why}"
    )
    files = [{"file": str(p.resolve()), "md5": md5_of(p)} for p in store.files()]
    if vocab_path is not None:
        files.append(
            {"file": str(vocab_path.resolve()), "md5": md5_of(vocab_path), "role": "vocabulary"}
        )
    card = {
        "name": out.name,
        "architecture": json.loads(config.to_json()),
        "parameters": int(sum(np.prod(v.shape) for v in net.trainable_variables)),
        "vocab_size": imp.vocab_size,
        "imported_from": {
            "source": str(Path(source).resolve()),
            "checkpoint_prefix": (
                str(Path(store.prefix).resolve()) if isinstance(store, CheckpointStore) else None
            ),
            "format": store.format,
            "naming": plan.scheme.name,
            "naming_source": plan.scheme.source,
            "maps": maps,
            "variables": imp.variables,
            "cell": imp.cell,
            "tf1_cell": imp.cell_class,
            "forget_bias": forget_bias if imp.cell == "lstm" else None,
            "forget_bias_source": fb_note if imp.cell == "lstm" else None,
            "input": imp.input,
            "vocabulary": vocab_source,
            "files": files,
            "conversion": CONVERSION_NOTES[imp.cell],
        },
        "software": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
        "imported_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": f"{PROG} " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    save_model_dir(out, net, vocab, card)
    fb = (
        f", forget_bias {forget_bias:g} ({'flag' if args.forget_bias is not None else 'default'})"
        if imp.cell == "lstm"
        else ""
    )
    print(
        f"imported {source} ({store.format}, naming {plan.scheme.name}): {imp.layers} x {imp.cell_class} "
        f"{imp.hidden}, {imp.input} {imp.embedding}, vocabulary {imp.vocab_size}{fb}; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
