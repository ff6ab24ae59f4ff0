"""serve.runtime.gen_serving without Triton: request checks, batching and K-character generation on the exported graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
from google.protobuf import json_format

from charrnn.contract import (
    GEN,
    INPUT_IDS,
    LOGITS,
    MAX_K,
    MAX_T,
    MIN_TEMPERATURE,
    NOISE,
    STATE_IN,
    STATE_OUT,
    TEMPERATURE,
    TOP_K,
    ErrorCode,
)
from charrnn.onnx_runtime import ort_session
from charrnn.repository import GEN_PYTHON, ONNX, load_config, vocab_of
from charrnn.sampling import SamplingParams, choose, noise_stream, uniform_noise
from serve.runtime.gen_serving import GenRequest, GenRunner, check_gen_request, group_by_shape
from serve.runtime.sequence_state import (
    END,
    START,
    SequenceStates,
    graph_types,
    load_stateful_model,
)

# gen_model.load: the GEN rows of charrnn.contract's table
GEN_TENSORS = graph_types(GEN)
V = 65  # the shipped vocabulary


def triton_args(model_dir) -> dict:
    """initialize(args) as Triton's python backend fills it (the config as JSON, int64 fields as strings)."""
    config = json_format.MessageToDict(load_config(model_dir), preserving_proto_field_name=True)
    return {
        "model_config": json.dumps(config),
        "model_name": model_dir.name,
        "model_repository": str(model_dir),
        "model_version": "1",
    }


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen(shipped_repo):
    """The StatefulModel of charrnn_gen_python: the generation graph in ONNX Runtime, as gen_model.load opens it."""
    return load_stateful_model(triton_args(shipped_repo / GEN_PYTHON), GEN_TENSORS)


@pytest.fixture(scope="module")
def step_session(shipped_repo):
    """The step graph (INPUT_IDS, STATE_IN -> LOGITS, STATE_OUT): the independent reference."""
    return ort_session(shipped_repo / ONNX / "1" / "model.onnx")


@pytest.fixture(scope="module")
def vocab(shipped_repo):
    return vocab_of(load_config(shipped_repo / GEN_PYTHON))


def new_runner(gen) -> GenRunner:
    return GenRunner(
        gen.session,
        SequenceStates(tuple(gen.io[STATE_IN].shape[1:]), gen.idle_seconds, log=lambda m: None),
    )


@pytest.fixture
def runner(gen):
    r = new_runner(gen)
    yield r
    r.states.close()


@pytest.fixture
def other(gen):
    """A second, separate store: a sequence run there runs alone."""
    r = new_runner(gen)
    yield r
    r.states.close()


def noise_of(seed: int, k: int) -> np.ndarray:
    """(K, V) uniforms in (0, 1), as the client draws them (charrnn.sampling)."""
    return uniform_noise(noise_stream(seed), k, V)


def req(corr, flags, ids, noise, temperature=0.0, top_k=0, index=0) -> GenRequest:
    """One request as gen_model.parse builds it: ids (T,), noise (K, V) -> (1, T), (1, K, V), (1, 1), (1, 1)."""
    return GenRequest(
        index,
        corr,
        flags,
        {
            INPUT_IDS: np.asarray(ids, np.int32).reshape(1, -1),
            NOISE: np.asarray(noise, np.float32).reshape(1, -1, V),
            TEMPERATURE: np.array([[temperature]], np.float32),
            TOP_K: np.array([[top_k]], np.int32),
        },
    )


def run(runner, group) -> np.ndarray:
    with runner.states.lock:  # as the generation models' execute() holds it
        return runner.run(group)


def reference(step_session, prompt, noise, temperature, top_k, state=None):
    """One character per step-graph call, chosen by charrnn.sampling (argmax when temperature is 0), id_K not fed.
    prompt (T,), noise (K, V) -> ids [K], state (S, L, H) after the prompt and id_1..id_{K-1}."""
    dims = next(i.shape[1:] for i in step_session.get_inputs() if i.name == STATE_IN)  # (S, L, H)
    state = np.zeros((1, *dims), np.float32) if state is None else state[None]  # (1, S, L, H)
    params = SamplingParams(
        temperature=max(temperature, MIN_TEMPERATURE), top_k=top_k, greedy=temperature == 0
    )
    ids, out = np.asarray(prompt, np.int32)[None], []
    for j in range(len(noise)):
        logits, new_state = step_session.run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE_IN: state})
        state = new_state
        out.append(int(choose(logits[0], params, noise[j])))
        ids = np.array([[out[-1]]], np.int32)
    return out, state[0]


