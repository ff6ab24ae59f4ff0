"""Which TF1 variable is which: naming schemes, --map renames, and the plan of layers found in a store."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from charrnn.errors import UserError

from .sources import Store

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
TF_DEFAULT_FORGET_BIAS = 1.0  # tf.nn.rnn_cell.BasicLSTMCell / LSTMCell


@dataclass(frozen=True)
class Scheme:
    """Where one TF1 char-rnn project puts its variables, and the forget_bias it built its LSTM cells with."""

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
        "crazydonkey",
        "rnn/multi_rnn_cell",
        "embedding",
        "softmax/softmax_w",
        "softmax/softmax_b",
        0.0,
        "crazydonkey200/tensorflow-char-rnn builds its LSTM cells with forget_bias=0.0",
        "https://github.com/crazydonkey200/tensorflow-char-rnn (char_rnn_model.py)",
    ),
    "samplecharrnn": Scheme(
        "samplecharrnn",
        "rnn/multi_rnn_cell",
        "embedding",
        "softmax/softmax_w",
        "softmax/softmax_b",
        0.0,
        "sampleCharRNN's model was trained by crazydonkey200/tensorflow-char-rnn (forget_bias=0.0) and the "
        "sample adds no forget bias",
        "https://github.com/NVIDIA/TensorRT samples/sampleCharRNN (weights dumped by samples/common/dumpTFWts.py)",
    ),
    "sherjilozair": Scheme(
        "sherjilozair",
        "rnnlm/multi_rnn_cell",
        "embedding",
        "rnnlm/softmax_w",
        "rnnlm/softmax_b",
        TF_DEFAULT_FORGET_BIAS,
        "sherjilozair/char-rnn-tensorflow uses TF's default BasicLSTMCell(forget_bias=1.0)",
        "https://github.com/sherjilozair/char-rnn-tensorflow (model.py)",
    ),
}
NAMINGS = ("auto", "crazydonkey", "sherjilozair", "samplecharrnn")

_OUR_NAME = re.compile(
    r"^(embedding|softmax_w|softmax_b|cell_\d+(/(kernel|bias|gates/kernel|gates/bias|"
    r"candidate/kernel|candidate/bias))?)$"
)
MAP_HELP = (
    "embedding, softmax_w, softmax_b, cell_N, cell_N/kernel, cell_N/bias, cell_N/gates/kernel, "
    "cell_N/gates/bias, cell_N/candidate/kernel, cell_N/candidate/bias"
)


def parse_maps(items: list[str]) -> dict[str, str]:
    """--map OURNAME=THEIRNAME flags -> {our name: their name}."""
    maps: dict[str, str] = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        ours, theirs = ours.strip().strip("/"), theirs.strip()
        if not sep or not ours or not theirs:
            raise UserError(
                "--map", f"{item!r} is not OURNAME=THEIRNAME", f"OURNAME is one of {MAP_HELP}"
            )
        if not _OUR_NAME.match(ours):
            raise UserError("--map", f"unknown OURNAME {ours!r}", f"use one of {MAP_HELP}")
        maps[ours] = theirs
    return maps


@dataclass
class Layer:
    """One layer's cell: its scope, its TF1 class ("" until convert() tells LSTM from RNN) and variables."""

    scope: str
    cell_class: str
    names: dict[str, str]  # our name (kernel, bias, gates/kernel, ...) -> name in the store


@dataclass
class Plan:
    """Which store variable is which, under one naming scheme."""

    scheme: Scheme
    cell: str
    layers: list[Layer]
    # our name -> store name (softmax_w, softmax_b)
    names: dict[str, str] = field(default_factory=dict)
    embedding: str = ""  # may be absent (one-hot input)


class Resolver:
    """Finds a scheme's variables in a store, --map renames first."""

    def __init__(self, store: Store, scheme: Scheme, maps: dict[str, str]) -> None:
        self.store, self.scheme, self.maps = store, scheme, maps

    def top(self, ours: str) -> str:
        return self.maps.get(ours, getattr(self.scheme, ours))

    def first(self, candidates: list[str]) -> str | None:
        return next((c for c in candidates if self.store.has(c)), None)

    def layer(self, i: int, cell: str | None) -> Layer | None:
        """Layer i's variables, or None when the layer does not exist."""
        key = f"cell_{i}"
        # a mapped scope ending in a known cell scope (.../basic_lstm_cell) says its class
        if key in self.maps:
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

            gru = {
                k: find(k)
                for k in ("gates/kernel", "gates/bias", "candidate/kernel", "candidate/bias")
            }
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
            wanted = (
                ("gates/kernel", "gates/bias", "candidate/kernel", "candidate/bias")
                if gru
                else ("kernel", "bias")
            )
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
            out.append(
                self.store.key(
                    self.maps.get("cell_0", f"{self.scheme.multi}/cell_0/<{'|'.join(scopes)}>")
                    + "/kernel"
                )
            )
        for layer in plan.layers:
            out += [
                self.store.key(f"{layer.scope}/{k}" if v is None else v)
                for k, v in layer.names.items()
                if v is None or not self.store.has(v)
            ]
        return out


# Optimizer slots and counters a training checkpoint also holds ('/' is '_' in a .wts dump).
_OPTIMIZER_SLOT = re.compile(
    r"([/_](Adam|Adam_\d+|Momentum|RMSProp|RMSProp_\d+|Adagrad|ExponentialMovingAverage)$|"
    r"^(beta1_power|beta2_power)(_\d+)?$)"
)


def _listing(names: list[str], limit: int = 25) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def choose_plan(
    store: Store, naming: str, maps: dict[str, str], cell: str | None, source: str
) -> Plan:
    """The plan of the first scheme (--naming, or each in turn for auto) whose variables are all in the store."""
    if naming == "auto":
        order = [
            "samplecharrnn" if store.format.startswith("wts") else "crazydonkey",
            "sherjilozair",
        ]
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
            raise UserError(
                source,
                f"layer 0 ({store.key(first.scope)}) is not a {cell} cell",
                "drop --cell (the cell type is detected) or fix it",
            )
        tried.append((name, missing))
    found = [n for n in store.names() if not _OPTIMIZER_SLOT.search(n)]
    expected = "; ".join(f"{name}: missing {_listing(m, 8)}" for name, m in tried)
    raise UserError(
        source,
        f"variable names do not match {'any known naming' if naming == 'auto' else naming}. "
        f"Found {len(found)} variable(s) (optimizer slots left out): {_listing(found)}. "
        f"Expected - {expected}",
        f"pick --naming ({', '.join(n for n in NAMINGS if n != 'auto')}) or rename with "
        f"--map OURNAME=THEIRNAME (OURNAME: {MAP_HELP})",
    )
