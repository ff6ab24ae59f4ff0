"""Makefile targets that do what they say: `make clean` removes every generated artifact and nothing else (run
for real, in a scratch copy of the tracked files); `make perf` / `make perf-slim` hand every PERF_* setting to
the container and build their prerequisites (static: `make -n`, since they need Docker, NGC images or a GPU).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.helpers import ROOT

# A fake of every kind of file the project generates (.gitignore's patterns): what `make clean` must remove.
GENERATED = (
    "logs/serve/triton.log",
    "logs/soak/triton.log",
    "build/backends/onnxruntime/libtriton_onnxruntime.so",
    "build/backend-src/build.log",
    "build/backend-sources/triton-core-r24.10.tar.gz",
    "build/wheels/triton-slim/numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.whl",
    "build/wheels/perf-slim/requirements.txt",
    "build/tls/server.key",
    "export/build/charrnn.onnx",
    "model_repository/charrnn_onnx/1/model.onnx",
    "model_repository/charrnn_gen_python/1/model.onnx",
    "model_repository/charrnn_trt/1/model.plan",
    "model_repository/charrnn_python/1/__pycache__/model.cpython-311.pyc",
    "charrnn/__pycache__/cli.cpython-311.pyc",
    "tests/__pycache__/conftest.cpython-311-pytest-9.2.0.pyc",
    "export/charrnn.engine",
    "charrnn.plan",
    ".pytest_cache/v/cache/lastfailed",
    ".ruff_cache/0.17.6/123",
    "charrnn_triton.egg-info/PKG-INFO",
    "bench/results/perf_input.json",
    "bench/results/perf_input_gen.json",
    "bench/results/perf_input.json.tmp",
    "bench/results/bench.csv.tmp",
    "bench/results/perf_charrnn_onnx_c8.csv",
    "bench/results/perf_charrnn_onnx_c8.log",
)
# Generated too, but kept on purpose (the Makefile's clean says why): the venv, the corpus, a training run's
# checkpoints and logs, compose's keys.
KEPT = (
    ".venv/pyvenv.cfg",
    "data/tinyshakespeare.txt",
    "models/shakespeare-lstm-2x512/checkpoints/ckpt.weights.h5",
    "models/shakespeare-lstm-2x512/logs/events.out",
    ".env",
)


def tracked() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def files_under(root) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() or (p.is_symlink() and not p.exists())
    }


def make_env() -> dict[str, str]:
    """The environment without an outer make's flags (`make test` runs pytest) or PERF_* settings."""
    drop = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PERF_")}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A copy of the tracked files only: no venv, no export, no build."""
    if not shutil.which("make") or not (ROOT / ".git").exists():
        pytest.skip("needs make and a git checkout")
    root = tmp_path_factory.mktemp("checkout")
    for f in tracked():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, root / f, follow_symlinks=False)
    return root


