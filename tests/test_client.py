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

from charrnn.repository import PYTHON
from charrnn.sampling import SamplingParams
from serve.local_triton import free_port
from tests.helpers import (
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
        (
            ["--model", "no_such_model"],
            2,
            rf"^error: --model: no_such_model is not served by 127\.0\.0\.1:\d+ \(it serves {PYTHON}\)",
        ),
        (
            ["--chunk", "4"],
            2,
            rf"^error: models charrnn_gen_trt, .*: none of them is served by .* \(it serves {PYTHON}; with --chunk",
        ),
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


# --- flags as tritonclient names them, checked before connecting (no server needed) --------------------------
def test_url_and_protocol_resolution():
    from client.connection import parse_url

    assert parse_url(None, None) == ("127.0.0.1:8001", "grpc")
    assert parse_url(None, "http") == ("127.0.0.1:8000", "http")
    assert parse_url("http://h:8000", None) == ("h:8000", "http")
    assert parse_url("grpc://h:9", "grpc") == ("h:9", "grpc")
    assert parse_url("[::1]:8001", None) == ("[::1]:8001", "grpc")


def _no_server(*flags):
    """A bad flag needs no server: exit 2 even with nothing listening at --url."""
    return run_client("--url", f"127.0.0.1:{free_port()}", *flags, timeout=60)


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--top-k", "-1"], r"^error: top-k: must be >= 0, got -1"),
        (["--chunk", "8", "--top-p", "0.9"], r"^error: --top-p: is not available with --chunk"),
        (["--chunk", "4", "-i", "http"], r"^error: --chunk: needs gRPC"),
        (["--temperature", "0"], r"^error: temperature: must be >= 0\.001"),
        (["--seed", "-1"], r"^error: seed: must be in 0\.\.2\^63-1"),
        (
            ["--url", "127.0.0.1:abc"],
            r"^error: --url: port 'abc' of '127\.0\.0\.1:abc' is not a num",
        ),
        (["--url", "127.0.0.1"], r"^error: --url: expected host:port, got '127\.0\.0\.1'"),
        (["--url", "ftp://h:1"], r"^error: --url: unknown scheme 'ftp://'"),
        (
            ["-u", "grpc://h:1", "-i", "http"],
            r"^error: --url: 'grpc://h:1' says grpc, but --protocol",
        ),
        (["-u", "http://h:1", "--protocol", "grpc"], r"^error: --url: 'http://h:1' says http, but"),
        (["-i", "http", "--ssl"], r"^error: --ssl: TLS is supported over gRPC only"),
        (["-u", "http://h:1", "--ssl"], r"^error: --ssl: TLS is supported over gRPC only"),
        (["--root-certificates", __file__], r"^error: --ssl: is needed with --root-certificates"),
        (
            ["--ssl", "--root-certificates", "/no/ca.pem"],
            r"^error: --root-certificates: cannot read",
        ),
        (["--ssl", "--private-key", "/no/key.pem"], r"^error: --private-key: cannot read"),
        (
            ["--ssl", "--certificate-chain", "/no/c.pem"],
            r"^error: --certificate-chain: cannot read",
        ),
        (["--ssl", "--root-certificates", "/"], r"^error: --root-certificates: cannot read '/'"),
        (["-H", "no-colon"], r"^error: --header: expected Name:Value, got 'no-colon'"),
        (["-H", "bad name:x"], r"^error: --header: expected Name:Value"),
        (
            ["-H", "grpc-timeout:1"],
            r"^error: --header: 'grpc-timeout:1': names starting with grpc-",
        ),
        (["-H", "x:\x01"], r"^error: --header: .*: the value must be printable ASCII"),
        (["--client-timeout", "0"], r"^error: --client-timeout: must be > 0 seconds"),
        (["--shards", "0"], r"^error: --shards: must be in 1\.\.64"),
    ],
)
def test_flags_are_checked_before_connecting(flags, pattern):
    r = _no_server(*flags)
    assert r.returncode == 2, r.stderr
    assert re.search(pattern, r.stderr), r.stderr


