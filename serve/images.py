"""Build the slim compose stack's images without NVIDIA's registry or Docker Hub (`make images`).

    python -m serve.images                 # every image: triton-slim (Triton 2.51), perf-slim (perf_analyzer)
                                           # and proxy (HAProxy, Debian's package, for the `scale` profile)
    python -m serve.images triton-slim     # one of them
    SLIM_BASE_IMAGE=my/python:3.11 python -m serve.images    # your own base image

For each image, these steps, each skipped when its product is already there:
  1. wheelhouse: `pip download -c constraints.txt` on the host, with the host's pip, of the image's pinned
     packages and their pinned dependencies (constraints.txt: the exact versions of the whole closure; pyproject.toml
     states ranges) for the image's Python and glibc, into build/wheels/<image>/. Containers here cannot reach
     PyPI; the same path serves hosts behind a proxy or an air gap. (proxy installs no Python package: none.)
  2. base image: the official one (python:3.11-slim-bookworm, python:3.13-slim-trixie, debian:bookworm-slim) if
     Docker has it or can pull it; otherwise an equivalent made from Debian's archive with mmdebstrap (as root)
     and `docker import`, tagged charrnn-base:<suite>-<python or package>, the way Debian's own images are made.
     The proxy's base gets Debian's haproxy package there already (containers may not reach Debian's mirror).
     SLIM_BASE_IMAGE / PERF_BASE_IMAGE / PROXY_BASE_IMAGE override it (naming the charrnn-base tag makes it).
     triton-slim has a second base, for its builder stage (serve/Dockerfile.slim builds Triton's ONNX Runtime
     backend there with `python -m serve.backend`): python:3.11-slim-bookworm, to which the Dockerfile adds
     Debian's compilers, cmake and patchelf with apt-get; else charrnn-base:bookworm-python3.11-build, made
     with them by mmdebstrap (no apt-get in the build). SLIM_BUILDER_BASE_IMAGE overrides it.
  3. backend sources (triton-slim): the third-party sources of serve/backend.py, found and verified by
     serve.backend itself (vendored in ../shared/third_party or $CHARRNN_THIRD_PARTY: sha256; else downloaded:
     content checksum), copied into build/backend-sources/ for the build context; the builder stage builds
     from them and downloads nothing.
  4. `docker compose build` of the service, with those bases as its BASE_IMAGE (and BUILDER_BASE_IMAGE) build
     arguments.
Progress goes to stderr; the last line on stdout is the base image per variable (`SLIM_BASE_IMAGE=...`).
Exit codes: 0 ok, 1 a backend source does not match its recorded checksum, 2 bad input, 3 a tool (docker,
compose, mmdebstrap, pip) or a source is missing or unreachable, or a step failed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from charrnn.cli import parser
from charrnn.contract import INFER_KEY_ENV
from charrnn.errors import UnavailableError, UserError, cli

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"  # the exact pins (pyproject.toml has ranges)
WHEELS = ROOT / "build" / "wheels"
# serve.backend's third-party sources, staged for serve/Dockerfile.slim's builder stage (stage_backend_sources)
BACKEND_SOURCES = ROOT / "build" / "backend-sources"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
PROFILES = ("slim", "perf-slim", "scale", "monitoring")  # the compose profiles of the images below


@dataclass(frozen=True)
class Image:
    """One image of the slim stack: its compose service and what its base and wheelhouse must be."""

    service: str  # compose service (and build/wheels/<service>)
    base_variable: str  # compose variable holding the BASE_IMAGE build argument
    official_base: str  # the default for users (Docker Hub)
    suite: str  # Debian suite of that base, for the mmdebstrap equivalent
    # the base's Python (major.minor): wheels are downloaded for it; None: no Python image
    python: str | None
    glibc: tuple[int, int]  # the suite's glibc: the newest manylinux tag its wheels may carry
    # packages of the mmdebstrap base (what the official image has that we use)
    debs: tuple[str, ...]
    packages: tuple[str, ...]  # installed with their dependencies
    packages_no_deps: tuple[str, ...] = ()  # only the wheel itself
    # the base of the Dockerfile's builder stage (its own variable, official base and mmdebstrap packages)
    builder: Image | None = None
    backend_sources: bool = False  # stage serve.backend's sources into build/backend-sources/
    tag_suffix: str = ""  # of the mmdebstrap equivalent's tag (the builder's: "-build")

    @property
    def wheelhouse(self) -> Path:
        return WHEELS / self.service

    @property
    def debian_base(self) -> str:
        """The mmdebstrap equivalent's tag: named after its Python, or (no Python) its first package."""
        return (
            f"charrnn-base:{self.suite}-"
            + (f"python{self.python}" if self.python else self.debs[0])
            + self.tag_suffix
        )


