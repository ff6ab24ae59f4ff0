"""`python -m client` (client/__main__.py) and client/example.py against a real local Triton server (python
backend): what the command prints, its checks and exit codes, and what it does when the server crashes
mid-generation (--retries: reconnect and carry on; without: exit 3 with the text so far)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from charrnn.local_triton import free_port
from charrnn.repository import PYTHON
from charrnn.sampling import SamplingParams
from tests.conftest import (
    ROOT,
    client_cmd,
    ensure_up,
    inference_count,
    kill_server,
    restart_later,
    run_client_on,
    tf_text,
    wait_for,
)


def run_client(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_until(process, n: int, timeout: float = 120) -> bytes:
    """At least n bytes of the process's stdout (read as they stream)."""
    out, deadline = b"", time.monotonic() + timeout
    while len(out) < n:
        if time.monotonic() > deadline or process.poll() is not None:
            pytest.fail(f"the client printed {len(out)} bytes, expected {n}: {out[-200:]!r}")
        out += os.read(process.stdout.fileno(), n - len(out))
    return out


# --- generation and --expect ------------------------------------------------------------------------------
def test_same_seed_same_text_different_seed_differs(server):
    a = run_client("--url", server.grpc_url, "--seed", "5", "--length", "120", "--quiet")
    b = run_client("--url", server.grpc_url, "--seed", "5", "--length", "120", "--quiet")
    c = run_client("--url", server.grpc_url, "--seed", "6", "--length", "120", "--quiet")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr + c.stderr
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_client_cli_streams_and_checks_expect(shipped, server):
    want = tf_text(shipped, "ROMEO:", 80, SamplingParams(greedy=True))
    flags = (
        "--url",
        server.grpc_url,
        "--prompt",
        "ROMEO:",
        "--length",
        "80",
        "--greedy",
        "--expect",
    )
    ok = run_client(*flags, want)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "ROMEO:" + want + "\n"
    bad = run_client(*flags, "x")
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[-1].startswith("error: --expect: the generated text differs")


