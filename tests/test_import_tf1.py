"""train.import_tf1: TF1 char-rnn checkpoints and sampleCharRNN .wts dumps -> our Keras model directory.

The TF1 checkpoints are written here with tf.compat.v1.train.Saver in a graph, under the exact variable names
crazydonkey200/tensorflow-char-rnn, sherjilozair/char-rnn-tensorflow and sampleCharRNN use, with random
weights. The imported model's logits are compared with an independent NumPy implementation of the TF1 cell
equations (rnn_cell_impl.py: BasicLSTMCell with forget_bias, GRUCell, BasicRNNCell, MultiRNNCell).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from charrnn.model import load_model_dir  # noqa: E402
from charrnn.repository import ONNX  # noqa: E402
from tests.helpers import ROOT  # noqa: E402
from train.import_tf1.__main__ import main  # noqa: E402
from train.import_tf1.sources import WtsStore, write_wts  # noqa: E402
from train.import_tf1.vocab import SAMPLECHARRNN_CHARS  # noqa: E402

CHARS = "\n abcdefghijk!"  # a small vocabulary for most tests (V = 14)
TOL = 1e-5

# --- TF1 models: names and random weights ---------------------------------------------------------

PREFIX = {
    "crazydonkey": ("rnn/multi_rnn_cell", "softmax/"),
    "sherjilozair": ("rnnlm/multi_rnn_cell", "rnnlm/"),
}
SCOPE = {
    "lstm": "basic_lstm_cell",
    "LSTMCell": "lstm_cell",
    "gru": "gru_cell",
    "rnn": "basic_rnn_cell",
}


def tf1_weights(
    naming: str, cell: str, V: int, H: int, E: int, layers: int, seed: int, extras: bool = True
) -> dict[str, np.ndarray]:
    """{checkpoint name: float32 array} as the project's TF1 graph creates them (E=0: one-hot input)."""
    rng = np.random.default_rng(seed)
    multi, sm = PREFIX[naming]
    scope = SCOPE[cell]
    w = {}
    if E:
        w["embedding"] = rng.normal(0, 1.0, (V, E))
    for i in range(layers):
        rows = (E or V if i == 0 else H) + H
        p = f"{multi}/cell_{i}/{scope}"
        if cell == "gru":
            w[f"{p}/gates/kernel"] = rng.normal(0, 0.5, (rows, 2 * H))
            w[f"{p}/gates/bias"] = 1.0 + rng.normal(0, 0.3, 2 * H)  # TF1 initializes these to 1.0
            w[f"{p}/candidate/kernel"] = rng.normal(0, 0.5, (rows, H))
            w[f"{p}/candidate/bias"] = rng.normal(0, 0.3, H)
        else:
            g = 1 if cell == "rnn" else 4
            w[f"{p}/kernel"] = rng.normal(0, 0.5, (rows, g * H))
            w[f"{p}/bias"] = rng.normal(0, 0.5, g * H)
    w[f"{sm}softmax_w"] = rng.normal(0, 1.0, (H, V))
    w[f"{sm}softmax_b"] = rng.normal(0, 0.5, V)
    # what a training checkpoint also holds: optimizer slots and counters (must be ignored)
    if extras:
        for name in list(w):
            w[f"{name}/Adam"] = rng.normal(0, 0.01, w[name].shape)
            w[f"{name}/Adam_1"] = np.abs(rng.normal(0, 0.01, w[name].shape))
        w["beta1_power"], w["beta2_power"] = np.array(0.9), np.array(0.999)
        w["global_step"] = np.array(1234.0)
    return {k: np.asarray(v, dtype=np.float32) for k, v in w.items()}


def save_tf1_checkpoint(prefix: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A real TF1 (name-based, V2 format) checkpoint, as tf.compat.v1.train.Saver writes it."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        var_list = {
            name: tf.compat.v1.Variable(arr, name=f"v{i}")
            for i, (name, arr) in enumerate(tensors.items())
        }
        saver = tf.compat.v1.train.Saver(var_list=var_list)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return Path(saver.save(sess, str(prefix), global_step=70280))