IMAGES = {
    # nvidia-pytriton is needed only for the tritonserver binary, python backend and libraries it ships:
    # its own Python dependencies (pytriton's API) are not.
    "triton-slim": Image(
        "triton-slim",
        "SLIM_BASE_IMAGE",
        "python:3.11-slim-bookworm",
        "bookworm",
        "3.11",
        (2, 36),
        ("python3", "python3-venv", "libpython3.11", "passwd", "ca-certificates"),
        # psutil: the builder stage runs serve.backend, which imports serve.local_triton
        packages=("numpy", "onnxruntime", "psutil"),
        packages_no_deps=("nvidia-pytriton",),
        # The builder stage: Python 3.11 (it installs the same wheelhouse and runs `python -m serve.backend`)
        # and Debian's C/C++ toolchain, cmake (3.25) and patchelf. The official base has no compiler: the
        # Dockerfile apt-gets them there (a container that reaches Debian's mirror); the mmdebstrap one has them.
        builder=Image(
            "triton-slim builder",
            "SLIM_BUILDER_BASE_IMAGE",
            "python:3.11-slim-bookworm",
            "bookworm",
            "3.11",
            (2, 36),
            ("python3", "python3-venv", "build-essential", "cmake", "patchelf"),
            packages=(),
            tag_suffix="-build",
        ),
        backend_sources=True,
    ),
    # The perf-analyzer wheel (manylinux_2_38) needs glibc >= 2.38: Debian 13.
    "perf-slim": Image(
        "perf-slim",
        "PERF_BASE_IMAGE",
        "python:3.13-slim-trixie",
        "trixie",
        "3.13",
        (2, 41),
        ("python3", "python3-venv", "ca-certificates"),
        packages=(),
        packages_no_deps=("perf-analyzer",),
    ),
    # HAProxy in front of the `scale` profile's replicas (serve/Dockerfile.haproxy, serve/haproxy.cfg): Debian
    # 12's package (2.6 LTS). From debian:bookworm-slim the Dockerfile installs it with apt; the mmdebstrap base
    # has it already, because containers may not reach Debian's mirror. No Python, no wheels.
    "proxy": Image(
        "proxy",
        "PROXY_BASE_IMAGE",
        "debian:bookworm-slim",
        "bookworm",
        None,
        (2, 36),
        ("haproxy",),
        packages=(),
    ),
    # Prometheus for the compose profile `monitoring` (serve/Dockerfile.prometheus, serve/prometheus.yml): Debian
    # 12's package (2.42, with promtool), built like the proxy's image. No Python, no wheels.
    "prometheus": Image(
        "prometheus",
        "PROMETHEUS_BASE_IMAGE",
        "debian:bookworm-slim",
        "bookworm",
        None,
        (2, 36),
        ("prometheus",),
        packages=(),
    ),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pins() -> dict[str, str]:
    """Package name -> exact version, from constraints.txt (every package the project installs, direct or not)."""
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if "==" in spec:
            name, version = spec.split("==", 1)
            out[name.split("[")[0].strip().lower()] = version.split(";")[0].strip()
    return out


def pinned(names: tuple[str, ...]) -> list[str]:
    """`name==version` for each name, as constraints.txt pins it."""
    table = pins()
    missing = [n for n in names if n not in table]
    if missing:
        raise UserError(
            "constraints.txt",
            f"no exact pin (name==version) for {', '.join(missing)}",
            "pin every package an image installs",
        )
    return [f"{n}=={table[n]}" for n in names]


def manylinux_platforms(glibc: tuple[int, int]) -> list[str]:
    """pip --platform tags a system with this glibc accepts, newest first (pip does not expand them itself)."""
    arch = platform.machine()
    major, minor = glibc
    return [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)] + [
        f"manylinux2014_{arch}",
        f"manylinux2010_{arch}",
        f"manylinux1_{arch}",
    ]


