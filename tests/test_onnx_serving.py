"""The exported graphs on Triton's own ONNX Runtime backend (built from source by `make backend`), with the sequence
batcher's implicit state: Triton, not Python, keeps each sequence's LSTM state (charrnn_onnx, charrnn_gen_onnx).

Against the real server: the backend is the real one; greedy and seeded text equal the TensorFlow reference;
32 interleaved sequences equal their solo runs; START resets the state; an idle sequence is freed and the
client re-primes it (a SIGKILLed server: tests/test_generate.py). No fixed sleeps.
"""

from __future__ import annotations

import numpy as np
import pytest

from charrnn.contract import STATE_IN, STATE_OUT
from charrnn.repository import CPU_CONFIG_NAME, GEN_ONNX, ONNX, ORT_MODELS
from charrnn.sampling import SamplingParams
from tests.helpers import (
    GEN_PROMPTS,
    GREEDY,
    LONG_PROMPT,
    SEEDED,
    RawStream,
    chunked,
    first_difference,
    log_size,
    log_text,
    served,
    start_server,
    tf_text,
    wait_for,
    with_idle_timeout,
)

PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed any further, hear me speak.", "JULIET:\n"]


# --- the backend is the real one ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ORT_MODELS)
def test_the_model_runs_on_the_onnxruntime_backend_with_implicit_state(ort_server, model):
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(ort_server.grpc_url)
    try:
        config = client.get_model_config(model, as_json=True)["config"]
        assert client.is_model_ready(model)
    finally:
        client.close()
    assert config["backend"] == "onnxruntime" and config["platform"] == "onnxruntime_onnx"
    (state,) = config["sequence_batching"]["state"]
    assert (state["input_name"], state["output_name"]) == (STATE_IN, STATE_OUT)
    assert [int(d) for d in state["dims"]] == [2, 2, 512]
    # our CPU servers load configs/cpu.pbtxt (--model-config-name): KIND_CPU, not KIND_AUTO
    assert [g["kind"] for g in config["instance_group"]] == ["KIND_CPU"]
    log = log_text(ort_server)
    assert "TRITONBACKEND_Initialize: onnxruntime" in log
    assert f"TRITON_MODEL_CONFIG_NAME={CPU_CONFIG_NAME} " in log  # the entrypoint adds the flag
    assert f"successfully loaded '{model}'" in log


# --- the text: TensorFlow's, batched or alone -------------------------------------------------------------------
def test_greedy_through_charrnn_onnx_equals_tf_reference(shipped, ort_server):
    greedy = SamplingParams(greedy=True)
    want = [tf_text(shipped, p, 300, greedy) for p in PROMPTS]
    got = served(ort_server, PROMPTS, 300, [greedy] * len(PROMPTS), model=ONNX)
    for prompt, w, g in zip(PROMPTS, want, got):
        assert g == w, f"prompt {prompt!r}: first difference at {first_difference(w, g)}"


def test_long_prompt_and_seeded_sampling_equal_tf_reference(shipped, ort_server):
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=11)
    assert served(ort_server, [LONG_PROMPT], 150, [params], model=ONNX) == [
        tf_text(shipped, LONG_PROMPT, 150, params)
    ]


@pytest.mark.parametrize("chunk", [1, 32])
def test_charrnn_gen_onnx_equals_tf_reference(chunk, ort_server, tf_texts):
    """K characters per request, sampled in the graph: greedy and seeded texts equal TensorFlow's."""
    prompts, params = GEN_PROMPTS + ["JULIET:\n"], [GREEDY, GREEDY, SEEDED[0]]
    got, _ = chunked(ort_server, GEN_ONNX, prompts, params, chunk)
    for prompt, p, g in zip(prompts, params, got):
        want = tf_texts(prompt, p)
        assert (
            g == want
        ), f"K={chunk} {prompt[:10]!r}: first difference at {first_difference(want, g)}"


