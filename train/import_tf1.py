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
import hashlib
import json
import pickle
import platform
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from charrnn.errors import UserError, cli
from charrnn.vocab import Vocab

# --- built-in vocabulary --------------------------------------------------------------------------

# sampleCharRNN's `SampleCharRNNMaps::idToChar` (NVIDIA/TensorRT samples/sampleCharRNN/sampleCharRNN.cpp),
# identical to crazydonkey200/tensorflow-char-rnn's pretrained_shakespeare/vocab.json. It is the Tiny
# Shakespeare character set, but NOT sorted: crazydonkey numbered `set(text)` in Python 2's set order, which
# swaps neighbours (' ' is 2, '!' is 1, 'B' is 15, 'C' is 14, ...). Id i is character SAMPLECHARRNN_CHARS[i].
SAMPLECHARRNN_CHARS = (
    "\n! $'&-,.3;:?ACBEDGFIHKJMLONQPSRUTWVYXZacbedgfihkjmlonqpsrutwvyxz"
)
BUILTIN_VOCABS = {"samplecharrnn": SAMPLECHARRNN_CHARS}

# --- naming schemes -------------------------------------------------------------------------------

# Cell scope name (TF1 layer name) -> (our cell, TF1 class).
CELL_SCOPES = {
    "basic_lstm_cell": ("lstm", "BasicLSTMCell"),
    "lstm_cell": ("lstm", "LSTMCell"),
    "gru_cell": ("gru", "GRUCell"),
    "basic_rnn_cell": ("rnn", "BasicRNNCell"),
}
# TF >= 1.2 names a cell's variables kernel/bias; TF 1.0-1.1 called them weights/biases.
KERNEL_NAMES = ("kernel", "weights")
BIAS_NAMES = ("bias", "biases")


@dataclass(frozen=True)
class Scheme:
    name: str
    multi: str  # scope of the MultiRNNCell; layer N's cell is <multi>/cell_N/<cell scope>
    embedding: str
    softmax_w: str
    softmax_b: str
    forget_bias: float  # the forget_bias the project's LSTM cells were built with
    forget_bias_why: str
    source: str


SCHEMES = {
    "crazydonkey": Scheme(
        "crazydonkey", "rnn/multi_rnn_cell", "embedding", "softmax/softmax_w", "softmax/softmax_b", 0.0,
        "crazydonkey200/tensorflow-char-rnn builds its LSTM cells with forget_bias=0.0",
        "https://github.com/crazydonkey200/tensorflow-char-rnn (char_rnn_model.py)"),
    "samplecharrnn": Scheme(
        "samplecharrnn", "rnn/multi_rnn_cell", "embedding", "softmax/softmax_w", "softmax/softmax_b", 0.0,
        "sampleCharRNN's model was trained by crazydonkey200/tensorflow-char-rnn (forget_bias=0.0) and the "
        "sample adds no forget bias",
        "https://github.com/NVIDIA/TensorRT samples/sampleCharRNN (weights dumped by samples/common/dumpTFWts.py)"),
    "sherjilozair": Scheme(
        "sherjilozair", "rnnlm/multi_rnn_cell", "embedding", "rnnlm/softmax_w", "rnnlm/softmax_b", 1.0,
        "sherjilozair/char-rnn-tensorflow uses TF's default BasicLSTMCell(forget_bias=1.0)",
        "https://github.com/sherjilozair/char-rnn-tensorflow (model.py)"),
}
NAMINGS = ("auto", "crazydonkey", "sherjilozair", "samplecharrnn")
TF_DEFAULT_FORGET_BIAS = 1.0

_OUR_NAME = re.compile(r"^(embedding|softmax_w|softmax_b|cell_\d+(/(kernel|bias|gates/kernel|gates/bias|"
                       r"candidate/kernel|candidate/bias))?)$")
MAP_HELP = ("embedding, softmax_w, softmax_b, cell_N, cell_N/kernel, cell_N/bias, cell_N/gates/kernel, "
            "cell_N/gates/bias, cell_N/candidate/kernel, cell_N/candidate/bias")


def parse_maps(items: list[str]) -> dict[str, str]:
    maps: dict[str, str] = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        ours, theirs = ours.strip().strip("/"), theirs.strip()
        if not sep or not ours or not theirs:
            raise UserError("--map", f"{item!r} is not OURNAME=THEIRNAME", f"OURNAME is one of {MAP_HELP}")
        if not _OUR_NAME.match(ours):
            raise UserError("--map", f"unknown OURNAME {ours!r}", f"use one of {MAP_HELP}")
        maps[ours] = theirs
    return maps


# --- weight sources -------------------------------------------------------------------------------


