"""TF1 cell variables -> our Keras network: shape checks, gate reordering, the LSTM forget_bias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from charrnn.errors import UserError

from .naming import KERNEL_NAMES, Layer, Plan, Scheme
from .sources import Store

if TYPE_CHECKING:
    from charrnn.model import CharRNN, ModelConfig

# How each cell's variables were converted (recorded in the model card).
CONVERSION_NOTES = {
    "lstm": "kernel [in+H,4H] i,j,f,o -> kernel [in,4H] + recurrent_kernel [H,4H] i,f,c,o; "
    "forget_bias added to the f block of the bias",
    "gru": "gates (r,u) + candidate -> keras GRU(reset_after=False) z(=u),r,h; bias (3H,)",
    "rnn": "kernel [in+H,H] -> kernel [in,H] + recurrent_kernel [H,H]",
}


def fetch(store: Store, name: str, shape: tuple[int | None, ...], what: str) -> np.ndarray:
    """The array `name` as float32, checked against `shape` (None = any); v1 .wts arrays are reshaped."""
    arr = store.get(name)
    shown = store.key(name)
    if store.shape(name) is None:  # v1 .wts: flat; infer the one free dimension
        known = int(np.prod([d for d in shape if d is not None], dtype=np.int64))
        free = [i for i, d in enumerate(shape) if d is None]
        if len(free) > 1 or known == 0 or arr.size % known or (not free and arr.size != known):
            raise UserError(
                what,
                f"{shown} has {arr.size} values, which does not fit shape " f"{_fmt_shape(shape)}",
                "check that the file and the flags describe the " "same model",
            )
        arr = arr.reshape(tuple(arr.size // known if d is None else d for d in shape))
    if arr.ndim != len(shape) or any(d is not None and d != a for d, a in zip(shape, arr.shape)):
        raise UserError(
            what,
            f"{shown} has shape {tuple(arr.shape)}, expected {_fmt_shape(shape)}",
            "check that the file and the flags describe the same model (--naming, --map, --cell)",
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(
            what, f"{shown} is {arr.dtype}, not floating point", "map the right variable"
        )
    return np.asarray(arr, dtype=np.float32)


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def choose_forget_bias(flag: float | None, maps: dict[str, str], scheme: Scheme) -> float | None:
    """--forget-bias, else the scheme's; None (unknown: convert() then refuses LSTM cells) for --map'ped cells."""
    # Cells found under the scheme's own names have the scheme's forget_bias; cells named with --map could come
    # from any project, so their forget_bias must be given (a wrong one still converts, with logits off by ~2).
    mapped_cells = any(k.split("/")[0].startswith("cell_") for k in maps)
    return flag if flag is not None else None if mapped_cells else scheme.forget_bias


@dataclass
class Imported:
    """The converted weights and what they are."""

    cell: str
    cell_class: str
    layers: int
    hidden: int
    embedding: int
    vocab_size: int
    input: str  # embedding | onehot
    weights: dict  # keras layer name -> list of arrays in get_weights() order
    variables: dict  # our name -> store name


def convert(
    store: Store,
    plan: Plan,
    cell_flag: str | None,
    forget_bias: float | None,
    input_mode: str,
    source: str,
) -> Imported:
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
            raise UserError(
                source,
                f"no embedding variable {emb_name!r}",
                "name it with --map embedding=THEIRNAME, or pass --input onehot if the model "
                "reads one-hot characters",
            )
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
                raise UserError(
                    what, "needs both a kernel and a bias", "add the missing one with --map"
                )
            shape = store.shape(bias_name)
            n = shape[0] if shape else store.get(bias_name).size
            kind = {"BasicLSTMCell": "lstm", "LSTMCell": "lstm", "BasicRNNCell": "rnn"}.get(
                layer.cell_class
            )
            # a --map'ped scope: the bias width tells LSTM (4H) from a basic RNN (H)
            if kind is None:
                kind = {4 * H: "lstm", H: "rnn"}.get(n)
                if kind is None:
                    raise UserError(
                        what,
                        f"bias has {n} values: neither an LSTM (4 x {H}) nor an RNN ({H}) "
                        f"cell of the softmax's {H} units",
                        "check --map",
                    )
                layer.cell_class = "LSTMCell" if kind == "lstm" else "BasicRNNCell"
            if kind == "lstm":
                _reject_lstm_extras(store, layer, what)
                if forget_bias is None:
                    raise UserError(
                        "--forget-bias",
                        f"required for LSTM cells named with --map ({what}): the "
                        "forget_bias they were trained with is not in the checkpoint and cannot be "
                        "guessed (TF1's default is 1.0; crazydonkey200/sampleCharRNN used 0.0)",
                        "pass --forget-bias 1.0 or --forget-bias 0.0, as the model was built",
                    )
            G = gates[kind] * H
            k = fetch(store, kernel_name, (in_dim + H, G), what)
            b = fetch(store, bias_name, (G,), what)
            if kind == "lstm":
                # TF1: i, j, f, o = split(concat([x, h]) @ kernel + bias, 4); Keras: i, f, c(=j), o.
                blocks = [0, 2, 1, 3]
                kk = np.concatenate([k[:, g * H : (g + 1) * H] for g in blocks], axis=1)
                bb = np.concatenate([b[g * H : (g + 1) * H] for g in blocks]).copy()
                bb[H : 2 * H] += np.float32(forget_bias)  # TF adds forget_bias to f at run time
                kernel, recurrent, bias = kk[:in_dim], kk[in_dim:], bb
            else:
                kernel, recurrent, bias = k[:in_dim], k[in_dim:], b
        if cell_flag and kind != cell_flag:
            raise UserError(
                what,
                f"is a {layer.cell_class} ({kind}), not --cell {cell_flag}",
                "drop --cell or fix it",
            )
        cells.add(kind)
        classes.add(layer.cell_class)
        keras_layers.append([kernel, recurrent, bias])
        for k_, v_ in layer.names.items():
            if v_:
                variables[f"cell_{i}/{k_}"] = v_
    if len(cells) != 1:
        raise UserError(
            source,
            f"layers mix cell types ({', '.join(sorted(cells))})",
            "our model stacks one cell type; map the layers of a single stack",
        )
    cell = cells.pop()
    weights = {"embedding": [emb], "head": [sm_w, sm_b]}
    for i, w in enumerate(keras_layers):
        weights[f"{cell}_{i}"] = w
    return Imported(
        cell, "/".join(sorted(classes)), len(plan.layers), H, E, V, input_mode, weights, variables
    )


def _reject_lstm_extras(store: Store, layer: Layer, what: str) -> None:
    peep = [
        f"{layer.scope}/{n}"
        for n in ("w_f_diag", "w_i_diag", "w_o_diag")
        if store.has(f"{layer.scope}/{n}")
    ]
    if peep:
        raise UserError(
            what,
            f"LSTMCell with peepholes ({', '.join(peep)}): Keras LSTM has no peephole "
            "connections",
            "only models trained with use_peepholes=False can be imported",
        )
    proj = [
        f"{layer.scope}/projection/{n}"
        for n in KERNEL_NAMES
        if store.has(f"{layer.scope}/projection/{n}")
    ]
    if proj:
        raise UserError(
            what,
            f"LSTMCell with an output projection ({proj[0]}): Keras LSTM has no num_proj",
            "only models trained without num_proj can be imported",
        )


def build_keras(imp: Imported) -> tuple[ModelConfig, CharRNN]:
    """Our Keras network holding the imported weights (this imports TensorFlow)."""
    from charrnn.model import ModelConfig, build_net  # sets TF's environment first

    config = ModelConfig(
        vocab_size=imp.vocab_size,
        cell=imp.cell,
        layers=imp.layers,
        hidden=imp.hidden,
        embedding=imp.embedding,
        dropout=0.0,
        reset_after=False if imp.cell == "gru" else True,
    )
    net = build_net(config)
    targets = {"embedding": net.embed, "head": net.head, **{r.name: r for r in net.rnns}}
    for name, arrays in imp.weights.items():
        layer = targets[name]
        want = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(a.shape) for a in arrays]
        if want != got:  # a bug here, not a user error: the conversion produced the wrong layout
            raise AssertionError(f"{name}: keras wants {want}, conversion gave {got}")
        layer.set_weights(arrays)
    return config, net