# --- independent NumPy reference of the TF1 cells -------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def tf1_reference(
    w: dict,
    naming: str,
    cell: str,
    ids: np.ndarray,
    forget_bias: float,
    V: int,
    onehot: bool = False,
) -> np.ndarray:
    """Logits (B, T, V) of the TF1 graph: embedding_lookup -> MultiRNNCell(cells) -> softmax_w, softmax_b."""
    multi, sm = PREFIX[naming]
    scope = SCOPE[cell]
    w = {k: v.astype(np.float64) for k, v in w.items()}
    B, T = ids.shape
    emb = np.eye(V) if onehot else w["embedding"]
    layers = sorted(
        {k.split("/cell_")[1].split("/")[0] for k in w if k.startswith(multi + "/cell_")}, key=int
    )
    H = w[f"{sm}softmax_w"].shape[0]
    # LSTMStateTuple(c, h); h only otherwise
    state = [(np.zeros((B, H)), np.zeros((B, H))) for _ in layers]
    out = np.zeros((B, T, V))
    for t in range(T):
        x = emb[ids[:, t]]
        for n, i in enumerate(layers):
            p = f"{multi}/cell_{i}/{scope}"
            c, h = state[n]
            if cell in ("lstm", "LSTMCell"):  # BasicLSTMCell.call
                z = np.concatenate([x, h], 1) @ w[f"{p}/kernel"] + w[f"{p}/bias"]
                i_, j, f, o = np.split(z, 4, axis=1)
                c = c * _sigmoid(f + forget_bias) + _sigmoid(i_) * np.tanh(j)
                h = np.tanh(c) * _sigmoid(o)
            elif cell == "gru":  # GRUCell.call
                value = _sigmoid(
                    np.concatenate([x, h], 1) @ w[f"{p}/gates/kernel"] + w[f"{p}/gates/bias"]
                )
                r, u = np.split(value, 2, axis=1)
                cand = np.tanh(
                    np.concatenate([x, r * h], 1) @ w[f"{p}/candidate/kernel"]
                    + w[f"{p}/candidate/bias"]
                )
                h = u * h + (1 - u) * cand
            else:  # BasicRNNCell.call
                h = np.tanh(np.concatenate([x, h], 1) @ w[f"{p}/kernel"] + w[f"{p}/bias"])
            state[n] = (c, h)
            x = h
        out[:, t] = x @ w[f"{sm}softmax_w"] + w[f"{sm}softmax_b"]
    return out


def keras_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """The imported network over ids (B, T), in two chunks with the packed state carried between them."""
    net, _, _ = load_model_dir(model_dir)
    half = ids.shape[1] // 2
    a, state = net(tf.constant(ids[:, :half]), None)
    b, _ = net(tf.constant(ids[:, half:]), state)
    return np.concatenate([a.numpy(), b.numpy()], axis=1)


def seqs(V: int, seed: int = 0) -> np.ndarray:
    # 3 sequences x 20 steps
    return np.random.default_rng(seed).integers(0, V, (3, 20)).astype(np.int32)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "naming,flag,expected_fb",
    [
        # crazydonkey hard-codes forget_bias=0.0: the default follows it
        (
            "crazydonkey",
            None,
            0.0,
        ),
        ("crazydonkey", 1.0, 1.0),
        ("sherjilozair", None, 1.0),  # TF's default BasicLSTMCell(forget_bias=1.0)
        ("sherjilozair", 0.0, 0.0),
    ],
)
def test_lstm_checkpoint_matches_tf1_math(tmp_path, capsys, naming, flag, expected_fb):
    V, H, E = len(CHARS), 12, 7
    w = tf1_weights(naming, "lstm", V, H, E, layers=2, seed=1)
    run_dir = tmp_path / "run"
    prefix = save_tf1_checkpoint(run_dir / "best_model" / "model", w)
    # crazydonkey's train.py writes vocab.json {char: id} next to best_model/
    if naming == "crazydonkey":
        (run_dir / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(CHARS)}))
        argv = ["--checkpoint", prefix]  # vocabulary found automatically
    else:  # sherjilozair's save/chars_vocab.pkl = pickle((chars, {char: id}))
        with open(run_dir / "chars_vocab.pkl", "wb") as f:
            pickle.dump((tuple(CHARS), {c: i for i, c in enumerate(CHARS)}), f, protocol=2)
        argv = [
            "--checkpoint",
            run_dir / "best_model",
            "--vocab",
            run_dir / "chars_vocab.pkl",
            "--trust-pickle",
        ]
    if flag is not None:
        argv += ["--forget-bias", flag]
    out = tmp_path / "imported"
    rc, stdout, err = run([*argv, "--out", out], capsys)
    assert rc == 0, err
    assert f"naming {naming}" in stdout

    ids = seqs(V)
    got = keras_logits(out, ids)
    want = tf1_reference(w, naming, "lstm", ids, expected_fb, V)
    assert np.max(np.abs(got - want)) <= TOL
    if expected_fb != 0.0:  # the forget bias really matters: without it the logits differ
        assert np.max(np.abs(got - tf1_reference(w, naming, "lstm", ids, 0.0, V))) > 1e-2

    card = json.loads((out / "model_card.json").read_text())
    src = card["imported_from"]
    assert src["format"] == "tf1-checkpoint" and src["naming"] == naming
    assert (
        src["forget_bias"] == expected_fb
        and src["cell"] == "lstm"
        and src["tf1_cell"] == "BasicLSTMCell"
    )
    assert src["variables"]["cell_1/kernel"] == f"{PREFIX[naming][0]}/cell_1/basic_lstm_cell/kernel"
    files = {Path(f["file"]).name: f["md5"] for f in src["files"]}
    assert f"{prefix.name}.index" in files and any(".data-" in n for n in files)
    assert all(len(m) == 32 for m in files.values())
    assert card["architecture"] == {
        "vocab_size": V,
        "cell": "lstm",
        "layers": 2,
        "hidden": H,
        "embedding": E,
        "dropout": 0.0,
    }