def test_32_interleaved_seeded_sequences_equal_their_solo_runs(ort_server):
    """32 sequences on one stream are batched together by Triton; each one's state stays its own."""
    prompts = [f"{PROMPTS[i % 3]}{'abc'[i % 3] * (i % 5)}" for i in range(32)]
    params = [SamplingParams(temperature=0.8, top_k=10, seed=100 + i) for i in range(32)]
    together = served(ort_server, prompts, 80, params, model=ONNX)
    for i in (0, 7, 19, 31):
        assert served(ort_server, [prompts[i]], 80, [params[i]], model=ONNX) == [together[i]], i
    assert len(set(together)) > 20


def test_state_is_carried_and_start_resets_a_reused_id(ort_server):
    """Triton carries STATE_OUT into the next request's STATE_IN; a sequence id reused after END starts from
    zeros (initial_state zero_data), as a fresh id does."""
    stream = RawStream(ort_server.grpc_url, model=ONNX)
    try:
        stream.send("fresh/0", [[30, 40, 50, 60]], 901, start=True, end=True)
        fresh = stream.logits("fresh")
        stream.send("a/0", [[30, 40, 50]], 902, start=True)
        stream.send("a/1", [[60]], 902, end=True)
        stream.logits("a")
        carried = stream.logits("a")
        stream.send("b/0", [[60]], 903, start=True, end=True)
        alone = stream.logits("b")
        stream.send("c/0", [[30, 40, 50, 60]], 902, start=True, end=True)  # id 902 again
        reused = stream.logits("c")
    finally:
        stream.close()
    np.testing.assert_allclose(carried, fresh, rtol=0, atol=1e-5)
    assert not np.allclose(alone, fresh, atol=1e-2), "the state should matter"
    assert np.array_equal(reused, fresh)


# --- idle sequences, crashes: the client re-primes -------------------------------------------------------------
def test_idle_sequence_is_freed_and_the_client_reprimes(ort_backend, shipped_repo, tmp_path):
    """A repository whose sequences are freed after 1 s idle: the client stalls past it, Triton answers "must
    specify the START flag", the client re-primes each sequence and the text equals an uninterrupted run.
    """
    from client.generate import RetryPolicy

    repo = with_idle_timeout(shipped_repo, tmp_path / "repo", (ONNX,), 1_000_000)
    # verbose log: Triton's sequence reaper names each sequence it frees
    s = start_server(repo, tmp_path / "run", models=(ONNX,), extra_args=("--log-verbose=1",))
    try:
        prompts, greedy = ["ROMEO:\n", "JULIET:\n"], [GREEDY] * 2
        want = served(s, prompts, 100, greedy, model=ONNX)
        offset, chars, messages = log_size(s), [0], []

        def on_char(index, char):
            chars[0] += 1
            # stall, nothing in flight, until the reaper has freed both sequences
            if chars[0] == 50:
                wait_for(
                    lambda: log_text(s, offset).count("Reaper: force-ending CORRID") >= 2,
                    30,
                    "Triton to free both idle sequences",
                )

        got, seqs = served(
            s,
            prompts,
            100,
            greedy,
            model=ONNX,
            sequences=True,
            on_text=on_char,
            on_retry=messages.append,
            retry=RetryPolicy(retries=2),
        )
    finally:
        s.stop()
    assert got == want
    assert sum("unknown to the server; re-primed it as" in m for m in messages) == 2, messages
    assert all(seq.restarts == 1 for seq in seqs)


# --- bad input: refused with a clear error; the server and other sequences unharmed ----------------------------
V = 65  # the shipped model's vocabulary
BIG_T = (
    2_000_000  # one request with millions of ids: 8 MB on the wire, 4 GB of embeddings if it ran
)


def guard_message(name: str) -> str:
    from charrnn.contract import GUARD_MESSAGES

    return GUARD_MESSAGES[name].format(vocab_size=V, last_id=V - 1)


def gen_inputs(ids=((30,),), k=4, noise=None, temperature=0.0, top_k=0) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, np.int32)
    return {
        "INPUT_IDS": ids,
        "NOISE": np.full((1, k, V), 0.5, np.float32) if noise is None else noise,
        "TEMPERATURE": np.asarray([[temperature]], np.float32),
        "TOP_K": np.asarray([[top_k]], np.int32),
    }


def noise_with(value: float) -> np.ndarray:
    noise = np.full((1, 4, V), 0.5, np.float32)
    noise[0, 2, 7] = value
    return noise