class Store:
    """Named arrays from a checkpoint or a .wts file. `shape` is None when the file does not record it."""

    format = ""

    def names(self) -> list[str]:
        raise NotImplementedError

    def key(self, name: str) -> str:
        return name

    def has(self, name: str) -> bool:
        return self.key(name) in self._shapes

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self._shapes[self.key(name)]

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError


class CheckpointStore(Store):
    format = "tf1-checkpoint"

    def __init__(self, path: str) -> None:
        self.prefix = resolve_checkpoint(path)
        from charrnn.model import tf  # charrnn.model sets TensorFlow's environment before importing it

        try:
            self.reader = tf.train.load_checkpoint(self.prefix)
        except Exception as e:  # NotFoundError, DataLossError, ... for missing or corrupt files
            raise UserError(path, f"cannot read the TensorFlow checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})",
                            "pass the checkpoint prefix (model-1234), its .index file or its directory") from e
        self._shapes = {k: tuple(v) for k, v in self.reader.get_variable_to_shape_map().items()}
        if any(".ATTRIBUTES/" in k for k in self._shapes):
            raise UserError(path, "this is a TF2 object-based checkpoint (tf.train.Checkpoint), not a TF1 one",
                            "TF2/Keras checkpoints of this project are loaded with charrnn.model.load_model_dir")

    def names(self) -> list[str]:
        return sorted(self._shapes)

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self.reader.get_tensor(name))

    def files(self) -> list[Path]:
        d, base = Path(self.prefix).parent, Path(self.prefix).name
        return sorted(p for p in d.iterdir()
                      if p.name == base or p.name == base + ".index" or p.name.startswith(base + ".data-"))


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a prefix, an .index/.data-*/.meta file, or a directory."""
    p = Path(path)
    if p.is_dir():
        from charrnn.model import tf  # sets TensorFlow's environment before importing it

        latest = tf.train.latest_checkpoint(str(p))
        # The `checkpoint` state file may hold absolute paths from the machine it was trained on.
        if latest and not Path(latest + ".index").exists():
            latest = str(p / Path(latest).name) if Path(str(p / Path(latest).name) + ".index").exists() else None
        if not latest:
            indexes = sorted(p.glob("*.index"), key=lambda f: f.stat().st_mtime)
            if not indexes:
                raise UserError(path, "no TF checkpoint in this directory (no *.index file)",
                                "pass the checkpoint prefix, e.g. DIR/model.ckpt-1000")
            latest = str(indexes[-1])[: -len(".index")]
        return latest
    m = re.match(r"^(.*)\.(index|meta|data-\d+-of-\d+)$", str(p))
    prefix = m.group(1) if m else str(p)
    if not (Path(prefix + ".index").exists() or Path(prefix).is_file()):  # V2 checkpoint, or a V1 single file
        raise UserError(path, "checkpoint not found", "pass the prefix (model-1234: model-1234.index must "
                                                      "exist), an .index file or the checkpoint directory")
    return prefix


# TensorRT DataType enum values (NvInfer.h) used by the .wts format.
WTS_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2"), 2: np.dtype("i1"), 3: np.dtype("<i4")}
_TRT_TYPE = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int8): 2, np.dtype(np.int32): 3}


class WtsStore(Store):
    """TensorRT's .wts weight dump (samples/common/dumpTFWts.py; read by sampleCharRNN's `loadWeights`).

    `<count>\\n`, then per buffer, sorted by the checkpoint key, with '/' in names replaced by '_':
      v2: `<name> <type> (<shape as a Python tuple>) ` + the raw little-endian bytes + `\\n`
      v1: `<name> <type> <element count> ` + one hex float32 bit pattern (no 0x) + ` ` per element + `\\n`
    <type> is TensorRT's DataType (0 float32, 1 half, 2 int8, 3 int32). v1 records no shape.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise UserError(path, f"cannot read the .wts file ({e.strerror})", "check the path") from e
        self._arrays: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[int, ...] | None] = {}
        self.versions: set[str] = set()
        self._parse(data)
        self.format = "wts-" + "+".join(sorted(self.versions)) if self.versions else "wts"

    def _bad(self, why: str) -> UserError:
        return UserError(self.path, f"not a valid TensorRT .wts weight file: {why}",
                         "pass a file written by TensorRT's samples/common/dumpTFWts.py")

    def _parse(self, data: bytes) -> None:
        pos, n = 0, len(data)

        def skip_ws() -> None:
            nonlocal pos
            while pos < n and data[pos] in b" \t\r\n":
                pos += 1

        def token() -> str:
            nonlocal pos
            skip_ws()
            start = pos
            while pos < n and data[pos] not in b" \t\r\n(":
                pos += 1
            if start == pos:
                raise self._bad(f"unexpected end of file at byte {pos}")
            return data[start:pos].decode("latin-1")

        head = token()
        if not head.isdigit() or int(head) < 1:
            raise self._bad(f"the first line must be the number of buffers, got {head[:40]!r}")
        for i in range(int(head)):
            name = token()
            type_tok = token()
            if not type_tok.isdigit() or int(type_tok) not in WTS_DTYPES:
                raise self._bad(f"buffer {i} ({name!r}): unknown type {type_tok[:20]!r} (0-3 expected)")
            dtype = WTS_DTYPES[int(type_tok)]
            skip_ws()
            if pos < n and data[pos] == ord("("):  # v2: (d0, d1, ...) then one space, the bytes, '\n'
                end = data.find(b")", pos)
                if end < 0:
                    raise self._bad(f"buffer {name!r}: unterminated shape")
                dims = [d.strip().rstrip("L") for d in data[pos + 1:end].decode("latin-1").split(",")]
                try:
                    shape = tuple(int(d) for d in dims if d)
                except ValueError:
                    raise self._bad(f"buffer {name!r}: bad shape {data[pos:end + 1]!r}") from None
                count = int(np.prod(shape, dtype=np.int64))
                start = end + 2  # ')' and the space
                stop = start + count * dtype.itemsize
                if stop > n:
                    raise self._bad(f"buffer {name!r} {shape} is truncated ({n - start} of "
                                    f"{count * dtype.itemsize} bytes)")
                self._arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)
                self._shapes[name] = shape
                pos = stop
                if pos < n and data[pos] == ord("\n"):
                    pos += 1
                self.versions.add("v2")
            else:  # v1: element count, then that many hex words
                count_tok = token()
                if not count_tok.isdigit():
                    raise self._bad(f"buffer {name!r}: expected '(shape)' or an element count, got "
                                    f"{count_tok[:20]!r}")
                words = []
                for _ in range(int(count_tok)):
                    words.append(int(token().rstrip("L"), 16))
                self._arrays[name] = np.array(words, dtype=np.uint32).view(np.float32)
                self._shapes[name] = None
                self.versions.add("v1")

    def key(self, name: str) -> str:
        return name.replace("/", "_")

    def names(self) -> list[str]:
        return sorted(self._arrays)

    def get(self, name: str) -> np.ndarray:
        return self._arrays[self.key(name)]

    def files(self) -> list[Path]:
        return [Path(self.path)]