def run(args: list[str], what: str, fix: str, env: dict | None = None) -> str:
    """Run a command; its failure is an UnavailableError naming `what` with the command's last output lines."""
    try:
        # stderr: the user sees it
        p = subprocess.run(args, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE)
    except FileNotFoundError as e:
        raise UnavailableError(args[0], "not found", fix) from e
    if p.returncode != 0:
        tail = "\n".join((p.stdout or "").splitlines()[-15:])
        raise UnavailableError(
            what, f"`{' '.join(args[:4])} ...` exited with {p.returncode}\n{tail}", fix
        )
    return p.stdout


def make_wheelhouse(image: Image) -> Path | None:
    """build/wheels/<service>/: the wheels to install, for the image's Python and glibc; kept when its
    requirements file already says the same pins, constraints and platform."""
    requirements = pinned(image.packages) + [
        f"{r}  # --no-deps" for r in pinned(image.packages_no_deps)
    ]
    if not requirements:
        return None  # nothing to install from PyPI (proxy)
    platforms = manylinux_platforms(image.glibc)
    constraints = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()[:16]
    stamp = (
        "\n".join(
            [f"# python {image.python}, {platforms[0]}, constraints {constraints}", *requirements]
        )
        + "\n"
    )
    house = image.wheelhouse
    if (house / "requirements.txt").is_file() and (house / "requirements.txt").read_text() == stamp:
        log(f"[{image.service}] wheelhouse {house.relative_to(ROOT)}: up to date")
        return house
    if house.exists():
        shutil.rmtree(house)
    house.mkdir(parents=True)
    t0 = time.monotonic()
    common = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--quiet",
        "--only-binary=:all:",
        "--python-version",
        image.python,
        "--implementation",
        "cp",
        "--abi",
        "cp" + image.python.replace(".", ""),
        "--abi",
        "abi3",
        "--abi",
        "none",
        *[a for p in platforms for a in ("--platform", p)],
        "--dest",
        str(house),
        "--constraint",  # dependencies too: nothing floats
        str(CONSTRAINTS),
    ]
    fix = "check that this host reaches PyPI (or a mirror through PIP_INDEX_URL)"
    log(
        f"[{image.service}] wheelhouse: pip download {' '.join(pinned(image.packages + image.packages_no_deps))}"
        f" for Python {image.python}, glibc {image.glibc[0]}.{image.glibc[1]} ..."
    )
    if image.packages:
        run(common + pinned(image.packages), f"wheelhouse {image.service}", fix)
    if image.packages_no_deps:
        run(
            common + ["--no-deps"] + pinned(image.packages_no_deps),
            f"wheelhouse {image.service}",
            fix,
        )
    (house / "requirements.txt").write_text(stamp)
    size = sum(f.stat().st_size for f in house.glob("*.whl")) / 2**20
    log(
        f"[{image.service}] wheelhouse: {len(list(house.glob('*.whl')))} wheels, {size:.0f} MiB, "
        f"{time.monotonic() - t0:.0f} s"
    )
    return house