# (model, case name, inputs, declared shape override or None, the text the error must contain)
STEP_CASES = [
    ("id-65", {"INPUT_IDS": np.asarray([[65]], np.int32)}, "INPUT_IDS"),
    ("id-minus-1", {"INPUT_IDS": np.asarray([[30, -1]], np.int32)}, "INPUT_IDS"),
    ("id-int32-max", {"INPUT_IDS": np.asarray([[2**31 - 1]], np.int32)}, "INPUT_IDS"),
    ("T-257", {"INPUT_IDS": np.full((1, 257), 30, np.int32)}, "INPUT_IDS"),
    ("T-2-million", {"INPUT_IDS": np.full((1, BIG_T), 30, np.int32)}, "INPUT_IDS"),
]
GEN_CASES = [
    ("id-minus-1", gen_inputs(ids=[[-1]]), "INPUT_IDS"),
    ("T-257", gen_inputs(ids=np.full((1, 257), 30)), "INPUT_IDS"),
    ("K-257", gen_inputs(k=257), "NOISE"),
    ("noise-nan", gen_inputs(noise=noise_with(np.nan)), "NOISE"),
    ("noise-inf", gen_inputs(noise=noise_with(np.inf)), "NOISE"),
    ("noise-0", gen_inputs(noise=noise_with(0.0)), "NOISE"),
    ("temperature-nan", gen_inputs(temperature=np.nan), "TEMPERATURE"),
    ("temperature-inf", gen_inputs(temperature=np.inf), "TEMPERATURE"),
    ("temperature-below-floor", gen_inputs(temperature=1e-4), "TEMPERATURE"),
    ("temperature-negative", gen_inputs(temperature=-1.0), "TEMPERATURE"),
    ("top-k-minus-1", gen_inputs(top_k=-1), "TOP_K"),
    ("top-k-66", gen_inputs(top_k=V + 1), "TOP_K"),
]
# Refused by Triton itself before the graph runs (INVALID_ARGUMENT), with its own words.
TRITON_CASES = [
    (ONNX, "dtype-int64", {"INPUT_IDS": np.asarray([[30]], np.int64)}, "expects 'INT32'"),
    (
        GEN_ONNX,
        "noise-wrong-shape",
        gen_inputs(noise=np.full((1, 4, V - 1), 0.5, np.float32)),
        "65",
    ),
    (GEN_ONNX, "temperature-fp64", {**gen_inputs(), "TEMPERATURE": np.zeros((1, 1))}, "FP32"),
]


def infer_error(server, model: str, inputs: dict, start=True, sequence_id=None, shape=None) -> str:
    """Send one request on its own sequence; the error's text (the test fails if it succeeds)."""
    import tritonclient.grpc as tc
    from tritonclient.utils import np_to_triton_dtype

    client = tc.InferenceServerClient(server.grpc_url)
    try:
        tensors = []
        for name, array in inputs.items():
            t = tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            t.set_data_from_numpy(array)
            if shape is not None and name == "INPUT_IDS":
                t.set_shape(shape)  # a declared shape that the data does not carry
            tensors.append(t)
        sid = sequence_id or int.from_bytes(np.random.bytes(6), "little") + 1
        client.infer(model, tensors, sequence_id=sid, sequence_start=start, sequence_end=start)
    except Exception as e:  # tritonclient.utils.InferenceServerException
        return f"{getattr(e, 'status', lambda: '')()} {e}"
    finally:
        client.close()
    pytest.fail(f"{model} accepted a bad request: {list(inputs)}")