def write_wts(path: str | Path, tensors: dict[str, np.ndarray], version: int = 2) -> None:
    """Write `tensors` ({checkpoint name: array}) as dumpTFWts.py does: sorted keys, '/' -> '_'.

    v2 is what sampleCharRNN's loadWeights reads; v1 is the older hex text form. Unlike dumpTFWts.py, which
    always writes type 0, the type field is the array's real TensorRT DataType (0 for the float32 weights).
    """
    out = [b"%d\n" % len(tensors)]
    for key in sorted(tensors):
        arr = np.asarray(tensors[key])
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        if arr.dtype not in _TRT_TYPE:
            raise ValueError(f"{key}: dtype {arr.dtype} has no TensorRT DataType")
        file_key = key.replace("/", "_").encode()
        if version == 2:
            out.append(b"%s %d %s " % (file_key, _TRT_TYPE[arr.dtype], repr(tuple(arr.shape)).encode()))
            out.append(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())
        elif version == 1:
            out.append(b"%s 0 %d " % (file_key, arr.size))
            out.append(b"".join(b"%x " % w for w in arr.astype("<f4").ravel().view(np.uint32).tolist()))
        else:
            raise ValueError(f"version must be 1 or 2, got {version}")
        out.append(b"\n")
    Path(path).write_bytes(b"".join(out))


# --- vocabulary -----------------------------------------------------------------------------------

_PICKLE_SUFFIXES = (".pkl", ".pickle", ".p")


def _looks_pickled(path: Path) -> bool:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return True
    with path.open("rb") as f:
        return f.read(1) == b"\x80"  # pickle protocol >= 2