# --- check_gen_request ------------------------------------------------------------------------------------
def good() -> dict:
    return {
        "ids": np.array([[13, 27, 20]], np.int32),
        "noise": np.full((1, 4, V), 0.5, np.float32),
        "temperature": np.array([[0.8]], np.float32),
        "top_k": np.array([[5]], np.int32),
    }


def f32(x):
    return np.array(x, np.float32)


def check(t: dict, **limits) -> str | None:
    """check_gen_request on good()'s short keys."""
    names = {"ids": INPUT_IDS, "noise": NOISE, "temperature": TEMPERATURE, "top_k": TOP_K}
    return check_gen_request({names[k]: v for k, v in t.items()}, V, **limits)


SHAPE = "NOISE: shape must be [1, K, 65] with 1 <= K <= 256, got {}"
UNIFORM = "NOISE: values must be uniforms in the open interval (0, 1)"
TEMP = "TEMPERATURE: must be 0 (greedy) or >= 0.001 (smaller values overflow), got {}"


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("ids", None, "INPUT_IDS: missing"),
        ("noise", None, "NOISE: missing"),
        ("temperature", None, "TEMPERATURE: missing"),
        ("top_k", None, "TOP_K: missing"),
        ("ids", np.array([[13, 27]], np.int64), "INPUT_IDS: dtype must be INT32, got int64"),
        (
            "ids",
            np.zeros((1, MAX_T + 1), np.int32),
            "INPUT_IDS: shape must be [1, T] with 1 <= T <= 256, got [1, 257] (send long prompts in chunks)",
        ),
        ("ids", np.array([[13, 65]], np.int32), "INPUT_IDS: ids must be in 0..64, got 13..65"),
        ("noise", np.full((1, 4, V), 0.5, np.float64), "NOISE: dtype must be FP32, got float64"),
        ("noise", np.full((1, 0, V), 0.5, np.float32), SHAPE.format([1, 0, 65])),
        ("noise", np.full((1, MAX_K + 1, V), 0.5, np.float32), SHAPE.format([1, 257, 65])),
        ("noise", np.full((2, 4, V), 0.5, np.float32), SHAPE.format([2, 4, 65])),
        ("noise", np.full((1, 4, V - 1), 0.5, np.float32), SHAPE.format([1, 4, 64])),
        ("noise", np.full((4, V), 0.5, np.float32), SHAPE.format([4, 65])),
        ("noise", f32([[[0.5] * (V - 1) + [0.0]]]), UNIFORM),
        ("noise", f32([[[0.5] * (V - 1) + [1.0]]]), UNIFORM),
        ("noise", f32([[[0.5] * (V - 1) + [np.nan]]]), UNIFORM),
        ("noise", f32([[[0.5] * (V - 1) + [-0.5]]]), UNIFORM),
        (
            "temperature",
            np.array([[0.8]], np.float64),
            "TEMPERATURE: dtype must be FP32, got float64",
        ),
        ("temperature", f32([0.8]), "TEMPERATURE: shape must be [1, 1], got [1]"),
        ("temperature", f32([[1e-4]]), TEMP.format("9.999999747378752e-05")),
        ("temperature", f32([[1e-45]]), TEMP.format("1.401298464324817e-45")),
        # the float32 just below the floor
        (
            "temperature",
            f32([[np.nextafter(np.float32(MIN_TEMPERATURE), np.float32(0))]]),
            TEMP.format("0.0009999999310821295"),
        ),
        ("temperature", f32([[-1.0]]), TEMP.format("-1.0")),
        ("temperature", f32([[np.inf]]), TEMP.format("inf")),
        ("temperature", f32([[np.nan]]), TEMP.format("nan")),
        ("top_k", np.array([[5]], np.int64), "TOP_K: dtype must be INT32, got int64"),
        ("top_k", np.array([5], np.int32), "TOP_K: shape must be [1, 1], got [1]"),
        ("top_k", np.array([[-1]], np.int32), "TOP_K: must be in 0..65 (0 = all), got -1"),
        ("top_k", np.array([[V + 1]], np.int32), "TOP_K: must be in 0..65 (0 = all), got 66"),
    ],
)
def test_a_bad_request_tensor_gets_its_message(name, value, message):
    tensors = {**good(), name: value}
    assert check(tensors) == message