def docker_has(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode == 0


def docker_pull(ref: str) -> bool:
    try:
        return (
            subprocess.run(
                ["docker", "pull", "--quiet", ref], capture_output=True, timeout=300
            ).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        return False


def debian_security(suite: str) -> list[str]:
    """The suite's security updates as a second mmdebstrap source (the proxy faces clients: e.g. bookworm's
    haproxy 2.6.12-1+deb12u4 is only there); Debian's official images include them too."""
    return [f"deb {DEBIAN_MIRROR}-security {suite}-security main"]


def debian_base(image: Image) -> str:
    """An equivalent of the official base from Debian's archive: mmdebstrap | docker import."""
    ref = image.debian_base
    if docker_has(ref):
        log(f"[{image.service}] base: {ref} (made earlier from Debian's archive)")
        return ref
    if shutil.which("mmdebstrap") is None:
        raise UnavailableError(
            f"base image {image.official_base}",
            "not available (no registry access) and "
            "mmdebstrap is not installed to make one from Debian's archive",
            f"install mmdebstrap (apt-get install mmdebstrap) and run as root, or set "
            f"{image.base_variable} to an image with "
            f"{f'Python {image.python}' if image.python else ', '.join(image.debs)}",
        )
    if os.geteuid() != 0:
        raise UnavailableError(
            "mmdebstrap",
            "must run as root to make a base image",
            f"run `sudo make images` once, or set {image.base_variable}",
        )
    log(
        f"[{image.service}] base: {image.official_base} cannot be pulled; making {ref} from Debian's archive "
        f"(mmdebstrap {image.suite} + {image.suite}-security: {', '.join(image.debs)}) ..."
    )
    t0 = time.monotonic()
    mm = subprocess.Popen(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=apt",
            f"--include={','.join(image.debs)}",
            image.suite,
            "-",
            DEBIAN_MIRROR,
            *debian_security(image.suite),
        ],
        stdout=subprocess.PIPE,
    )
    # the proxy's Dockerfile sets its own
    cmd = ["--change", 'CMD ["python3"]'] if image.python else []
    imp = subprocess.run(
        ["docker", "import", *cmd, "--change", "ENV LANG=C.UTF-8", "-", ref],
        stdin=mm.stdout,
        capture_output=True,
        text=True,
    )
    mm.stdout.close()
    if mm.wait() != 0 or imp.returncode != 0:
        raise UnavailableError(
            f"base image {ref}",
            f"mmdebstrap exited with {mm.returncode}, docker import "
            f"with {imp.returncode}: {imp.stderr.strip()}",
            f"check that {DEBIAN_MIRROR} is reachable",
        )
    log(f"[{image.service}] base: {ref} made in {time.monotonic() - t0:.0f} s")
    return ref


def base_image(image: Image) -> str:
    """The BASE_IMAGE build argument: the caller's, the official image, or the Debian-archive equivalent."""
    chosen = os.environ.get(image.base_variable)
    if chosen and chosen == image.debian_base:
        return debian_base(image)  # asked for the mmdebstrap equivalent by its tag: made if missing
    if chosen:
        if not (docker_has(chosen) or docker_pull(chosen)):
            raise UserError(
                image.base_variable,
                f"{chosen!r} is neither local nor pullable",
                "docker pull it, or unset the variable",
            )
        log(f"[{image.service}] base: {chosen} (from {image.base_variable})")
        return chosen
    if docker_has(image.official_base) or docker_pull(image.official_base):
        log(f"[{image.service}] base: {image.official_base}")
        return image.official_base
    return debian_base(image)


def stage_backend_sources(image: Image) -> Path:
    """build/backend-sources/: exactly the files serve.backend builds from, for the image's builder stage.

    serve.backend finds and verifies them (its fetch_sources: a vendored file against its recorded sha256, a
    download against its recorded content checksum); they are copied here under the names it looks for inside
    the image: vendored files at the top (its --sources), downloaded archives in downloads/ (its --scratch's
    downloads/). Files of an earlier staging that are no longer wanted are removed."""
    from serve import backend

    sources_dir, chosen = backend.sources_dir_from(None)
    if chosen and not sources_dir.is_dir():
        raise UserError(
            str(sources_dir), "no such directory", f"fix ${backend.SOURCES_ENV}, or unset it"
        )
    t0 = time.monotonic()
    found = backend.fetch_sources(
        backend.SCRATCH,
        sources_dir if sources_dir.is_dir() else None,
        os.environ.get(backend.DOWNLOAD_ENV, backend.DEFAULT_DOWNLOAD_BASE),
        os.environ.get(backend.RAW_ENV, backend.DEFAULT_RAW_BASE),
    )
    wanted = {}
    for path, origin in found.values():
        wanted[Path(path.name) if origin == "vendored" else Path("downloads", path.name)] = path
    copied = 0
    for rel, path in wanted.items():
        dest = BACKEND_SOURCES / rel
        digest = backend.file_sha256(path)
        if dest.is_file() and backend.file_sha256(dest) == digest:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(path, tmp)
        if backend.file_sha256(tmp) != digest:
            tmp.unlink()
            raise UnavailableError(str(dest), "the copy differs from its source", "check the disk")
        tmp.replace(dest)
        copied += 1
    for old in sorted(BACKEND_SOURCES.rglob("*"), reverse=True):  # files first, then empty folders
        rel = old.relative_to(BACKEND_SOURCES)
        if old.is_file() and rel not in wanted:
            old.unlink()
        elif old.is_dir() and not any(old.iterdir()):
            old.rmdir()
    vendored = sum(origin == "vendored" for _, origin in found.values())
    log(
        f"[{image.service}] backend sources: {len(found)} verified by serve.backend ({vendored} vendored "
        f"from {sources_dir}, {len(found) - vendored} downloaded), {copied} copied into "
        f"{BACKEND_SOURCES.relative_to(ROOT)}/ ({time.monotonic() - t0:.1f} s)"
    )
    return BACKEND_SOURCES


def compose_env(bases: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, **bases)
    # Compose interpolates the whole file; the keys only matter to the server's command, not to a build.
    for key in ("TRITON_ADMIN_KEY", INFER_KEY_ENV):
        env.setdefault(key, "unused-by-docker-compose-build")
    return env


def check_docker() -> None:
    if shutil.which("docker") is None:
        raise UnavailableError(
            "docker", "not found", "install Docker >= 20.10 and Compose v2 (docs/production.md)"
        )
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise UnavailableError(
            "docker",
            "the Docker engine does not answer (`docker info` failed)",
            "start dockerd, or run as a user allowed to use it",
        )
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        raise UnavailableError(
            "docker compose", "Compose v2 is not installed", "install the Compose v2 plugin"
        )


def build(services: list[str]) -> dict[str, str]:
    """Wheelhouses, bases and `docker compose build` of `services`; returns {base variable: base image}."""
    check_docker()
    images = [IMAGES[s] for s in services]
    bases = {}
    for image in images:
        make_wheelhouse(image)
        if image.backend_sources:
            stage_backend_sources(image)
        bases[image.base_variable] = base_image(image)
        if image.builder:
            bases[image.builder.base_variable] = base_image(image.builder)
    t0 = time.monotonic()
    log(f"docker compose build {' '.join(services)} ...")
    run(
        [
            "docker",
            "compose",
            "-f",
            str(COMPOSE_FILE),
            *[a for p in PROFILES for a in ("--profile", p)],
            "build",
            *services,
        ],
        "docker compose build",
        "see the build output above",
        env=compose_env(bases),
    )
    log(f"built {', '.join(services)} in {time.monotonic() - t0:.0f} s")
    return bases


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m serve.images", __doc__)
    p.add_argument(
        "services",
        nargs="*",
        metavar="SERVICE",
        help=f"images to build (default: all of {', '.join(IMAGES)})",
    )
    args = p.parse_args(argv)
    unknown = [s for s in args.services if s not in IMAGES]
    if unknown:
        raise UserError(
            "SERVICE", f"unknown {', '.join(unknown)}", f"choose from {', '.join(IMAGES)}"
        )
    bases = build(args.services or list(IMAGES))
    print(" ".join(f"{k}={v}" for k, v in bases.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