def test_gru_checkpoint_needs_reset_before_matmul(tmp_path, capsys):
    V, H, E = len(CHARS), 10, 6
    w = tf1_weights("sherjilozair", "gru", V, H, E, layers=2, seed=2)
    prefix = save_tf1_checkpoint(tmp_path / "save" / "model.ckpt", w)
    (tmp_path / "vocab.txt").write_text(CHARS)  # text vocabulary: id = position
    out = tmp_path / "gru"
    rc, _, err = run(
        [
            "--checkpoint",
            f"{prefix}.index",
            "--vocab",
            tmp_path / "vocab.txt",
            "--out",
            out,
            "--cell",
            "gru",
        ],
        capsys,
    )
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["cell"] == "gru" and config["reset_after"] is False
    ids = seqs(V, 1)
    assert (
        np.max(
            np.abs(keras_logits(out, ids) - tf1_reference(w, "sherjilozair", "gru", ids, 0.0, V))
        )
        <= TOL
    )
    assert json.loads((out / "model_card.json").read_text())["imported_from"]["forget_bias"] is None


def test_basic_rnn_with_onehot_input(tmp_path, capsys):
    """crazydonkey with --embedding_size=0 feeds one-hot characters: there is no embedding variable."""
    V, H = len(CHARS), 9
    w = tf1_weights("crazydonkey", "rnn", V, H, 0, layers=3, seed=3)
    prefix = save_tf1_checkpoint(tmp_path / "ckpt" / "model", w)
    (tmp_path / "vocab.json").write_text(json.dumps({"chars": list(CHARS)}))
    out = tmp_path / "rnn"
    rc, stdout, err = run(
        ["--checkpoint", prefix, "--vocab", tmp_path / "vocab.json", "--out", out], capsys
    )
    assert rc == 0, err
    assert "onehot" in stdout
    net, _, card = load_model_dir(out)
    assert np.array_equal(net.embed.get_weights()[0], np.eye(V, dtype=np.float32))
    assert card["imported_from"]["input"] == "onehot" and card["architecture"]["embedding"] == V
    ids = seqs(V, 2)
    want = tf1_reference(w, "crazydonkey", "rnn", ids, 0.0, V, onehot=True)
    assert np.max(np.abs(keras_logits(out, ids) - want)) <= TOL