def test_the_first_missing_tensor_is_named_before_other_problems():
    bad_ids = np.array([[99]], np.int64)
    t = {"ids": bad_ids, "noise": None, "temperature": None, "top_k": np.array([[5]], np.int32)}
    assert check(t) == "NOISE: missing"


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", f32([[0.0]])),  # greedy
        ("temperature", f32([[-0.0]])),  # also greedy (the graph's temperature > 0 is false)
        ("temperature", f32([[MIN_TEMPERATURE]])),  # the floor itself
        ("top_k", np.array([[0]], np.int32)),  # all
        ("top_k", np.array([[V]], np.int32)),
        ("noise", np.full((1, MAX_K, V), 0.5, np.float32)),
        (
            "noise",
            f32(
                [
                    [
                        [np.finfo(np.float32).tiny] * 32
                        + [np.nextafter(np.float32(1), np.float32(0))] * 33
                    ]
                ]
            ),
        ),
        ("ids", np.full((1, MAX_T), V - 1, np.int32)),
    ],
)
def test_a_request_at_the_limits_is_accepted(name, value):
    tensors = {**good(), name: value}
    assert check(tensors) is None


def test_the_limits_are_parameters():
    t = good()
    assert check(t, max_t=2).startswith(
        "INPUT_IDS: shape must be [1, T] with 1 <= T <= 2, got [1, 3]"
    )
    assert check(t, max_k=3) == "NOISE: shape must be [1, K, 65] with 1 <= K <= 3, got [1, 4, 65]"


# --- group_by_shape ---------------------------------------------------------------------------------------
def test_requests_with_equal_t_and_k_form_one_group_in_order_of_first_appearance():
    shapes = [(1, 4), (3, 4), (1, 4), (1, 8), (3, 4), (1, 4)]  # (T, K)
    requests = [
        req(100 + i, 0, np.zeros(t), np.full((k, V), 0.5), index=i)
        for i, (t, k) in enumerate(shapes)
    ]
    assert [r.shape_key for r in requests] == shapes
    groups = group_by_shape(requests)
    assert [[r.index for r in g] for g in groups] == [[0, 2, 5], [1, 4], [3]]
    assert group_by_shape([]) == []


# --- GenRunner on the exported generation graph -----------------------------------------------------------
@pytest.mark.parametrize("k", [1, 7, 33])
def test_one_request_gives_k_characters_and_keeps_the_state(runner, step_session, vocab, k):
    prompt, noise = vocab.encode("ROMEO:\n"), noise_of(1, k)
    ids = run(runner, [req(1, START, prompt, noise, 0.9, 10)])  # (B=1, K)
    assert ids.shape == (1, k) and ids.dtype == np.int32
    want, state = reference(step_session, prompt, noise, 0.9, 10)
    assert ids[0].tolist() == want
    np.testing.assert_allclose(runner.states.states[1], state, atol=1e-4)  # (S, L, H)


def test_greedy_is_the_argmax_chain_of_the_step_graph_and_ignores_the_noise(
    runner, other, step_session, vocab
):
    prompt = vocab.encode("First Citizen:\n")
    ids = run(runner, [req(1, START, prompt, noise_of(2, 60), 0.0, 0)])
    want, state = reference(step_session, prompt, np.full((60, V), 0.5, np.float32), 0.0, 0)
    assert ids[0].tolist() == want
    np.testing.assert_allclose(runner.states.states[1], state, atol=1e-4)
    # other noise, a top-k: greedy ignores both
    assert run(other, [req(1, START, prompt, noise_of(3, 60), 0.0, 3)])[0].tolist() == want
    sampled = run(other, [req(2, START, prompt, noise_of(2, 60), 1.0, 0)])[0].tolist()
    assert sampled != want  # the same noise does change the text once the temperature is > 0