@pytest.fixture
def bystander(ort_server, shipped):
    """A greedy sequence generating while the test sends bad requests; on exit, its text must equal the TF
    reference (it may have been refused with a bad request's batch: the client re-primes) and the server must be
    ready."""
    import threading

    from client.generate import RetryPolicy

    result = {}

    def run():
        try:
            result["text"] = served(
                ort_server,
                ["ROMEO:\n"],
                400,
                [GREEDY],
                model=ONNX,
                on_retry=result.setdefault("messages", []).append,
                retry=RetryPolicy(retries=50, delay=0.01, max_wait=30),
            )[0]
        except BaseException as e:  # reported below
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    thread.join(timeout=120)
    assert "error" not in result, result
    assert result["text"] == tf_text(shipped, "ROMEO:\n", 400, GREEDY), result.get("messages")
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(ort_server.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
    finally:
        client.close()


@pytest.mark.parametrize(
    "model, inputs, name",
    [(ONNX, i, n) for _, i, n in STEP_CASES] + [(GEN_ONNX, i, n) for _, i, n in GEN_CASES],
    ids=[f"{ONNX}-{c}" for c, _, _ in STEP_CASES] + [f"{GEN_ONNX}-{c}" for c, _, _ in GEN_CASES],
)
def test_the_graph_refuses_bad_input_with_its_message(ort_server, bystander, model, inputs, name):
    for _ in range(3):  # a few times, while the bystander's requests are being batched
        error = infer_error(ort_server, model, inputs)
        assert guard_message(name) in error, error


@pytest.mark.parametrize(
    "model, inputs, words", [c[::2] + c[3:] for c in TRITON_CASES], ids=[c[1] for c in TRITON_CASES]
)
def test_triton_refuses_wrong_dtypes_and_shapes_as_invalid_argument(
    ort_server, bystander, model, inputs, words
):
    error = infer_error(ort_server, model, inputs)
    assert error.startswith("StatusCode.INVALID_ARGUMENT") and words in error, error


def test_a_declared_shape_the_data_does_not_carry_is_refused(ort_server, bystander):
    """2^31 - 1 ids declared, 4 bytes sent: Triton checks the byte size before anything is allocated."""
    error = infer_error(
        ort_server, ONNX, {"INPUT_IDS": np.asarray([[30]], np.int32)}, shape=[1, 2**31 - 1]
    )
    assert error.startswith("StatusCode.INVALID_ARGUMENT") and "byte size" in error, error


@pytest.mark.parametrize("model", ORT_MODELS)
def test_a_request_without_start_for_an_unknown_sequence_is_refused(ort_server, model):
    inputs = {"INPUT_IDS": np.asarray([[30]], np.int32)} if model == ONNX else gen_inputs()
    error = infer_error(ort_server, model, inputs, start=False, sequence_id=987_654_321)
    assert error.startswith("StatusCode.INVALID_ARGUMENT"), error
    assert "must specify the START flag" in error, error


def test_millions_of_ids_do_not_grow_the_server(ort_server):
    """The T guard runs before the embedding: a 2,000,000-id request allocates no (T, 512) floats (4 GB)."""

    def rss_mb() -> float:
        status = open(f"/proc/{ort_server.process.pid}/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024  # peak resident set, MiB

    before = rss_mb()
    for _ in range(3):
        error = infer_error(ort_server, ONNX, {"INPUT_IDS": np.full((1, BIG_T), 30, np.int32)})
        assert guard_message("INPUT_IDS") in error
    assert rss_mb() - before < 400, f"peak RSS grew from {before:.0f} to {rss_mb():.0f} MiB"


# --- make demo: the main path ----------------------------------------------------------------------------------
def test_demo_generates_through_charrnn_onnx_and_says_so(ort_backend, shipped):
    """`make demo`'s command: its own server (free ports), TF's text, and a last line naming the real backend."""
    import subprocess
    import sys

    from charrnn.repository import BY_NAME
    from tests.helpers import COMMITTED_REPO, ROOT, SHIPPED_MODEL

    if not all((COMMITTED_REPO / m / "1" / BY_NAME[m].artifact).is_file() for m in ORT_MODELS):
        # what `make demo` runs first on a fresh clone
        from export.__main__ import (
            main as export_main,
        )

        assert export_main(["--model-dir", str(SHIPPED_MODEL), "--repo", str(COMMITTED_REPO)]) == 0

    r = subprocess.run(
        [sys.executable, "-m", "client.demo", "--prompt", "ROMEO:", "--length", "60", "--greedy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ROMEO:" + tf_text(shipped, "ROMEO:", 60, GREEDY).rstrip()
    last = r.stderr.strip().splitlines()[-1]
    assert last == (
        f"server stopped. Generated through {ONNX} on Triton's ONNX Runtime backend, built from source; "
        "Triton kept the state (implicit state)."
    ), r.stderr
