"""`make data` (train.prepare): copy from a shared path or download, always verified; real files, a real
local HTTP server on 127.0.0.1 (no network)."""

from __future__ import annotations

import http.server
import subprocess
import threading
from pathlib import Path

import pytest

from charrnn.data import CORPUS_MD5, md5_of
from serve.local_triton import free_port
from tests.helpers import PY, ROOT
from train.prepare import main as prepare


class Server:
    """Serves `body` at every path from a thread; records the requested paths."""

    def __init__(self, body: bytes, status: int = 200) -> None:
        self.body, self.status, self.requests = body, status, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                self.send_response(outer.status)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args):
                pass

        # Port 0: the OS picks a free port; the socket is listening when the constructor returns.
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tinyshakespeare/input.txt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def corpus_bytes(corpus) -> bytes:
    return corpus.read_bytes()


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}/input.txt"  # nothing listens there


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir()) if dest.parent.exists() else []


def test_copy_from_shared(tmp_path, corpus, capsys):
    dest = tmp_path / "data" / "tinyshakespeare.txt"
    assert prepare(["--dest", str(dest), "--shared", str(corpus), "--url", closed_url()]) == 0
    assert dest.read_bytes() == corpus.read_bytes()
    assert md5_of(dest) == CORPUS_MD5
    assert leftovers(dest) == ["tinyshakespeare.txt"]  # no .part left behind
    assert f"from {corpus} (verified)" in capsys.readouterr().out


def test_download_from_local_server(tmp_path, corpus_bytes):
    dest = tmp_path / "data" / "tinyshakespeare.txt"
    with Server(corpus_bytes) as server:
        r = subprocess.run(
            [
                PY,
                "-m",
                "train.prepare",
                "--dest",
                str(dest),
                "--shared",
                str(tmp_path / "no-shared"),
                "--url",
                server.url,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 0, r.stderr
    assert server.requests == ["/tinyshakespeare/input.txt"]
    assert dest.read_bytes() == corpus_bytes
    assert leftovers(dest) == ["tinyshakespeare.txt"]
    assert f"from {server.url} (verified)" in r.stdout


def test_present_and_verified_is_not_fetched_again(tmp_path, corpus, corpus_bytes, capsys):
    dest = tmp_path / "tinyshakespeare.txt"
    dest.write_bytes(corpus_bytes)
    with Server(b"must not be downloaded") as server:
        assert (
            prepare(["--dest", str(dest), "--shared", str(tmp_path / "none"), "--url", server.url])
            == 0
        )
        assert server.requests == []
        assert "already present and verified" in capsys.readouterr().out
        # --force fetches again (and still verifies)
        with Server(corpus_bytes) as good:
            assert (
                prepare(
                    [
                        "--dest",
                        str(dest),
                        "--shared",
                        str(tmp_path / "none"),
                        "--url",
                        good.url,
                        "--force",
                    ]
                )
                == 0
            )
            assert good.requests == ["/tinyshakespeare/input.txt"]
    assert dest.read_bytes() == corpus_bytes


def test_present_but_corrupt_is_replaced(tmp_path, corpus_bytes, capsys):
    dest = tmp_path / "tinyshakespeare.txt"
    dest.write_bytes(corpus_bytes[:-10])
    with Server(corpus_bytes) as server:
        assert (
            prepare(["--dest", str(dest), "--shared", str(tmp_path / "none"), "--url", server.url])
            == 0
        )
        assert len(server.requests) == 1
    assert "does not verify; fetching again" in capsys.readouterr().out
    assert dest.read_bytes() == corpus_bytes


@pytest.mark.parametrize("wrong", ["one-byte-changed", "truncated", "html-page"])
def test_wrong_bytes_exit_2_and_leave_nothing(tmp_path, corpus_bytes, capsys, wrong):
    body = {
        "one-byte-changed": corpus_bytes[:500]
        + (b"X" if corpus_bytes[500:501] != b"X" else b"Y")
        + corpus_bytes[501:],
        "truncated": corpus_bytes[: len(corpus_bytes) // 2],
        "html-page": b"<html><body>rate limited</body></html>",
    }[wrong]
    dest = tmp_path / "data" / "tinyshakespeare.txt"
    with Server(body) as server:
        rc = prepare(["--dest", str(dest), "--shared", str(tmp_path / "none"), "--url", server.url])
        assert server.requests == ["/tinyshakespeare/input.txt"]
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {server.url}: ")
    assert "does not match the expected corpus" in err and CORPUS_MD5 in err
    assert not dest.exists()
    assert leftovers(dest) == []  # no partial download either


def test_wrong_shared_file_exit_2(tmp_path, corpus_bytes, capsys):
    shared = tmp_path / "shared.txt"
    shared.write_bytes(corpus_bytes[:-1])
    dest = tmp_path / "out" / "tinyshakespeare.txt"
    assert prepare(["--dest", str(dest), "--shared", str(shared), "--url", closed_url()]) == 2
    assert capsys.readouterr().err.startswith(f"error: {shared}: ")
    assert not dest.exists() and leftovers(dest) == []


def test_unreachable_url_exit_3(tmp_path):
    dest = tmp_path / "data" / "tinyshakespeare.txt"
    url = closed_url()
    r = subprocess.run(
        [
            PY,
            "-m",
            "train.prepare",
            "--dest",
            str(dest),
            "--shared",
            str(tmp_path / "none"),
            "--url",
            url,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stderr.startswith(f"error: {url}: download failed")
    assert not dest.exists() and leftovers(dest) == []


def test_http_error_exit_3(tmp_path, capsys):
    dest = tmp_path / "tinyshakespeare.txt"
    with Server(b"not found", status=404) as server:
        assert (
            prepare(["--dest", str(dest), "--shared", str(tmp_path / "none"), "--url", server.url])
            == 3
        )
    assert "download failed" in capsys.readouterr().err
    assert not dest.exists()