@pytest.mark.parametrize(
    "temperature, top_k", [(1.0, 0), (0.7, 5), (1.4, 20), (MIN_TEMPERATURE, 0), (2.0, V)]
)
def test_sampling_is_gumbel_max_on_the_step_graph_logits(
    runner, step_session, vocab, temperature, top_k
):
    prompt, noise = vocab.encode("JULIET:\n"), noise_of(4, 48)
    ids = run(runner, [req(1, START, prompt, noise, temperature, top_k)])
    want, _ = reference(step_session, prompt, noise, temperature, top_k)
    assert ids[0].tolist() == want


def test_top_k_1_is_greedy_whatever_the_temperature_and_noise(runner, step_session, vocab):
    prompt = vocab.encode("KING:\n")
    greedy, _ = reference(step_session, prompt, np.full((30, V), 0.5, np.float32), 0.0, 0)
    for corr, (seed, temperature) in enumerate([(5, 1.0), (6, 3.0), (7, MIN_TEMPERATURE)], start=1):
        assert (
            run(runner, [req(corr, START, prompt, noise_of(seed, 30), temperature, 1)])[0].tolist()
            == greedy
        )


def test_the_min_temperature_floor_is_accepted_and_samples_like_the_reference(
    runner, step_session, vocab
):
    """At the floor the graph divides the logits by 1e-3 and still picks what the reference picks; below it the
    request is refused."""
    prompt, noise = vocab.encode("ROMEO:\n"), noise_of(8, 40)
    at_floor = run(runner, [req(1, START, prompt, noise, MIN_TEMPERATURE, 0)])[0].tolist()
    assert at_floor == reference(step_session, prompt, noise, MIN_TEMPERATURE, 0)[0]
    t = {"ids": prompt[None], "noise": noise[None], "top_k": np.array([[0]], np.int32)}
    assert check({**t, "temperature": f32([[MIN_TEMPERATURE]])}) is None
    assert check({**t, "temperature": f32([[MIN_TEMPERATURE / 2]])}) == TEMP.format(
        float(np.float32(MIN_TEMPERATURE / 2))
    )


def test_two_requests_of_k_continue_one_sequence_like_one_request_of_2k(runner, other, vocab):
    prompt, noise = vocab.encode("HAMLET:\n"), noise_of(9, 24)  # (2K, V)
    first = run(runner, [req(1, START, prompt, noise[:12], 0.9, 10)])  # (1, K)
    # id_K is sent back, not fed before
    second = run(runner, [req(1, 0, first[0, -1:], noise[12:], 0.9, 10)])
    whole = run(other, [req(1, START, prompt, noise, 0.9, 10)])  # (1, 2K)
    assert first[0].tolist() + second[0].tolist() == whole[0].tolist()
    np.testing.assert_allclose(runner.states.states[1], other.states.states[1], atol=1e-5)


def prime(runner, prompts: dict, k: int = 3) -> None:
    """Start each sequence alone (prompts of different T), greedy."""
    for corr, prompt in prompts.items():
        run(runner, [req(corr, START, prompt, np.full((k, V), 0.5), 0.0, 0)])


def test_a_batch_gives_each_sequence_what_it_gets_alone(runner, gen, vocab):
    prompts = {
        1: vocab.encode("ROMEO:\n"),
        2: vocab.encode("JULIET:\n"),
        3: vocab.encode("ROMEO:\n"),
    }
    prime(runner, prompts)
    last = {corr: runner.states.gather([(corr, 0)])[0] for corr in prompts}  # (S, L, H) each
    sampling = [(0.0, 0), (0.8, 5), (1.2, 0), (1.0, 1)]  # greedy, top-k, plain, top-1
    group = [
        req(1, 0, vocab.encode("a"), noise_of(11, 16), *sampling[0], index=0),
        req(2, END, vocab.encode("a"), noise_of(12, 16), *sampling[1], index=1),
        req(3, 0, vocab.encode("a"), noise_of(13, 16), *sampling[2], index=2),
        req(4, START, vocab.encode("b"), noise_of(14, 16), *sampling[3], index=3),
    ]
    ids = run(runner, group)  # (B=4, K=16)
    for row, r in enumerate(group):
        alone = new_runner(gen)
        try:
            if r.corr in last:
                alone.states.scatter([(r.corr, START)], last[r.corr][None])
            assert ids[row].tolist() == run(alone, [r])[0].tolist()
            if r.corr != 2:
                np.testing.assert_allclose(
                    runner.states.states[r.corr], alone.states.states[r.corr], atol=1e-5
                )
        finally:
            alone.states.close()
    assert sorted(runner.states.states) == [1, 3, 4]  # 2 ended
    # same prompt and input as 3: only the sampling differs
    assert ids[0].tolist() != ids[2].tolist()