def _vocab_from_obj(obj, what: str) -> Vocab:
    """chars in id order from: {"chars": [...]}, {char: id}, [chars], "chars", or (chars, {char: id})."""
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], dict):  # sherjilozair (chars, vocab)
        chars, index = list(obj[0]), obj[1]
        if any(index.get(c) != i for i, c in enumerate(chars)):
            raise UserError(what, "the (chars, vocab) pair disagrees with itself", "check the file")
        obj = chars
    if isinstance(obj, dict) and "chars" in obj:
        obj = obj["chars"]
    if isinstance(obj, dict):  # crazydonkey's vocab.json: {char: id}
        ids = sorted(obj.values()) if all(isinstance(v, int) for v in obj.values()) else None
        if ids != list(range(len(obj))):
            raise UserError(what, "a {char: id} vocabulary must number its characters 0..V-1",
                            "check the file")
        obj = sorted(obj, key=obj.get)
    if isinstance(obj, (bytes, bytearray)):
        obj = obj.decode("latin-1")
    if isinstance(obj, (str, list, tuple)):
        chars = [c.decode("latin-1") if isinstance(c, bytes) else c for c in obj]
        if all(isinstance(c, str) for c in chars):
            try:
                return Vocab(chars)
            except UserError as e:
                raise UserError(what, e.why, "each id needs exactly one distinct character") from e
    raise UserError(what, f"unrecognised vocabulary ({type(obj).__name__})",
                    'use {"chars": [...]}, {char: id}, a list of characters or a text file')


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only (str, bytes, int, tuple, list, dict, ...): every global is refused, so a
    pickle cannot import or call anything. A char-rnn vocabulary pickle needs no globals."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only plain data (str, list, dict, ...) is loaded")


