"""`make backend` (serve/backend.py): Triton's ONNX Runtime backend built from source.

- the download path against a local HTTP server laid out like GitHub (archives and raw files): verified by
  content checksum, the same as the vendored files'; a tampered archive is refused and nothing is built;
- a vendored tarball with a wrong sha256 is refused; a missing compiler exits 3 naming build-essential before
  anything runs; no usable cmake and no PyPI cmake exits 3 naming apt-get install cmake;
- the real build (the function `make backend` runs) produces a backend directory that resolves its libraries
  with the wheel's, and a second run is "up to date" without touching the build (its log and tree unchanged).

The sources are ../shared/third_party's (or $CHARRNN_THIRD_PARTY's); without them they are downloaded from
GitHub, and the tests skip only when neither is possible.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from charrnn.errors import CheckFailed, UnavailableError
from serve import backend
from serve.backend import SOURCES
from tests.helpers import ROOT

CHECKSUM_MISMATCH = "sources do not match the recorded checksum"


@pytest.fixture(autouse=True)
def no_proxy_for_loopback(monkeypatch):
    """The local mirror is on 127.0.0.1: never through a proxy the environment may name."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(
            name, ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get(name)]))
        )


def github_reachable() -> bool:
    try:
        with socket.create_connection(("github.com", 443), timeout=5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> dict[str, Path]:
    """{source name: a file with its content}: the vendored files, else downloads from GitHub, else skip."""
    vendored, _ = backend.sources_dir_from(None)
    if all((vendored / s.file).is_file() for s in SOURCES):
        return {s.name: vendored / s.file for s in SOURCES}
    if not github_reachable():
        pytest.skip(f"{vendored} is absent and github.com is unreachable: no sources to build from")
    files = backend.fetch_sources(tmp_path_factory.mktemp("github"), None)
    return {name: path for name, (path, _) in files.items()}


def github_layout(files: dict[str, Path], www: Path) -> Path:
    """www/<owner>/<repo>/archive/<commit>.tar.gz and www/<owner>/<repo>/<commit>/<path> (raw files)."""
    for s in SOURCES:
        rel = f"{s.repo}/{s.commit}/{s.path}" if s.path else f"{s.repo}/archive/{s.commit}.tar.gz"
        (www / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[s.name], www / rel)
    return www


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serving(www: Path):
    """An HTTP server on a free loopback port serving `www`; yields its base URL."""
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def mirror(upstream, tmp_path_factory):
    with serving(github_layout(upstream, tmp_path_factory.mktemp("www"))) as url:
        yield url


def repack(src: Path, dest: Path, top: str | None = None, change=None, gz: bool = True) -> Path:
    """`src` re-packed: another top folder name, other times, optionally `change(member, data)` applied."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w:gz" if gz else "w") as tout:
        for m in tin:
            data = tin.extractfile(m).read() if m.isfile() else None
            if top:
                m.name = "/".join([top, *m.name.split("/")[1:]])
            m.mtime = 0
            if change and data is not None:
                data = change(m, data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
    return dest


def run_backend(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve.backend", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


# --- the content checksum --------------------------------------------------------------------------------
def test_content_checksum_ignores_packing_but_not_content(upstream, tmp_path):
    src = upstream["common"]
    recorded = next(s.content for s in SOURCES if s.name == "common")
    assert backend.content_checksum(src) == recorded
    # GitHub's top folder name, times zeroed, no compression: the same content
    github_like = repack(src, tmp_path / "a.tar", top="common-578491fc", gz=False)
    assert backend.content_checksum(github_like) == recorded

    def chmod_x(m, data):
        if m.name.endswith("CMakeLists.txt") and m.name.count("/") == 1:
            m.mode |= 0o111
        return data

    assert backend.content_checksum(repack(src, tmp_path / "b.tar.gz", change=chmod_x)) != recorded


# --- sources: download path against a local GitHub layout -----------------------------------------------
def test_download_path_verifies_content_checksums(mirror, upstream, tmp_path):
    files = backend.fetch_sources(tmp_path, None, download_base=mirror, raw_base=mirror)
    assert set(files) == {s.name for s in SOURCES}
    for s in SOURCES:
        path, origin = files[s.name]
        assert origin == s.url(mirror, mirror) and origin.startswith(mirror)
        assert path.parent == tmp_path / "downloads"
        digest = backend.file_sha256 if s.path else backend.content_checksum
        assert digest(path) == digest(upstream[s.name]) == s.content, s.name
    dirs = backend.unpack_sources(files, tmp_path / "src")
    assert (dirs["onnxruntime_backend"] / "CMakeLists.txt").is_file()
    assert (dirs["googletest"] / "googletest" / "CMakeLists.txt").is_file()
    assert (dirs["onnxruntime_c_api"] / "include" / "onnxruntime_c_api.h").is_file()


def flip_first_byte_of_top_cmakelists(m, data):
    if m.name.split("/", 1)[-1] == "CMakeLists.txt":
        return bytes([data[0] ^ 0x01]) + data[1:]
    return data


def test_tampered_download_is_refused_and_nothing_is_built(upstream, tmp_path):
    files = dict(upstream)
    files["onnxruntime_backend"] = repack(
        upstream["onnxruntime_backend"],
        tmp_path / "tampered.tar.gz",
        change=flip_first_byte_of_top_cmakelists,
    )
    www = github_layout(files, tmp_path / "www")
    with serving(www) as url:
        with pytest.raises(CheckFailed, match=CHECKSUM_MISMATCH) as e:
            backend.fetch_sources(tmp_path / "direct", None, download_base=url, raw_base=url)
        assert "onnxruntime_backend" in e.value.what
        assert not list((tmp_path / "direct" / "downloads").glob("onnxruntime_backend*"))

        # the command: exit 1 with the error line, before anything is unpacked, configured or installed
        empty, out, scratch = tmp_path / "no-vendored", tmp_path / "out", tmp_path / "scratch"
        empty.mkdir()
        r = run_backend(
            *("--sources", str(empty), "--download-base", url, "--raw-base", url),
            *("--out", str(out), "--scratch", str(scratch)),
        )
    assert r.returncode == 1, r.stderr
    assert f"error: {url}/triton-inference-server/onnxruntime_backend/archive/" in r.stderr
    assert CHECKSUM_MISMATCH in r.stderr
    assert not out.exists()
    assert not (scratch / "src").exists() and not (scratch / "cmake-build").exists()
    assert "$ " not in (scratch / "build.log").read_text()  # no command ran


def test_unreachable_download_exits_3(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    empty = tmp_path / "no-vendored"
    empty.mkdir()
    with pytest.raises(UnavailableError, match="cannot download"):
        backend.fetch_sources(tmp_path, empty, download_base=url, raw_base=url)


# --- sources: the vendored files ---------------------------------------------------------------------
def test_vendored_tarball_with_wrong_sha256_is_refused(upstream, tmp_path):
    vendored = tmp_path / "third_party"
    vendored.mkdir()
    for s in SOURCES:
        shutil.copyfile(upstream[s.name], vendored / s.file)
    victim = vendored / next(s.file for s in SOURCES if s.name == "core")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    with pytest.raises(CheckFailed, match=CHECKSUM_MISMATCH) as e:
        backend.fetch_sources(tmp_path / "scratch", vendored, download_base="http://127.0.0.1:9")
    assert e.value.what == str(victim)

    out = tmp_path / "out"
    r = run_backend(
        *("--sources", str(vendored), "--out", str(out), "--scratch", str(tmp_path / "s2"))
    )
    assert r.returncode == 1, r.stderr
    assert f"error: {victim}: {CHECKSUM_MISMATCH}" in r.stderr
    assert not out.exists() and not (tmp_path / "s2" / "cmake-build").exists()


# --- tools ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["CXX", "PATH"])
def test_missing_compiler_exits_3_naming_build_essential(how, tmp_path):
    env = dict(os.environ)
    if how == "CXX":
        env["CXX"] = str(tmp_path / "no-such-c++")
        expected = f"error: {env['CXX']} ($CXX): not found (install a C++ compiler: apt-get install build-essential"
    else:
        env.pop("CXX", None), env.pop("CC", None)
        env["PATH"] = str(tmp_path / "empty-bin")
        expected = "error: c++: not found (install a C++ compiler: apt-get install build-essential)"
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    r = run_backend("--out", str(out), "--scratch", str(scratch), env=env)
    assert r.returncode == 3, r.stderr
    assert expected in r.stderr
    assert "Traceback" not in r.stderr and "CMake" not in r.stderr
    assert not scratch.exists() and not out.exists()  # nothing ran: no cmake, no sources


def test_no_cmake_and_no_pypi_cmake_exits_3(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(
        backend.shutil, "which", lambda name, *a, **k: None if name == "cmake" else real_which(name)
    )
    monkeypatch.setattr(backend, "env_bin", lambda name: None)
    monkeypatch.setattr(backend, "PYPI_CMAKE", "cmake==0.0.0.0")  # no such release: never installs
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(UnavailableError) as e:
        backend.find_cmake()
    assert e.value.what == "cmake" and e.value.fix == "install it: apt-get install cmake"


# --- the real build ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(upstream) -> Path:
    """The backend directory, from the function `make backend` runs (built here unless up to date)."""
    sources_dir, _ = backend.sources_dir_from(None)
    return backend.build(sources_dir=sources_dir if sources_dir.is_dir() else None)


def test_build_produces_the_backend_directory(built):
    from serve.local_triton import ORT_BACKEND_DIR, pytriton_dist

    assert built == ORT_BACKEND_DIR.resolve()
    lib, ort = built / "libtriton_onnxruntime.so", built / "libonnxruntime.so.1"
    assert lib.is_file() and ort.is_file() and not ort.is_symlink()
    server_lib, wheel_ort = backend.wheel_libraries()
    assert backend.file_sha256(ort) == backend.file_sha256(wheel_ort)
    patchelf = backend.find_patchelf()
    needed = subprocess.run(
        [patchelf, "--print-needed", str(lib)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert server_lib.name in needed and "libonnxruntime.so.1" in needed
    assert "libtritonserver.so" not in needed
    rpath = subprocess.run(
        [patchelf, "--print-rpath", str(lib)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert rpath == "$ORIGIN"
    backend.check_ldd(lib, pytriton_dist()[1])  # raises CheckFailed on any "not found"
    stamp = json.loads((built / backend.STAMP).read_text())
    assert stamp["inputs"]["libtritonserver"] == server_lib.name
    assert stamp["inputs"]["sources"] == {s.name: s.content for s in SOURCES}


def test_second_run_is_up_to_date_without_running_cmake(built):
    watched = (
        backend.SCRATCH / "build.log",
        backend.SCRATCH / "cmake-build",
        built / backend.STAMP,
    )

    def mtimes():
        return {p: p.stat().st_mtime_ns if p.exists() else None for p in watched}

    before = mtimes()
    lib_digest = hashlib.sha256((built / "libtriton_onnxruntime.so").read_bytes()).hexdigest()
    r = run_backend()
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(built)
    assert "up to date" in r.stderr and "[1/5]" not in r.stderr
    assert mtimes() == before  # cmake never ran: its log and build tree untouched (or still absent)
    assert (
        hashlib.sha256((built / "libtriton_onnxruntime.so").read_bytes()).hexdigest() == lib_digest
    )


def test_a_changed_input_or_a_missing_file_means_rebuild(built, tmp_path):
    copy = tmp_path / "onnxruntime"
    shutil.copytree(built, copy)
    plan = backend.plan(copy, backend.SCRATCH)
    assert backend.up_to_date(plan)
    stamp = json.loads((copy / backend.STAMP).read_text())
    (copy / backend.STAMP).write_text(json.dumps(dict(stamp, key="0" * 64)))
    assert not backend.up_to_date(plan)
    (copy / backend.STAMP).write_text(json.dumps(stamp))
    assert backend.up_to_date(plan)
    (copy / "libonnxruntime.so.1").unlink()
    assert not backend.up_to_date(plan)


def test_a_failed_build_step_exits_3_with_the_tail_of_its_log(tmp_path):
    plan = backend.Plan(
        tmp_path / "out", tmp_path, ("cc", ""), ("c++", ""), Path("x"), Path("y"), "", 1
    )
    plan.log_path.write_text("")
    script = "for i in $(seq 100); do echo line $i; done; exit 2"
    with pytest.raises(UnavailableError) as e:
        backend.run_logged(["sh", "-c", script], plan, "cmake --build")
    assert e.value.exit_code == 3 and e.value.what == "cmake --build"
    assert (
        "exited with 2" in e.value.why
        and "line 100" in e.value.why
        and "line 70\n" not in e.value.why
    )
    assert str(plan.log_path) in e.value.fix