def test_the_fakes_are_what_gitignore_ignores(tmp_path):
    """Each fake is a path git ignores, and every pattern of .gitignore matches a fake (generated or kept): a new
    kind of generated file, added to .gitignore, must be added here and to `make clean`."""
    fakes = [*GENERATED, *KEPT]
    r = subprocess.run(
        ["git", "check-ignore", "--no-index", "--non-matching", "-v", *fakes],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    unignored = [line.split("\t")[1] for line in r.stdout.splitlines() if line.startswith("::")]
    assert unignored == [], f"not ignored by git, so not generated: {unignored}"
    # each pattern on its own (git reports only the last pattern that matches a path)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    unmatched = []
    for line in (ROOT / ".gitignore").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            (tmp_path / ".gitignore").write_text(line + "\n")
            hits = subprocess.run(
                ["git", "check-ignore", "--no-index", *fakes],
                cwd=tmp_path,
                capture_output=True,
                text=True,
            ).stdout.split()
            if not hits:
                unmatched.append(line)
    assert unmatched == [], f"no fake for these .gitignore patterns: {unmatched}"


def test_make_clean_removes_every_generated_file_and_no_tracked_one(scratch):
    before = files_under(scratch)
    assert before == set(tracked())
    for f in GENERATED + KEPT:
        (scratch / f).parent.mkdir(parents=True, exist_ok=True)
        (scratch / f).write_text("generated\n")
    r = subprocess.run(
        ["make", "clean"], cwd=scratch, capture_output=True, text=True, env=make_env(), timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    after = files_under(scratch)
    assert sorted(before - after) == [], "make clean removed tracked files"
    assert sorted(after - before - set(KEPT)) == [], "make clean left generated files"
    assert set(KEPT) <= after, "make clean removed what it keeps"
    # and the directories that only held generated files are gone too
    assert not any(
        (scratch / d).exists() for d in ("build", "logs", ".pytest_cache", "export/build")
    )


PERF_SETTINGS = {  # make variable -> bench/perf.sh's variable, and a value
    "PERF_MODELS": ("MODELS", "charrnn_onnx charrnn_python"),
    "PERF_CONCURRENCY": ("CONCURRENCY", "1 4"),
    "PERF_INTERVAL_MS": ("MEASUREMENT_INTERVAL_MS", "2000"),
    "PERF_MAX_TRIALS": ("MAX_TRIALS", "6"),
    "PERF_STABILITY": ("STABILITY", "50"),
    "PERF_PERCENTILE": ("PERCENTILE", "95"),
}


def dry_run(scratch, target: str, *settings: str) -> list[str]:
    r = subprocess.run(
        ["make", "-n", target, *settings],
        cwd=scratch,
        capture_output=True,
        text=True,
        env=make_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines()


def test_the_perf_settings_flags_md_lists_are_all_make_variables():
    flags = (ROOT / "docs" / "flags.md").read_text()
    perf_sh = flags.split("### `bench/perf.sh`", 1)[1].split("\n## ", 1)[0]
    listed = dict(re.findall(r"^\| `([A-Z_]+)` \(`(PERF_[A-Z_]+)`\)", perf_sh, re.M))
    assert {v: k for k, v in listed.items()} == {k: v[0] for k, v in PERF_SETTINGS.items()}


@pytest.mark.parametrize("target", ["perf", "perf-slim"])
def test_every_perf_setting_reaches_the_container(scratch, target):
    settings = [f"{k}={value}" for k, (_, value) in PERF_SETTINGS.items()]
    (run,) = [line for line in dry_run(scratch, target, *settings) if " run --rm " in line]
    for name, value in PERF_SETTINGS.values():
        assert f"-e '{name}={value}'" in run, (name, run)
    # unset, they are not passed at all (the compose service's own defaults hold)
    (run,) = [line for line in dry_run(scratch, target) if " run --rm " in line]
    assert " -e " not in run, run


def test_perf_slim_builds_what_it_needs_and_uses_perf_results(scratch):
    lines = dry_run(scratch, "perf-slim", "PERF_RESULTS=/tmp/perf-out")
    text = "\n".join(lines)
    export = next(i for i, line in enumerate(lines) if " -m export " in line)
    images = next(i for i, line in enumerate(lines) if "-m serve.images" in line)
    run = next(i for i, line in enumerate(lines) if " run --rm " in line)
    assert export < run and images < run
    assert "triton-slim" in lines[images].split() and "perf-slim" in lines[images].split()
    assert "--out /tmp/perf-out/perf_input.json" in text
    assert "--out /tmp/perf-out/perf_input_gen.json" in text
    assert lines[run].startswith("PERF_RESULTS=/tmp/perf-out ")
    assert "--results /tmp/perf-out" in text
    # the NGC `perf` service mounts bench/results whatever PERF_RESULTS says: its input goes there
    assert "--out bench/results/perf_input.json" in "\n".join(
        dry_run(scratch, "perf", "PERF_RESULTS=/tmp/perf-out")
    )