def load_vocab(path: str, trust_pickle: bool) -> Vocab:
    p = Path(path)
    if not p.is_file():
        raise UserError(path, "vocabulary file not found", "check --vocab")
    if _looks_pickled(p):
        if not trust_pickle:
            raise UserError(path, "this is a Python pickle, and loading a pickle can run arbitrary code",
                            "pass --trust-pickle only if you trust where the file came from, or convert it "
                            "to a vocab.json")
        try:
            with p.open("rb") as f:
                obj = _DataOnlyUnpickler(f, encoding="latin1").load()  # Python 2 pickles (str chars) load too
        except Exception as e:
            raise UserError(path, f"cannot unpickle ({type(e).__name__}: {e})", "check the file") from e
        return _vocab_from_obj(obj, path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(path, f"not UTF-8 text ({e})", "pass a vocab.json or a UTF-8 text file") from e
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
        try:
            return _vocab_from_obj(json.loads(text), path)
        except ValueError as e:
            if p.suffix.lower() == ".json":
                raise UserError(path, f"not valid JSON ({e})", "fix the file") from e
            # not JSON after all: a text vocabulary that starts with '{' or '['
    from collections import Counter

    dupes = sorted(c for c, n in Counter(text).items() if n > 1)
    if dupes:
        raise UserError(path, f"a text vocabulary lists each character once (id = position); "
                              f"{len(dupes)} repeat, e.g. {dupes[:5]}",
                        "this looks like a corpus: the ids of a TF1 model are its own, pass its vocab file")
    return _vocab_from_obj(text, path)


def find_vocab(source: Path) -> Path | None:
    """A vocab.json next to the checkpoint (crazydonkey writes it one level above best_model/)."""
    base = source if source.is_dir() else source.parent
    for d in (base, base.parent):
        if (d / "vocab.json").is_file():
            return d / "vocab.json"
    return None


# --- reading the model ----------------------------------------------------------------------------


@dataclass
class Layer:
    scope: str
    cell_class: str
    names: dict[str, str]  # our name (kernel, bias, gates/kernel, ...) -> name in the store


@dataclass
class Plan:
    scheme: Scheme
    cell: str
    layers: list[Layer]
    names: dict[str, str] = field(default_factory=dict)  # our name -> store name (softmax_w, softmax_b)
    embedding: str = ""  # may be absent (one-hot input)


class Resolver:
    def __init__(self, store: Store, scheme: Scheme, maps: dict[str, str]) -> None:
        self.store, self.scheme, self.maps = store, scheme, maps

    def top(self, ours: str) -> str:
        return self.maps.get(ours, getattr(self.scheme, ours))

    def first(self, candidates: list[str]) -> str | None:
        return next((c for c in candidates if self.store.has(c)), None)

    def layer(self, i: int, cell: str | None) -> Layer | None:
        """Layer i's variables, or None when the layer does not exist."""
        key = f"cell_{i}"
        if key in self.maps:  # a mapped scope ending in a known cell scope (.../basic_lstm_cell) says its class
            scope = self.maps[key].rstrip("/")
            last = scope.rsplit("/", 1)[-1]
            scopes = [(scope, last if last in CELL_SCOPES else None)]
        else:
            scopes = [(f"{self.scheme.multi}/{key}/{s}", s) for s in CELL_SCOPES]
        # Explicitly mapped variables of this layer (cell_N/kernel=...) override or stand alone.
        explicit = {k.split("/", 1)[1]: v for k, v in self.maps.items() if k.startswith(key + "/")}
        for scope, scope_name in scopes:
            def find(ours: str) -> str | None:
                pre, _, last = ours.rpartition("/")
                alts = KERNEL_NAMES if last == "kernel" else BIAS_NAMES
                return self.first([f"{scope}/{pre + '/' if pre else ''}{a}" for a in alts])

            gru = {k: find(k) for k in ("gates/kernel", "gates/bias", "candidate/kernel", "candidate/bias")}
            plain = {k: find(k) for k in ("kernel", "bias")}
            if scope_name is not None:
                kind, cls = CELL_SCOPES[scope_name]
            elif gru["gates/kernel"] or "gates/kernel" in explicit:
                kind, cls = "gru", "GRUCell"
            else:
                kind, cls = None, ""  # LSTM or basic RNN: told apart by the bias width in convert()
            names = gru if kind == "gru" else plain
            if not any(names.values()) or (cell is not None and kind is not None and kind != cell):
                continue  # nothing of this cell type under this scope
            return Layer(scope, cls, {**names, **{k: v for k, v in explicit.items() if k in names}})
        if explicit:
            gru = "gates/kernel" in explicit
            wanted = ("gates/kernel", "gates/bias", "candidate/kernel", "candidate/bias") if gru else ("kernel", "bias")
            return Layer(key, "GRUCell" if gru else "", {k: explicit.get(k) for k in wanted})
        return None

    def plan(self, cell: str | None) -> Plan:
        names = {k: self.top(k) for k in ("softmax_w", "softmax_b")}
        layers = []
        while (layer := self.layer(len(layers), cell)) is not None:
            layers.append(layer)
        return Plan(self.scheme, cell or "", layers, names, self.top("embedding"))

    def missing(self, plan: Plan) -> list[str]:
        """Names this scheme expects that are not in the store (cell_0's when no layer was found)."""
        out = [self.store.key(n) for n in plan.names.values() if not self.store.has(n)]
        if not plan.layers:
            scopes = [s for s, (kind, _) in CELL_SCOPES.items() if plan.cell in ("", kind)]
            out.append(self.store.key(self.maps.get("cell_0", f"{self.scheme.multi}/cell_0/<{'|'.join(scopes)}>")
                                      + "/kernel"))
        for layer in plan.layers:
            out += [self.store.key(f"{layer.scope}/{k}" if v is None else v) for k, v in layer.names.items()
                    if v is None or not self.store.has(v)]
        return out


# Optimizer slots and counters a training checkpoint also holds ('/' is '_' in a .wts dump).
_OPTIMIZER_SLOT = re.compile(r"([/_](Adam|Adam_\d+|Momentum|RMSProp|RMSProp_\d+|Adagrad|ExponentialMovingAverage)$|"
                             r"^(beta1_power|beta2_power)(_\d+)?$)")


def _listing(names: list[str], limit: int = 25) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def choose_plan(store: Store, naming: str, maps: dict[str, str], cell: str | None, source: str) -> Plan:
    if naming == "auto":
        order = ["samplecharrnn" if store.format.startswith("wts") else "crazydonkey", "sherjilozair"]
    else:
        order = [naming]
    tried = []
    for name in order:
        r = Resolver(store, SCHEMES[name], maps)
        plan = r.plan(cell)
        missing = r.missing(plan)
        if not missing:
            return plan
        if cell is not None and not r.missing(any_cell := r.plan(None)):
            first = any_cell.layers[0]
            raise UserError(source, f"layer 0 ({store.key(first.scope)}) is not a {cell} cell",
                            "drop --cell (the cell type is detected) or fix it")
        tried.append((name, missing))
    found = [n for n in store.names() if not _OPTIMIZER_SLOT.search(n)]
    expected = "; ".join(f"{name}: missing {_listing(m, 8)}" for name, m in tried)
    raise UserError(source, f"variable names do not match {'any known naming' if naming == 'auto' else naming}. "
                            f"Found {len(found)} variable(s) (optimizer slots left out): {_listing(found)}. "
                            f"Expected - {expected}",
                    f"pick --naming ({', '.join(n for n in NAMINGS if n != 'auto')}) or rename with "
                    f"--map OURNAME=THEIRNAME (OURNAME: {MAP_HELP})")


def fetch(store: Store, name: str, shape: tuple[int | None, ...], what: str) -> np.ndarray:
    """The array `name` as float32, checked against `shape` (None = any); v1 .wts arrays are reshaped."""
    arr = store.get(name)
    shown = store.key(name)
    if store.shape(name) is None:  # v1 .wts: flat; infer the one free dimension
        known = int(np.prod([d for d in shape if d is not None], dtype=np.int64))
        free = [i for i, d in enumerate(shape) if d is None]
        if len(free) > 1 or known == 0 or arr.size % known or (not free and arr.size != known):
            raise UserError(what, f"{shown} has {arr.size} values, which does not fit shape "
                                  f"{_fmt_shape(shape)}", "check that the file and the flags describe the "
                                                          "same model")
        arr = arr.reshape(tuple(arr.size // known if d is None else d for d in shape))
    if arr.ndim != len(shape) or any(d is not None and d != a for d, a in zip(shape, arr.shape)):
        raise UserError(what, f"{shown} has shape {tuple(arr.shape)}, expected {_fmt_shape(shape)}",
                        "check that the file and the flags describe the same model (--naming, --map, --cell)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(what, f"{shown} is {arr.dtype}, not floating point", "map the right variable")
    return np.asarray(arr, dtype=np.float32)


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


@dataclass
class Imported:
    cell: str
    cell_class: str
    layers: int
    hidden: int
    embedding: int
    vocab_size: int
    input: str  # embedding | onehot
    weights: dict  # keras layer name -> list of arrays in get_weights() order
    variables: dict  # our name -> store name


def convert(store: Store, plan: Plan, cell_flag: str | None, forget_bias: float | None, input_mode: str,
            source: str) -> Imported:
    """Read the TF1 variables named by `plan` and turn them into Keras weights. forget_bias None: unknown
    (cells named with --map), an error if the cells are LSTMs."""
    sm_b = fetch(store, plan.names["softmax_b"], (None,), source)
    V = sm_b.shape[0]
    sm_w = fetch(store, plan.names["softmax_w"], (None, V), source)
    H = sm_w.shape[0]
    variables = dict(plan.names)

    # Embedding, or one-hot input (crazydonkey's --embedding_size=0: no embedding variable).
    emb_name = plan.embedding
    if input_mode == "auto":
        input_mode = "embedding" if store.has(emb_name) else "onehot"
    if input_mode == "embedding":
        if not store.has(emb_name):
            raise UserError(source, f"no embedding variable {emb_name!r}",
                            "name it with --map embedding=THEIRNAME, or pass --input onehot if the model "
                            "reads one-hot characters")
        emb = fetch(store, emb_name, (V, None), source)
        variables["embedding"] = emb_name
    else:
        emb = np.eye(V, dtype=np.float32)
    E = emb.shape[1]

    gates = {"lstm": 4, "gru": None, "rnn": 1}
    keras_layers, cells, classes = [], set(), set()
    for i, layer in enumerate(plan.layers):
        what = f"{source}: layer {i} ({store.key(layer.scope)})"
        in_dim = E if i == 0 else H
        if layer.cell_class == "GRUCell":
            kind = "gru"
            gk = fetch(store, layer.names["gates/kernel"], (in_dim + H, 2 * H), what)
            gb = fetch(store, layer.names["gates/bias"], (2 * H,), what)
            ck = fetch(store, layer.names["candidate/kernel"], (in_dim + H, H), what)
            cb = fetch(store, layer.names["candidate/bias"], (H,), what)
            r_k, u_k = gk[:, :H], gk[:, H:]  # TF1 GRUCell: r, u = split(gates, 2)
            r_b, u_b = gb[:H], gb[H:]
            # Keras GRU gate order z(=u), r, h; reset_after=False: hh = tanh(x W_h + (r*h) U_h + b_h).
            kernel = np.concatenate([u_k[:in_dim], r_k[:in_dim], ck[:in_dim]], axis=1)
            recurrent = np.concatenate([u_k[in_dim:], r_k[in_dim:], ck[in_dim:]], axis=1)
            bias = np.concatenate([u_b, r_b, cb])
        else:
            bias_name, kernel_name = layer.names["bias"], layer.names["kernel"]
            if not bias_name or not kernel_name:
                raise UserError(what, "needs both a kernel and a bias", "add the missing one with --map")
            shape = store.shape(bias_name)
            n = (shape[0] if shape else store.get(bias_name).size)
            kind = {"BasicLSTMCell": "lstm", "LSTMCell": "lstm", "BasicRNNCell": "rnn"}.get(layer.cell_class)
            if kind is None:  # a --map'ped scope: the bias width tells LSTM (4H) from a basic RNN (H)
                kind = {4 * H: "lstm", H: "rnn"}.get(n)
                if kind is None:
                    raise UserError(what, f"bias has {n} values: neither an LSTM (4 x {H}) nor an RNN ({H}) "
                                          f"cell of the softmax's {H} units", "check --map")
                layer.cell_class = "LSTMCell" if kind == "lstm" else "BasicRNNCell"
            if kind == "lstm":
                _reject_lstm_extras(store, layer, what)
                if forget_bias is None:
                    raise UserError("--forget-bias", f"required for LSTM cells named with --map ({what}): the "
                                    "forget_bias they were trained with is not in the checkpoint and cannot be "
                                    "guessed (TF1's default is 1.0; crazydonkey200/sampleCharRNN used 0.0)",
                                    "pass --forget-bias 1.0 or --forget-bias 0.0, as the model was built")
            G = gates[kind] * H
            k = fetch(store, kernel_name, (in_dim + H, G), what)
            b = fetch(store, bias_name, (G,), what)
            if kind == "lstm":
                # TF1: i, j, f, o = split(concat([x, h]) @ kernel + bias, 4); Keras: i, f, c(=j), o.
                blocks = [0, 2, 1, 3]
                kk = np.concatenate([k[:, g * H:(g + 1) * H] for g in blocks], axis=1)
                bb = np.concatenate([b[g * H:(g + 1) * H] for g in blocks]).copy()
                bb[H:2 * H] += np.float32(forget_bias)  # TF adds forget_bias to f at run time
                kernel, recurrent, bias = kk[:in_dim], kk[in_dim:], bb
            else:
                kernel, recurrent, bias = k[:in_dim], k[in_dim:], b
        if cell_flag and kind != cell_flag:
            raise UserError(what, f"is a {layer.cell_class} ({kind}), not --cell {cell_flag}",
                            "drop --cell or fix it")
        cells.add(kind)
        classes.add(layer.cell_class)
        keras_layers.append([kernel, recurrent, bias])
        for k_, v_ in layer.names.items():
            if v_:
                variables[f"cell_{i}/{k_}"] = v_
    if len(cells) != 1:
        raise UserError(source, f"layers mix cell types ({', '.join(sorted(cells))})",
                        "our model stacks one cell type; map the layers of a single stack")
    cell = cells.pop()
    weights = {"embedding": [emb], "head": [sm_w, sm_b]}
    for i, w in enumerate(keras_layers):
        weights[f"{cell}_{i}"] = w
    return Imported(cell, "/".join(sorted(classes)), len(plan.layers), H, E, V, input_mode, weights, variables)


def _reject_lstm_extras(store: Store, layer: Layer, what: str) -> None:
    peep = [f"{layer.scope}/{n}" for n in ("w_f_diag", "w_i_diag", "w_o_diag") if store.has(f"{layer.scope}/{n}")]
    if peep:
        raise UserError(what, f"LSTMCell with peepholes ({', '.join(peep)}): Keras LSTM has no peephole "
                              "connections", "only models trained with use_peepholes=False can be imported")
    proj = [f"{layer.scope}/projection/{n}" for n in KERNEL_NAMES
            if store.has(f"{layer.scope}/projection/{n}")]
    if proj:
        raise UserError(what, f"LSTMCell with an output projection ({proj[0]}): Keras LSTM has no num_proj",
                        "only models trained without num_proj can be imported")


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="TF1 checkpoint prefix, .index file or directory")
    src.add_argument("--wts", metavar="FILE", help="TensorRT .wts dump (dumpTFWts.py, v1 or v2)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--force", action="store_true", help="overwrite a model already in --out")
    voc = p.add_mutually_exclusive_group()
    voc.add_argument("--vocab", metavar="FILE", help="vocab.json ({'chars': [...]} or {char: id}), text, or pickle")
    voc.add_argument("--vocab-builtin", choices=sorted(BUILTIN_VOCABS),
                     help="samplecharrnn: the 65-character map compiled into sampleCharRNN")
    p.add_argument("--naming", choices=NAMINGS, default="auto", help="variable naming scheme (default: auto)")
    p.add_argument("--map", action="append", default=[], metavar="OURNAME=THEIRNAME",
                   help=f"rename one variable (repeatable); OURNAME: {MAP_HELP}")
    p.add_argument("--cell", choices=["lstm", "gru", "rnn"], help="expected cell (default: detected)")
    p.add_argument("--forget-bias", type=float, default=None,
                   help="LSTM forget_bias the model was trained with (default: 0.0 for crazydonkey/"
                        "samplecharrnn naming, else TF's 1.0; required when cells are named with --map)")
    p.add_argument("--input", choices=["auto", "embedding", "onehot"], default="auto",
                   help="embedding variable, or one-hot characters (default: embedding if present)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickled vocabulary (unpickling can run arbitrary code)")
    return p.parse_args(argv)


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    maps = parse_maps(args.map)
    out = Path(args.out)
    if (out / "model.weights.h5").exists() and not args.force:
        raise UserError(str(out), "already holds a model", "pass --force to overwrite it, or another --out")
    source = args.checkpoint or args.wts
    if not Path(source).exists() and args.wts:
        raise UserError(source, ".wts file not found", "check --wts")

    # The vocabulary first: it is cheap, and a pickle refusal should not wait for TensorFlow.
    vocab_path = None
    if args.vocab_builtin:
        vocab = Vocab(list(BUILTIN_VOCABS[args.vocab_builtin]))
        vocab_source = f"builtin:{args.vocab_builtin}"
    else:
        vocab_path = Path(args.vocab) if args.vocab else (find_vocab(Path(source)) if args.checkpoint else None)
        if vocab_path is None:
            raise UserError("vocabulary", "the weights do not say which character each id is",
                            "pass --vocab FILE (vocab.json, chars_vocab.pkl with --trust-pickle, ...) or "
                            "--vocab-builtin samplecharrnn for sampleCharRNN's char-rnn.wts")
        vocab = load_vocab(str(vocab_path), args.trust_pickle)
        vocab_source = str(vocab_path)

    store = WtsStore(source) if args.wts else CheckpointStore(source)
    plan = choose_plan(store, args.naming, maps, args.cell, source)
    # Cells found under the scheme's own names have the scheme's forget_bias; cells named with --map could come
    # from any project, so their forget_bias must be given (a wrong one still converts, with logits off by ~2).
    mapped_cells = any(k.split("/")[0].startswith("cell_") for k in maps)
    forget_bias = (args.forget_bias if args.forget_bias is not None else
                   None if mapped_cells else plan.scheme.forget_bias)
    imp = convert(store, plan, args.cell, forget_bias, args.input, source)
    if len(vocab) != imp.vocab_size:
        raise UserError("vocabulary", f"{vocab_source} has {len(vocab)} characters but the weights "
                                      f"{imp.vocab_size} (softmax_b {plan.names['softmax_b']})",
                        "pass the vocabulary the model was trained with")

    from charrnn.model import ModelConfig, build_model, keras, save_model_dir, tf  # sets TF's environment first

    config = ModelConfig(vocab_size=imp.vocab_size, cell=imp.cell, layers=imp.layers, hidden=imp.hidden,
                         embedding=imp.embedding, dropout=0.0, reset_after=False if imp.cell == "gru" else True)
    model = build_model(config)
    targets = {"embedding": model.embed, "head": model.head, **{r.name: r for r in model.rnns}}
    for name, arrays in imp.weights.items():
        layer = targets[name]
        want = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(a.shape) for a in arrays]
        if want != got:  # a bug here, not a user error: the conversion produced the wrong layout
            raise AssertionError(f"{name}: keras wants {want}, conversion gave {got}")
        layer.set_weights(arrays)

    fb_note = (f"--forget-bias {forget_bias}" if args.forget_bias is not None
               else f"default for {plan.scheme.name}: {plan.scheme.forget_bias_why}")
    files = [{"file": str(p.resolve()), "md5": md5_file(p)} for p in store.files()]
    if vocab_path is not None:
        files.append({"file": str(vocab_path.resolve()), "md5": md5_file(vocab_path), "role": "vocabulary"})
    card = {
        "name": out.name,
        "architecture": json.loads(config.to_json()),
        "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "vocab_size": imp.vocab_size,
        "imported_from": {
            "source": str(Path(source).resolve()),
            "checkpoint_prefix": str(Path(store.prefix).resolve()) if isinstance(store, CheckpointStore) else None,
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
            "conversion": {
                "lstm": "kernel [in+H,4H] i,j,f,o -> kernel [in,4H] + recurrent_kernel [H,4H] i,f,c,o; "
                        "forget_bias added to the f block of the bias",
                "gru": "gates (r,u) + candidate -> keras GRU(reset_after=False) z(=u),r,h; bias (3H,)",
                "rnn": "kernel [in+H,H] -> kernel [in,H] + recurrent_kernel [H,H]",
            }[imp.cell],
        },
        "software": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "python": platform.python_version()},
        "imported_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m train.import_tf1 " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    save_model_dir(out, model, vocab, card)
    fb = f", forget_bias {forget_bias:g} ({'flag' if args.forget_bias is not None else 'default'})" \
        if imp.cell == "lstm" else ""
    print(f"imported {source} ({store.format}, naming {plan.scheme.name}): {imp.layers} x {imp.cell_class} "
          f"{imp.hidden}, {imp.input} {imp.embedding}, vocabulary {imp.vocab_size}{fb}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
