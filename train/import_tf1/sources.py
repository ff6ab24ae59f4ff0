"""Weight sources of a TF1 char-rnn: a TensorFlow checkpoint or a TensorRT .wts dump, as named arrays."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from charrnn.errors import UserError


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
        from charrnn.model import (
            tf,  # charrnn.model sets TensorFlow's environment before importing it
        )

        try:
            self.reader = tf.train.load_checkpoint(self.prefix)
        except Exception as e:  # NotFoundError, DataLossError, ... for missing or corrupt files
            raise UserError(
                path,
                f"cannot read the TensorFlow checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})",
                "pass the checkpoint prefix (model-1234), its .index file or its directory",
            ) from e
        self._shapes = {k: tuple(v) for k, v in self.reader.get_variable_to_shape_map().items()}
        if any(".ATTRIBUTES/" in k for k in self._shapes):
            raise UserError(
                path,
                "this is a TF2 object-based checkpoint (tf.train.Checkpoint), not a TF1 one",
                "TF2/Keras checkpoints of this project are loaded with charrnn.model.load_model_dir",
            )

    def names(self) -> list[str]:
        return sorted(self._shapes)

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self.reader.get_tensor(name))

    def files(self) -> list[Path]:
        d, base = Path(self.prefix).parent, Path(self.prefix).name
        return sorted(
            p
            for p in d.iterdir()
            if p.name == base or p.name == base + ".index" or p.name.startswith(base + ".data-")
        )


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a prefix, an .index/.data-*/.meta file, or a directory."""
    p = Path(path)
    if p.is_dir():
        from charrnn.model import tf  # sets TensorFlow's environment before importing it

        latest = tf.train.latest_checkpoint(str(p))
        # The `checkpoint` state file may hold absolute paths from the machine it was trained on.
        if latest and not Path(latest + ".index").exists():
            latest = (
                str(p / Path(latest).name)
                if Path(str(p / Path(latest).name) + ".index").exists()
                else None
            )
        if not latest:
            indexes = sorted(p.glob("*.index"), key=lambda f: f.stat().st_mtime)
            if not indexes:
                raise UserError(
                    path,
                    "no TF checkpoint in this directory (no *.index file)",
                    "pass the checkpoint prefix, e.g. DIR/model.ckpt-1000",
                )
            latest = str(indexes[-1])[: -len(".index")]
        return latest
    m = re.match(r"^(.*)\.(index|meta|data-\d+-of-\d+)$", str(p))
    prefix = m.group(1) if m else str(p)
    # V2 checkpoint, or a V1 single file
    if not (Path(prefix + ".index").exists() or Path(prefix).is_file()):
        raise UserError(
            path,
            "checkpoint not found",
            "pass the prefix (model-1234: model-1234.index must "
            "exist), an .index file or the checkpoint directory",
        )
    return prefix


# TensorRT DataType enum values (NvInfer.h) used by the .wts format.
WTS_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2"), 2: np.dtype("i1"), 3: np.dtype("<i4")}
_TRT_TYPE = {
    np.dtype(np.float32): 0,
    np.dtype(np.float16): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int32): 3,
}


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
            raise UserError(
                path, f"cannot read the .wts file ({e.strerror})", "check the path"
            ) from e
        self._arrays: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[int, ...] | None] = {}
        self.versions: set[str] = set()
        self._parse(data)
        self.format = "wts-" + "+".join(sorted(self.versions)) if self.versions else "wts"

    def _bad(self, why: str) -> UserError:
        return UserError(
            self.path,
            f"not a valid TensorRT .wts weight file: {why}",
            "pass a file written by TensorRT's samples/common/dumpTFWts.py",
        )

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
                raise self._bad(
                    f"buffer {i} ({name!r}): unknown type {type_tok[:20]!r} (0-3 expected)"
                )
            dtype = WTS_DTYPES[int(type_tok)]
            skip_ws()
            # v2: (d0, d1, ...) then one space, the bytes, '\n'
            if pos < n and data[pos] == ord("("):
                end = data.find(b")", pos)
                if end < 0:
                    raise self._bad(f"buffer {name!r}: unterminated shape")
                dims = [
                    d.strip().rstrip("L") for d in data[pos + 1 : end].decode("latin-1").split(",")
                ]
                try:
                    shape = tuple(int(d) for d in dims if d)
                except ValueError:
                    raise self._bad(f"buffer {name!r}: bad shape {data[pos:end + 1]!r}") from None
                count = int(np.prod(shape, dtype=np.int64))
                start = end + 2  # ')' and the space
                stop = start + count * dtype.itemsize
                if stop > n:
                    raise self._bad(
                        f"buffer {name!r} {shape} is truncated ({n - start} of "
                        f"{count * dtype.itemsize} bytes)"
                    )
                self._arrays[name] = np.frombuffer(
                    data, dtype=dtype, count=count, offset=start
                ).reshape(shape)
                self._shapes[name] = shape
                pos = stop
                if pos < n and data[pos] == ord("\n"):
                    pos += 1
                self.versions.add("v2")
            else:  # v1: element count, then that many hex words
                count_tok = token()
                if not count_tok.isdigit():
                    raise self._bad(
                        f"buffer {name!r}: expected '(shape)' or an element count, got "
                        f"{count_tok[:20]!r}"
                    )
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
            out.append(
                b"%s %d %s " % (file_key, _TRT_TYPE[arr.dtype], repr(tuple(arr.shape)).encode())
            )
            out.append(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())
        elif version == 1:
            out.append(b"%s 0 %d " % (file_key, arr.size))
            out.append(
                b"".join(b"%x " % w for w in arr.astype("<f4").ravel().view(np.uint32).tolist())
            )
        else:
            raise ValueError(f"version must be 1 or 2, got {version}")
        out.append(b"\n")
    Path(path).write_bytes(b"".join(out))