def test_map_renames_tf0_names(tmp_path, capsys):
    """--map for names no built-in scheme knows (TF 0.x: RNN/MultiRNNCell/Cell0/BasicLSTMCell/Linear/...)."""
    V, H, E = len(CHARS), 8, 5
    w = tf1_weights("crazydonkey", "LSTMCell", V, H, E, layers=2, seed=4, extras=False)
    rename = {"embedding": "emb/table", "softmax/softmax_w": "out/W", "softmax/softmax_b": "out/b"}
    maps = ["embedding=emb/table", "softmax_w=out/W", "softmax_b=out/b"]
    for i in range(2):
        for ours, tf0 in (("kernel", "Matrix"), ("bias", "Bias")):
            rename[f"rnn/multi_rnn_cell/cell_{i}/lstm_cell/{ours}"] = (
                f"RNN/MultiRNNCell/Cell{i}/LSTMCell/Linear/{tf0}"
            )
            maps.append(f"cell_{i}/{ours}=RNN/MultiRNNCell/Cell{i}/LSTMCell/Linear/{tf0}")
    prefix = save_tf1_checkpoint(tmp_path / "tf0" / "model", {rename[k]: v for k, v in w.items()})
    (tmp_path / "vocab.json").write_text(json.dumps({"chars": list(CHARS)}))
    out = tmp_path / "mapped"
    argv = [
        "--checkpoint",
        prefix,
        "--vocab",
        tmp_path / "vocab.json",
        "--out",
        out,
        "--naming",
        "sherjilozair",
    ]
    for m in maps:
        argv += ["--map", m]
    # Cells named with --map come from an unknown project: their forget_bias is not guessed (the scheme's 0.0
    # was taken before, which converted with logits off by ~2 and exit 0).
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "error: --forget-bias: required for LSTM cells named with --map" in err, err
    assert not out.exists()
    rc, _, err = run([*argv, "--forget-bias", "1.0"], capsys)
    assert rc == 0, err
    ids = seqs(V, 3)
    want = tf1_reference(w, "crazydonkey", "LSTMCell", ids, 1.0, V)
    assert np.max(np.abs(keras_logits(out, ids) - want)) <= TOL


def test_map_of_a_cell_scope_keeps_its_cell_class_and_needs_the_forget_bias(tmp_path, capsys):
    """--map cell_N=<scope>/basic_lstm_cell: the scope's last name says BasicLSTMCell (not LSTMCell)."""
    V, H, E = len(CHARS), 8, 5
    w = tf1_weights("crazydonkey", "lstm", V, H, E, layers=2, seed=6, extras=False)
    renamed = {
        k.replace("rnn/multi_rnn_cell/", "net/stack/").replace("softmax/", "head/"): v
        for k, v in w.items()
    }
    prefix = save_tf1_checkpoint(tmp_path / "ckpt" / "model", renamed)
    (tmp_path / "vocab.json").write_text(json.dumps({"chars": list(CHARS)}))
    out = tmp_path / "mapped"
    argv = [
        "--checkpoint",
        prefix,
        "--vocab",
        tmp_path / "vocab.json",
        "--out",
        out,
        "--map",
        "softmax_w=head/softmax_w",
        "--map",
        "softmax_b=head/softmax_b",
        "--map",
        "cell_0=net/stack/cell_0/basic_lstm_cell",
        "--map",
        "cell_1=net/stack/cell_1/basic_lstm_cell",
    ]
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "--forget-bias" in err, err
    rc, _, err = run([*argv, "--forget-bias", "0.0"], capsys)
    assert rc == 0, err
    src = json.loads((out / "model_card.json").read_text())["imported_from"]
    assert src["tf1_cell"] == "BasicLSTMCell" and src["forget_bias"] == 0.0
    ids = seqs(V, 3)
    assert (
        np.max(
            np.abs(keras_logits(out, ids) - tf1_reference(w, "crazydonkey", "lstm", ids, 0.0, V))
        )
        <= TOL
    )


# --- sampleCharRNN's .wts -------------------------------------------------------------------------