def test_steps_give_the_same_ids_and_state_as_run(runner, other, vocab):
    prompts = {1: vocab.encode("ROMEO:\n"), 2: vocab.encode("Second Citizen:\n")}
    prime(runner, prompts)
    prime(other, prompts)

    def group():
        return [
            req(1, 0, vocab.encode("T"), noise_of(21, 9), 0.9, 0, index=0),
            req(2, END, vocab.encode("W"), noise_of(22, 9), 0.0, 0, index=1),
            req(3, START, vocab.encode("I"), noise_of(23, 9), 1.1, 8, index=2),
        ]

    with runner.states.lock:
        got = list(runner.steps(group()))
    assert [j for j, _ in got] == list(range(9)) and all(ids.shape == (3, 1) for _, ids in got)
    streamed = np.concatenate([ids for _, ids in got], axis=1)  # (B=3, K=9)
    at_once = run(other, group())
    assert streamed.tolist() == at_once.tolist()
    assert sorted(runner.states.states) == sorted(other.states.states) == [1, 3]
    for corr in (1, 3):
        np.testing.assert_allclose(runner.states.states[corr], other.states.states[corr], atol=1e-5)


def test_steps_store_the_state_before_the_last_character_is_yielded(runner, vocab):
    prime(runner, {1: vocab.encode("ROMEO:\n")})
    before = runner.states.states[1].copy()
    group = [
        req(1, END, vocab.encode("T"), noise_of(31, 5), 0.9, 0, index=0),
        req(2, START, vocab.encode("W"), noise_of(32, 5), 0.9, 0, index=1),
    ]
    seen = []
    with runner.states.lock:
        for j, _ in runner.steps(group):  # what a decoupled model sees as it sends each character
            seen.append((j, 1 in runner.states.states, 2 in runner.states.states))
            if j < 4:
                np.testing.assert_array_equal(runner.states.states[1], before)  # not advanced yet
    assert seen == [
        (0, True, False),
        (1, True, False),
        (2, True, False),
        (3, True, False),
        (4, False, True),
    ]


def test_end_frees_the_sequence_and_a_reused_id_starts_from_zeros(
    runner, other, step_session, vocab
):
    first, second, noise = vocab.encode("KING:\n"), vocab.encode("QUEEN:\n"), noise_of(41, 20)
    ids = run(runner, [req(6, START, first, noise_of(40, 6), 0.0, 0)])
    run(runner, [req(6, END, ids[0, -1:], noise_of(40, 6), 0.0, 0)])
    assert len(runner.states) == 0
    assert runner.states.check(6, 0) == (
        ErrorCode.UNKNOWN_SEQUENCE,
        "unknown sequence (never started, ended, or idle longer than 60 s) "
        "(start it again with sequence_start=True)",
    )
    again = run(runner, [req(6, START, second, noise, 0.8, 0)])[0].tolist()
    assert again == run(other, [req(77, START, second, noise, 0.8, 0)])[0].tolist()
    np.testing.assert_allclose(runner.states.states[6], other.states.states[77], atol=1e-6)
    stale = reference(
        step_session,
        second,
        noise,
        0.8,
        0,
        state=reference(step_session, first, np.full((12, V), 0.5, np.float32), 0.0, 0)[1],
    )[0]
    assert again != stale  # what the old state would have given


def test_a_single_request_sequence_leaves_no_state(runner, vocab):
    ids = run(runner, [req(8, START | END, vocab.encode("ROMEO:\n"), noise_of(50, 4), 0.9, 0)])
    assert ids.shape == (1, 4) and len(runner.states) == 0