def test_short_flags_are_tritonclients():
    r = run_client("-h")
    assert r.returncode == 0
    for flag in (
        "-u URL, --url URL",
        "-m MODEL, --model MODEL",
        "-i {grpc,http}, --protocol",
        "-H NAME:VALUE, --header NAME:VALUE",
        "-v, --verbose",
        "--client-timeout SECONDS",
        "--ssl",
        "--root-certificates FILE",
        "--private-key FILE",
        "--certificate-chain FILE",
        "TLS (gRPC only; --ssl with HTTP is an error)",
    ):
        assert flag in r.stdout, flag


def test_without_tritonclient_the_error_names_the_extra():
    """tritonclient hidden (as if the client extra were not installed): exit 2 and the pip command, not
    "unreachable"."""
    hide = (
        "import runpy, sys; sys.modules['tritonclient'] = None; "
        "sys.argv = ['python -m client', *sys.argv[1:]]; "
        "runpy.run_module('client', run_name='__main__', alter_sys=True)"
    )
    r = subprocess.run(
        [sys.executable, "-c", hide, "--url", f"127.0.0.1:{free_port()}", "--length", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: tritonclient: not installed"), r.stderr
    assert 'pip install "charrnn-triton[client]"' in r.stderr
    assert "unreachable" not in r.stderr


def test_protocol_http_without_url_uses_port_8000():
    import socket

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("something listens on 127.0.0.1:8000")
    r = run_client("-i", "http", "--length", "3")
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("error: server 127.0.0.1:8000: unreachable over http"), r.stderr


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_timeout_bounds_a_server_that_never_answers(protocol):
    """A port that accepts connections and never answers: --client-timeout 1 gives up in seconds, exit 3."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"{protocol}://127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        r = run_client("-u", url, "--client-timeout", "1", "--length", "3", timeout=60)
        elapsed = time.monotonic() - t0
    assert r.returncode == 3, r.stderr
    assert re.match(rf"error: server 127\.0\.0\.1:\d+: unreachable over {protocol}", r.stderr)
    assert elapsed < 15, elapsed


def test_example_with_the_server_down_is_a_message_and_exit_3():
    r = subprocess.run(
        [sys.executable, "-m", "client.example", "--url", f"127.0.0.1:{free_port()}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("error: server 127.0.0.1:") and "make serve" in r.stderr
    assert "Traceback" not in r.stderr


# --- the same flags against a real server -------------------------------------------------------------------
def test_url_scheme_sets_the_protocol(server):
    """http:// alone selects HTTP (the summary line says so), grpc:// gRPC; the text is the same."""
    env = {**os.environ, "TRITON_INFER_KEY": server.infer_key}
    flags = ["--model", PYTHON, "--greedy", "--length", "30"]
    h = subprocess.run(
        [sys.executable, "-m", "client", "-u", f"http://{server.http_url}", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    g = run_client("-u", f"grpc://{server.grpc_url}", *flags)
    assert h.returncode == 0 and g.returncode == 0, h.stderr + g.stderr
    assert f"via http://{server.http_url}:" in h.stderr
    assert f"via grpc://{server.grpc_url}:" in g.stderr
    assert h.stdout == g.stdout


def test_headers_carry_the_http_inference_key(server):
    """-H infer-key:KEY is sent with every HTTP request (no $TRITON_INFER_KEY); a wrong one is refused."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INFER_KEY"}
    base = [sys.executable, "-m", "client", "-i", "http", "-u", server.http_url, "-m", PYTHON]
    base += ["--greedy", "--length", "20", "-H", "x-tag:test"]
    ok = subprocess.run(
        [*base, "-H", f"infer-key:{server.infer_key}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [*base, "-H", "infer-key:wrong"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2, bad.stderr
    assert "the server refused HTTP inference" in bad.stderr


def test_verbose_goes_to_stderr_and_the_text_stays_alone_on_stdout(server):
    quiet = run_client("-u", server.grpc_url, "-m", PYTHON, "--greedy", "--length", "20")
    loud = run_client("-u", server.grpc_url, "-m", PYTHON, "--greedy", "--length", "20", "-v")
    assert quiet.returncode == loud.returncode == 0, loud.stderr
    assert loud.stdout == quiet.stdout
    assert f"client: connecting to grpc://{server.grpc_url}" in loud.stderr
    assert f"client: model {PYTHON}: ready, vocabulary of 65 characters" in loud.stderr
    # tritonclient's
    assert "is_server_live" in loud.stderr and "is_server_live" not in quiet.stderr


def test_ssl_against_a_plaintext_server_is_unreachable(server):
    r = run_client("-u", server.grpc_url, "--ssl", "--client-timeout", "5", "--length", "3")
    assert r.returncode == 3, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # (gRPC's core logs the failed handshake first)
    assert last.startswith(f"error: server {server.grpc_url}: unreachable over grpc with TLS"), last
    assert "--root-certificates" in last


STREAM_KEY = "s3cret"


@pytest.fixture(scope="module")
def odd_server(shipped_repo, tmp_path_factory):
    """charrnn_python, and charrnn_gen_python with a corrupt model.onnx (so in the repository but never ready),
    gRPC inference restricted to the header triton-grpc-protocol-stream-key: s3cret."""
    import shutil

    from charrnn.repository import GEN_PYTHON
    from serve.local_triton import LocalTriton

    repo = tmp_path_factory.mktemp("odd-repo")
    for name in (PYTHON, GEN_PYTHON):
        shutil.copytree(shipped_repo / name, repo / name)
    (repo / GEN_PYTHON / "1" / "model.onnx").write_bytes(b"not an onnx model")
    s = LocalTriton.on_free_ports(
        repo=repo,
        run_dir=tmp_path_factory.mktemp("odd-serve"),
        models=(PYTHON, GEN_PYTHON),
        extra_args=(
            "--exit-on-error=false",  # serve charrnn_python although charrnn_gen_python failed
            f"--grpc-restricted-protocol=inference:stream-key={STREAM_KEY}",
        ),
    )
    s.spawn()  # not start(): with a model that failed, the server is live but never "ready"
    try:
        import tritonclient.http as tc

        client = tc.InferenceServerClient(s.http_url)

        def ready():
            try:
                return client.is_model_ready(PYTHON)
            except Exception:
                return False

        wait_for(ready, 120, "charrnn_python to load")
        yield s
    finally:
        s.stop()


def test_a_model_that_failed_to_load_is_not_ready_exit_3(odd_server):
    from charrnn.repository import GEN_PYTHON

    for flags in (["--model", GEN_PYTHON, "--chunk", "4"], ["--chunk", "4"]):
        r = run_client("-u", odd_server.grpc_url, *flags, "--length", "3")
        assert r.returncode == 3, r.stderr
        assert re.match(r"error: models? .*: not ready on ", r.stderr), r.stderr
    r = run_client("-u", odd_server.grpc_url, "-m", "no_such_model")
    assert r.returncode == 2, r.stderr
    assert f"no_such_model is not served by {odd_server.grpc_url} (it serves {PYTHON})" in r.stderr


def test_headers_go_on_the_grpc_stream(odd_server):
    """gRPC inference restricted to a header: -H passes it on the stream; without it the server refuses."""
    flags = ["-u", odd_server.grpc_url, "-m", PYTHON, "--greedy", "--length", "20"]
    ok = run_client(*flags, "-H", f"triton-grpc-protocol-stream-key:{STREAM_KEY}")
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout) == len("ROMEO:\n") + 20 + 1
    # Without it (or with a wrong value) Triton 2.51 refuses the stream with UNAVAILABLE "This protocol is
    # restricted, expecting header 'triton-grpc-protocol-stream-key'": a caller mistake (exit 2) naming the
    # header, not an outage to retry (the default --retries 5 would otherwise say "retry 1/5").
    name = "triton-grpc-protocol-stream-key"
    for refused in (run_client(*flags), run_client(*flags, "-H", f"{name}:wrong")):
        assert refused.returncode == 2, refused.stderr
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith(
            f"error: server {odd_server.grpc_url}: requires the header {name}, which the request "
            "lacked or had wrong ("
        ), last
        assert f"expecting header '{name}'" in last
        assert last.endswith(f"(pass it with -H {name}:VALUE)"), last
        assert "retry" not in refused.stderr
        assert refused.stdout == "ROMEO:\n"  # nothing generated