def read_wts_like_samplecharrnn(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """sampleCharRNN's loadWeights, step by step: `count`, then `name type`, getline to '(' and ')',
    skip one byte, read the blob, skip one byte; unrequested buffers are skipped by 2 + size bytes.
    """
    data = path.read_bytes()
    count, pos = data.split(b"\n", 1)[0], len(data.split(b"\n", 1)[0])
    out = {}
    for _ in range(int(count)):
        while data[pos : pos + 1].isspace():
            pos += 1
        name_end = data.index(b" ", pos)
        name = data[pos:name_end].decode()
        type_ = int(data[name_end : data.index(b"(", name_end)].strip())
        open_, close = data.index(b"(", pos), data.index(b")", pos)
        n = int(np.prod([int(d) for d in data[open_ + 1 : close].split(b",") if d.strip()]))
        nbytes = n * {0: 4, 1: 2, 2: 1, 3: 4}[type_]
        pos = close + 1
        if name in names:
            out[name] = np.frombuffer(data[pos + 1 : pos + 1 + nbytes], dtype="<f4")
        pos += 2 + nbytes
        assert data[pos - 1 : pos] == b"\n"
    return out


def test_wts_v2_as_samplecharrnn_reads_it(tmp_path, capsys):
    V, H, E = 65, 16, 12  # sampleCharRNN's vocabulary; a small model
    w = tf1_weights("crazydonkey", "lstm", V, H, E, layers=2, seed=5)
    wts = tmp_path / "char-rnn.wts"
    write_wts(wts, w)
    # The file is what the sample's loader expects, under the names the sample asks for.
    wanted = {
        "rnn_multi_rnn_cell_cell_0_basic_lstm_cell_kernel",
        "rnn_multi_rnn_cell_cell_1_basic_lstm_cell_bias",
        "softmax_softmax_w",
        "softmax_softmax_b",
        "embedding",
    }
    got = read_wts_like_samplecharrnn(wts, wanted)
    assert set(got) == wanted
    assert np.array_equal(got["softmax_softmax_w"], w["softmax/softmax_w"].ravel())
    assert wts.read_bytes().startswith(b"%d\n" % len(w))
    assert b"softmax_softmax_b 0 (65,) " in wts.read_bytes()

    out = tmp_path / "samplecharrnn"
    rc, stdout, err = run(["--wts", wts, "--vocab-builtin", "samplecharrnn", "--out", out], capsys)
    assert rc == 0, err
    assert "naming samplecharrnn" in stdout and "forget_bias 0" in stdout
    ids = seqs(V, 4)
    want = tf1_reference(w, "crazydonkey", "lstm", ids, 0.0, V)
    assert np.max(np.abs(keras_logits(out, ids) - want)) <= TOL
    card = json.loads((out / "model_card.json").read_text())["imported_from"]
    assert card["format"] == "wts-v2" and card["vocabulary"] == "builtin:samplecharrnn"
    assert json.loads((out / "vocab.json").read_text())["chars"][:4] == ["\n", "!", " ", "$"]


def test_imported_wts_goes_through_export_and_verify(tmp_path, capsys):
    """The issue's workflow: .wts -> import -> `make export` -> `make verify` (ONNX Runtime == TensorFlow)."""
    from export.__main__ import main as export_main
    from export.verify import main as verify_main

    w = tf1_weights("crazydonkey", "lstm", 65, 16, 12, layers=2, seed=6)
    wts, model_dir = tmp_path / "char-rnn.wts", tmp_path / "samplecharrnn"
    write_wts(wts, w)
    rc, _, err = run(["--wts", wts, "--vocab-builtin", "samplecharrnn", "--out", model_dir], capsys)
    assert rc == 0, err
    repo = tmp_path / "repo"
    assert export_main(["--model-dir", str(model_dir), "--repo", str(repo)]) == 0
    capsys.readouterr()
    onnx_path = str(repo / ONNX / "1" / "model.onnx")
    rc = verify_main(["--model-dir", str(model_dir), "--onnx", onnx_path, "--length", "200"])
    out = capsys.readouterr().out
    assert rc == 0 and "PASS" in out and "FAIL" not in out, out


def test_wts_v1_hex_without_shapes(tmp_path, capsys):
    V, H, E = len(CHARS), 8, 6
    w = tf1_weights("sherjilozair", "lstm", V, H, E, layers=2, seed=6)
    wts = tmp_path / "model.wts"
    write_wts(wts, w, version=1)
    first = wts.read_bytes().split(b"\n")[1]
    assert first.startswith(b"beta1_power 0 1 3f666666 ")  # `name type size` then hex words
    assert WtsStore(str(wts)).versions == {"v1"}
    (tmp_path / "v.json").write_text(json.dumps({"chars": list(CHARS)}))
    out = tmp_path / "v1"
    rc, _, err = run(
        ["--wts", wts, "--vocab", tmp_path / "v.json", "--naming", "sherjilozair", "--out", out],
        capsys,
    )
    assert rc == 0, err
    ids = seqs(V, 5)
    assert (
        np.max(
            np.abs(keras_logits(out, ids) - tf1_reference(w, "sherjilozair", "lstm", ids, 1.0, V))
        )
        <= TOL
    )


def test_builtin_vocabulary_is_samplecharrnns_map():
    # SampleCharRNNMaps::charToID, transcribed pair by pair from samples/sampleCharRNN/sampleCharRNN.cpp.
    pairs = {
        "\n": 0,
        "!": 1,
        " ": 2,
        "$": 3,
        "'": 4,
        "&": 5,
        "-": 6,
        ",": 7,
        ".": 8,
        "3": 9,
        ";": 10,
        ":": 11,
        "?": 12,
        "A": 13,
        "C": 14,
        "B": 15,
        "E": 16,
        "D": 17,
        "G": 18,
        "F": 19,
        "I": 20,
        "H": 21,
        "K": 22,
        "J": 23,
        "M": 24,
        "L": 25,
        "O": 26,
        "N": 27,
        "Q": 28,
        "P": 29,
        "S": 30,
        "R": 31,
        "U": 32,
        "T": 33,
        "W": 34,
        "V": 35,
        "Y": 36,
        "X": 37,
        "Z": 38,
        "a": 39,
        "c": 40,
        "b": 41,
        "e": 42,
        "d": 43,
        "g": 44,
        "f": 45,
        "i": 46,
        "h": 47,
        "k": 48,
        "j": 49,
        "m": 50,
        "l": 51,
        "o": 52,
        "n": 53,
        "q": 54,
        "p": 55,
        "s": 56,
        "r": 57,
        "u": 58,
        "t": 59,
        "w": 60,
        "v": 61,
        "y": 62,
        "x": 63,
        "z": 64,
    }
    assert {c: i for i, c in enumerate(SAMPLECHARRNN_CHARS)} == pairs
    corpus = ROOT / "data" / "tinyshakespeare.txt"
    if corpus.is_file():  # the Tiny Shakespeare character set, but not in sorted order
        assert sorted(SAMPLECHARRNN_CHARS) == sorted(set(corpus.read_text(encoding="utf-8")))
    assert list(SAMPLECHARRNN_CHARS) != sorted(SAMPLECHARRNN_CHARS)


# --- the imported directory works with the rest of the project -------------------------------------


def test_imported_model_samples_greedy_like_tf1(tmp_path, capsys):
    from train.sample import main as sample_main

    V, H, E = 65, 16, 8
    w = tf1_weights("crazydonkey", "lstm", V, H, E, layers=2, seed=7)
    wts = tmp_path / "char-rnn.wts"
    write_wts(wts, w)
    out = tmp_path / "m"
    assert run(["--wts", wts, "--vocab-builtin", "samplecharrnn", "--out", out], capsys)[0] == 0

    prompt, length = "ROMEO", 30
    assert (
        sample_main(
            ["--model-dir", str(out), "--greedy", "--prompt", prompt, "--length", str(length)]
        )
        == 0
    )
    text = capsys.readouterr().out
    # Greedy decoding with the TF1 reference (sampleCharRNN's loop: feed the argmax back in).
    index = {c: i for i, c in enumerate(SAMPLECHARRNN_CHARS)}
    ids = [index[c] for c in prompt]
    for _ in range(length):
        logits = tf1_reference(w, "crazydonkey", "lstm", np.array([ids]), 0.0, V)[0, -1]
        ids.append(int(np.argmax(logits)))
    assert text == "".join(SAMPLECHARRNN_CHARS[i] for i in ids) + "\n"


# --- errors ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> tuple[Path, dict, Path]:
    d = tmp_path_factory.mktemp("small")
    w = tf1_weights("crazydonkey", "lstm", len(CHARS), 6, 4, layers=1, seed=8)
    (d / "vocab.json").write_text(json.dumps({"chars": list(CHARS)}))
    return save_tf1_checkpoint(d / "ok" / "model", w), w, d / "vocab.json"


def test_error_unknown_names_lists_found_and_expected(tmp_path, capsys, small_ckpt):
    _, w, vocab = small_ckpt
    odd = {k.replace("softmax/", "output_layer/"): v for k, v in w.items()}
    prefix = save_tf1_checkpoint(tmp_path / "odd" / "model", odd)
    rc, _, err = run(["--checkpoint", prefix, "--vocab", vocab, "--out", tmp_path / "x"], capsys)
    assert rc == 2
    assert err.startswith("error: ") and "output_layer/softmax_w" in err  # found
    assert "softmax/softmax_w" in err and "rnnlm/softmax_w" in err  # expected, per scheme
    assert "--map" in err and "--naming" in err
    assert "/Adam" not in err  # optimizer slots are left out of the listing
    assert not (tmp_path / "x").exists()
    # The same in a .wts dump: names are listed and expected in the file's '/' -> '_' spelling.
    write_wts(tmp_path / "odd.wts", odd)
    rc, _, err = run(
        ["--wts", tmp_path / "odd.wts", "--vocab", vocab, "--out", tmp_path / "x"], capsys
    )
    assert rc == 2 and "output_layer_softmax_w" in err and "missing softmax_softmax_w" in err
    assert "_Adam" not in err


def test_error_cell_flag_contradicts_file(tmp_path, capsys, small_ckpt):
    prefix, _, vocab = small_ckpt
    rc, _, err = run(
        ["--checkpoint", prefix, "--vocab", vocab, "--cell", "gru", "--out", tmp_path / "x"], capsys
    )
    assert rc == 2 and "basic_lstm_cell) is not a gru cell" in err


def test_error_wrong_shape(tmp_path, capsys, small_ckpt):
    _, w, vocab = small_ckpt
    bad = dict(w)
    # not (4+6, 24)
    bad["rnn/multi_rnn_cell/cell_0/basic_lstm_cell/kernel"] = np.zeros((5, 24), np.float32)
    prefix = save_tf1_checkpoint(tmp_path / "bad" / "model", bad)
    rc, _, err = run(["--checkpoint", prefix, "--vocab", vocab, "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "has shape (5, 24), expected (10, 24)" in err


def test_error_vocabulary_size_mismatch(tmp_path, capsys, small_ckpt):
    prefix, _, _ = small_ckpt
    rc, _, err = run(
        ["--checkpoint", prefix, "--vocab-builtin", "samplecharrnn", "--out", tmp_path / "x"],
        capsys,
    )
    assert rc == 2 and "65 characters but the weights 14" in err


def test_error_pickle_needs_trust(tmp_path, capsys, small_ckpt):
    prefix, _, _ = small_ckpt
    pkl = tmp_path / "chars_vocab.pkl"
    pkl.write_bytes(pickle.dumps((tuple(CHARS), {c: i for i, c in enumerate(CHARS)})))
    rc, _, err = run(["--checkpoint", prefix, "--vocab", pkl, "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "pickle" in err and "run arbitrary code" in err and "--trust-pickle" in err


class _RunsCode:
    """Unpickling this would call os.system (what a hostile vocabulary pickle does)."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > pwned.txt",))


def test_trusted_pickle_is_still_data_only(tmp_path, capsys, small_ckpt, monkeypatch):
    prefix, _, _ = small_ckpt
    monkeypatch.chdir(tmp_path)
    pkl = tmp_path / "chars_vocab.pkl"
    pkl.write_bytes(pickle.dumps((_RunsCode(), {})))
    rc, _, err = run(
        ["--checkpoint", prefix, "--vocab", pkl, "--trust-pickle", "--out", tmp_path / "x"], capsys
    )
    assert rc == 2 and "cannot unpickle" in err and "refusing" in err and "system" in err, err
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "x").exists()


def test_error_peepholes_and_bad_files(tmp_path, capsys, small_ckpt):
    _, w, vocab = small_ckpt
    peep = {k.replace("basic_lstm_cell", "lstm_cell"): v for k, v in w.items()}
    peep["rnn/multi_rnn_cell/cell_0/lstm_cell/w_f_diag"] = np.zeros(6, np.float32)
    prefix = save_tf1_checkpoint(tmp_path / "peep" / "model", peep)
    rc, _, err = run(["--checkpoint", prefix, "--vocab", vocab, "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "peephole" in err

    wts = tmp_path / "cut.wts"
    write_wts(wts, {k: v for k, v in w.items() if "/Adam" not in k})
    wts.write_bytes(wts.read_bytes()[:-40])
    rc, _, err = run(["--wts", wts, "--vocab", vocab, "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "truncated" in err

    rc, _, err = run(
        ["--checkpoint", tmp_path / "nothing", "--vocab", vocab, "--out", tmp_path / "x"], capsys
    )
    assert rc == 2 and "checkpoint not found" in err