def test_example_client_passes_and_prints_the_reference_text(shipped, ort_server):
    """client/example.py, the raw protocol on one page (charrnn_onnx: Triton keeps the state), checks itself:
    PASS, exit 0, TF's greedy text."""
    r = subprocess.run(
        [sys.executable, "-m", "client.example", "--url", ort_server.grpc_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    text, verdict = r.stdout.rstrip("\n").rsplit("\n", 1)
    assert verdict == "PASS"
    assert text == "ROMEO:\n" + tf_text(shipped, "ROMEO:\n", 40, SamplingParams(greedy=True))


# --- bad input and an unreachable server ---------------------------------------------------------------------
def test_unknown_character_is_a_client_error_before_anything_is_sent(server):
    before = inference_count(server)
    r = run_client("--url", server.grpc_url, "--prompt", "Héllo wörld", "--length", "10")
    assert r.returncode == 2
    assert r.stderr.startswith("error: prompt:") and "'é'" in r.stderr and "'ö'" in r.stderr
    assert inference_count(server) == before


@pytest.mark.parametrize(
    "args, code, pattern",
    [
        (["--length", "0"], 2, r"^error: --length: must be >= 1"),
        (["--prompt", ""], 2, r"^error: --prompt: is empty"),
        (["--temperature", "-1"], 2, r"^error: temperature: must be >= 0\.001"),
        # a subnormal temperature overflowed logits / T into degenerate text, returned as success
        (
            ["--temperature", "1e-45"],
            2,
            r"^error: temperature: must be >= 0\.001 \(smaller values overflow",
        ),
        (["--temperature", "1e-45", "--chunk", "4"], 2, r"^error: temperature: must be >= 0\.001"),
        (["--top-k", "1000"], 2, r"^error: top-k: must be in 1\.\.65"),
        (["--top-p", "0"], 2, r"^error: top-p: must be in \(0, 1\]"),
        (["--model", "no_such_model"], 3, r"^error: model no_such_model: not ready"),
        (["--num-sequences", "0"], 2, r"^error: --num-sequences: must be in 1\.\.1024"),
        (
            ["--num-sequences", "1025"],
            2,
            r"^error: --num-sequences: must be in 1\.\.1024 \(the sequence slots",
        ),
        (["--seed", "-1"], 2, r"^error: seed: must be in 0\.\.2\^63-1"),
        (["--retries", "-1"], 2, r"^error: --retries: must be >= 0"),
        (["--chunk", "0"], 2, r"^error: --chunk: must be in 1\.\.256"),
        (["--chunk", "4", "--protocol", "http"], 2, r"^error: --chunk: needs gRPC"),
        (
            ["--chunk", "4", "--model", PYTHON],
            2,
            rf"^error: --model: {PYTHON} is not a server-side",
        ),
    ],
)
def test_bad_client_input_gives_clear_errors(server, args, code, pattern):
    r = run_client("--url", server.grpc_url, *args)
    assert r.returncode == code, r.stderr
    assert re.search(pattern, r.stderr), r.stderr


@pytest.mark.parametrize("url", ["127.0.0.1:{port}", "not a url"])
def test_unreachable_server_is_a_clear_error(url):
    r = run_client("--url", url.format(port=free_port()), "--length", "5")
    assert r.returncode in (2, 3)
    assert r.stderr.startswith("error: ")
    if r.returncode == 3:
        assert "unreachable" in r.stderr and "make serve" in r.stderr


def test_retry_flags_are_checked():
    for flags, pattern in (
        (["--retries", "-1"], r"^error: --retries: must be >= 0"),
        (["--retry-delay", "0"], r"^error: --retry-delay: must be > 0"),
        (["--retry-max-wait", "-1"], r"^error: --retry-max-wait: must be >= 0"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "client", "--url", f"127.0.0.1:{free_port()}", *flags],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2 and re.search(pattern, r.stderr), r.stderr


# --- a server crash: --retries, or exit 3 with the text so far --------------------------------------------
def test_cli_seeded_generation_survives_a_server_crash(restartable):
    s = restartable
    ensure_up(s)
    flags = [
        "--prompt",
        "ROMEO:",
        "--length",
        "1000",
        "--seed",
        "7",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--retry-delay",
        "0.2",
        "--retries",
        "10",
    ]
    want = run_client_on(s, *flags)
    assert want.returncode == 0, want.stderr
    client = subprocess.Popen(
        client_cmd(s, *flags), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out = read_until(client, len("ROMEO:") + 150)
        kill_server(s)
        restart = restart_later(s)
        rest, err = client.communicate(timeout=180)
    finally:
        client.kill()
    restart.join(timeout=120)
    assert client.returncode == 0, err.decode()
    assert (out + rest).decode() == want.stdout
    assert "retry 1/10" in err.decode() and "reconnected" in err.decode(), err.decode()


def test_cli_without_retries_exits_3_and_prints_the_text_so_far(restartable):
    s = restartable
    ensure_up(s)
    flags = ["--prompt", "ROMEO:", "--length", "1000", "--greedy"]
    want = run_client_on(s, *flags)
    assert want.returncode == 0, want.stderr
    client = subprocess.Popen(
        client_cmd(s, *flags, "--retries", "0"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out = read_until(client, len("ROMEO:") + 100)
        kill_server(s)
        rest, err = client.communicate(timeout=60)
    finally:
        client.kill()
        s.start()
    err = err.decode()
    assert client.returncode == 3, err
    last = err.strip().splitlines()[-1]
    assert re.match(
        rf"error: server {re.escape(s.grpc_url)}: connection lost \(.+\); \d+ of 1000 characters "
        r"kept \(restart the server, then run again with --retries N",
        last,
    ), last
    text = (out + rest).decode()
    assert (
        text.endswith("\n")
        and want.stdout.startswith(text[:-1])
        and len(text) > len("ROMEO:") + 100
    )
    kept = int(re.search(r"(\d+) of 1000 characters kept", last).group(1))
    assert len(text) - 1 - len("ROMEO:") == kept, "everything generated must be on stdout"


def test_cli_gives_up_after_its_retries_and_prints_partial_texts_of_every_sequence(restartable):
    """The server stays down: after --retries attempts the client exits 3, every sequence's text so far on stdout."""
    s = restartable
    ensure_up(s)
    before = inference_count(s)
    client = subprocess.Popen(
        client_cmd(
            s,
            "--prompt",
            "ROMEO:",
            "--length",
            "20000",
            "--greedy",
            "--num-sequences",
            "2",
            "--retries",
            "2",
            "--retry-delay",
            "0.1",
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: inference_count(s) - before >= 100 or client.poll() is not None,
            120,
            "the client to be generating",
        )
        kill_server(s)
        out, err = client.communicate(timeout=60)
    finally:
        client.kill()
        s.start()
    assert client.returncode == 3, err
    heads = re.findall(
        rf"=== sequence (\d) \({PYTHON}, seed None; partial: (\d+) of 20000 characters\) ===\n"
        r"ROMEO:",
        out,
    )
    assert [h[0] for h in heads] == ["0", "1"], out[:500]
    assert all(int(h[1]) > 0 for h in heads)
    lines = err.strip().splitlines()
    assert sum("warning: server" in line and "retry" in line for line in lines) == 2, err
    assert re.match(
        rf"error: server {re.escape(s.grpc_url)}: still unavailable \(.*\), gave up after 2 retries; "
        rf"{sum(int(h[1]) for h in heads)} of 40000 characters kept \(check the server",
        lines[-1],
    ), lines[-1]
