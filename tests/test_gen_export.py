"""export/gen_export.py: the generation graph (INPUT_IDS, NOISE, TEMPERATURE, TOP_K -> OUTPUT_IDS, K characters
sampled in an ONNX Loop) for real: its contract and TensorRT readiness, ONNX Runtime equal to the TensorFlow
sampler (CharRNN.generate) in one call and in calls of 7, batch rows independent, and the GRU / SimpleRNN cells.
Its configs: tests/test_configs.py; served: tests/test_generate.py, tests/test_python_models.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from charrnn.contract import (
    INPUT_IDS,
    MAX_T,
    NOISE,
    OUTPUT_IDS,
    STATE_IN,
    STATE_OUT,
    TEMPERATURE,
    TOP_K,
)
from charrnn.sampling import Sampler, SamplingParams
from tests.helpers import GEN_LENGTH, GEN_PROMPTS, GREEDY, SEEDED, first_difference


@pytest.fixture(scope="module")
def gen_session(gen_onnx):
    from export.verify import ort_session

    return ort_session(gen_onnx)


def run_gen(session, prompt_ids, state, noise, temperature, top_k):
    b = len(prompt_ids)
    feeds = {
        INPUT_IDS: np.asarray(prompt_ids, np.int32),
        STATE_IN: state,
        NOISE: noise,
        TEMPERATURE: np.asarray(temperature, np.float32).reshape(b, 1),
        TOP_K: np.asarray(top_k, np.int32).reshape(b, 1),
    }
    return session.run([OUTPUT_IDS, STATE_OUT], feeds)


def noise_for(
    params: SamplingParams, k: int, vocab_size: int, sampler: Sampler | None = None
) -> np.ndarray:
    if params.greedy:
        return np.full((k, vocab_size), 0.5, np.float32)
    return (sampler or Sampler(params, vocab_size)).noise(k)


def test_gen_graph_contract_and_tensorrt_readiness(gen_proto, shipped):
    """The Loop graph passes the static TensorRT check, and is built the TensorRT-friendly way."""
    from export.gen_export import check_gen_io
    from export.trt_check import _nodes, check_model

    net, _ = shipped
    assert check_gen_io(gen_proto, net.config.contract) == []
    report = check_model(gen_proto)
    assert report.ready, report.text()
    ops = report.op_counts
    assert ops["LSTM"] == 2, "the prompt runs through the layers' ONNX LSTM ops"
    assert ops["Loop"] == 1 and ops["TopK"] >= 1 and ops["ArgMax"] >= 1
    assert not {"Multinomial", "RandomUniform", "RandomUniformLike", "RandomNormal"} & set(ops)
    (loop,) = [n for n in gen_proto.graph.node if n.op_type == "Loop"]
    body = next(a.g for a in loop.attribute if a.name == "body")
    carried = len(body.input) - 2
    assert loop.input[0], "the Loop has a trip count (K - 1): TensorRT gets a kCOUNT trip limit"
    assert (
        len(body.output) == 1 + carried and len(loop.output) == carried
    ), "no scan outputs (dynamic length)"
    assert (
        carried <= 6
    ), f"only the real loop state is carried (weights are read from outside): {carried}"
    constants = {
        i.name: onnx.numpy_helper.to_array(i)
        for g in (gen_proto.graph, body)
        for i in g.initializer
    }
    for node in _nodes(gen_proto.graph):
        if node.op_type == "TopK":  # k: a constant (V), below TensorRT's limit of 3840
            assert node.input[1] in constants, f"TopK {node.name}: k is not a constant"
            assert constants[node.input[1]].tolist() == [65]


def prime(session, prompt_ids, state):
    """A prompt longer than MAX_T (which the graph refuses) as the client sends it: every chunk but the last in
    a call of K = 1 whose id is discarded (its STATE_OUT is the state after the chunk). Returns (last chunk, state).
    """
    chunks = [prompt_ids[i : i + MAX_T] for i in range(0, len(prompt_ids), MAX_T)]
    for chunk in chunks[:-1]:
        _, state = run_gen(session, [chunk], state, np.full((1, 1, 65), 0.5, np.float32), 0.0, 0)
    return chunks[-1], state


def test_gen_onnx_matches_tf_reference(gen_session, shipped, tf_texts):
    """ONNX Runtime, one call of K = LENGTH characters, and the same in calls of 7 (state and last id carried);
    the prompt longer than MAX_T is primed in chunks first."""
    net, vocab = shipped
    zero = net.config.contract.zero_state(1)
    for params, prompts in (
        (GREEDY, GEN_PROMPTS),
        (SEEDED[0], GEN_PROMPTS[:1]),
        (SEEDED[2], GEN_PROMPTS[:1]),
    ):
        for prompt in prompts:
            want = tf_texts(prompt, params)
            t, k = (0.0, 0) if params.greedy else (params.temperature, params.top_k)
            last_chunk, primed = prime(gen_session, vocab.encode(prompt), zero)
            ids, _ = run_gen(
                gen_session,
                [last_chunk],
                primed,
                noise_for(params, GEN_LENGTH, len(vocab))[None],
                t,
                k,
            )
            assert (
                ids[0].tolist() == want
            ), f"{params}: first difference at {first_difference(ids[0], want)}"
            sampler, got, inp, state = Sampler(params, len(vocab)), [], [last_chunk], primed
            while len(got) < GEN_LENGTH:
                n = min(7, GEN_LENGTH - len(got))
                ids, state = run_gen(
                    gen_session, inp, state, noise_for(params, n, len(vocab), sampler)[None], t, k
                )
                got += ids[0].tolist()
                inp = ids[:, -1:]
            assert got == want


def test_gen_onnx_batch_rows_are_independent(gen_session, shipped):
    """Greedy, sampled and top-k rows in one batch each give what they give alone; TOP_K = V keeps all."""
    net, vocab = shipped
    V = len(vocab)
    prompts = np.array(
        [vocab.encode(p) for p in ("ROMEO:", "JULIET", "HAMLET", "Romeo ", "IAGO: ")], np.int32
    )
    rng = np.random.default_rng(3)
    state = (0.3 * rng.standard_normal((5, *net.config.contract.state_dims))).astype(np.float32)
    noise = rng.random((5, 24, V), dtype=np.float32) + np.float32(1e-7)
    temperature = [0.0, 0.8, 1.0, 1.5, 1.0]
    top_k = [0, 5, 0, 1, 0]
    ids, new_state = run_gen(gen_session, prompts, state, noise, temperature, top_k)
    for row in range(5):
        alone, alone_state = run_gen(
            gen_session,
            prompts[row : row + 1],
            state[row : row + 1],
            noise[row : row + 1],
            temperature[row],
            top_k[row],
        )
        assert ids[row].tolist() == alone[0].tolist()
        np.testing.assert_allclose(new_state[row], alone_state[0], atol=1e-5)
    assert len(set(map(tuple, ids.tolist()))) == 5
    # top-k 1 is greedy whatever the temperature and noise; greedy ignores the noise
    greedy, _ = run_gen(
        gen_session, prompts[3:4], state[3:4], np.full_like(noise[3:4], 0.5), 0.0, 0
    )
    assert ids[3].tolist() == greedy[0].tolist()
    every, _ = run_gen(gen_session, prompts[2:3], state[2:3], noise[2:3], 1.0, V)  # top-k V: all
    assert every[0].tolist() == ids[2].tolist()
    # TOP_K outside 0..V and a temperature below the floor are refused by the graph's guards, not clamped or
    # remapped: tests/test_guards.py.


@pytest.mark.parametrize("cell, extra", [("gru", {"reset_after": False}), ("rnn", {})])
def test_gen_export_of_one_slot_cells_matches_tf(cell, extra, tmp_path):
    """GRU (TF1-style reset gate) and SimpleRNN: the loop body calls their cells too (random weights)."""
    from charrnn.model import ModelConfig, build_net
    from export.gen_export import export_gen_onnx
    from export.trt_check import check_model
    from export.verify import ort_session

    net = build_net(
        ModelConfig(vocab_size=30, cell=cell, layers=2, hidden=16, embedding=8, **extra)
    )
    proto = export_gen_onnx(net, tmp_path / "gen.onnx")
    assert check_model(proto).ready, check_model(proto).text()
    session = ort_session(tmp_path / "gen.onnx")
    prime = np.array([3, 5, 7, 9, 11], np.int32)
    for params in (GREEDY, SamplingParams(temperature=0.7, top_k=7, seed=1)):
        want = net.generate(prime, 40, Sampler(params, 30))
        t, k = (0.0, 0) if params.greedy else (params.temperature, params.top_k)
        ids, _ = run_gen(
            session,
            prime[None],
            net.config.contract.zero_state(1),
            noise_for(params, 40, 30)[None],
            t,
            k,
        )
        assert ids[0].tolist() == want
