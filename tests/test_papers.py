"""The project's own papers: the version (defined once in pyproject.toml, printed by every command's
`--version`), the licence, the changelog and the shipped model's card."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PROJECT["project"]["version"]
STAGES = ("train", "export", "serve", "client", "bench")
# Command-line modules that build their own argparse.ArgumentParser instead of charrnn.cli.parser(), so they
# have no --version: client/example.py (the raw protocol on one page, standalone by design).
OWN_PARSER = {"client/example.py"}


def cli_modules() -> dict[str, str]:
    """module -> its prog, for every module of the stage folders that builds charrnn.cli.parser()."""
    found = {}
    for path in sorted(p for stage in STAGES for p in (ROOT / stage).rglob("*.py")):
        source = path.read_text()
        call = re.search(r"\bparser\(\s*(\"python -m [\w.]+\"|PROG)", source)
        if call is None:
            continue
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__main__" else rel.parts
        found[".".join(parts)] = "python -m " + ".".join(parts)
    return found


def test_every_command_line_module_builds_the_shared_parser():
    own = {
        str(p.relative_to(ROOT))
        for stage in STAGES
        for p in (ROOT / stage).rglob("*.py")
        if "argparse.ArgumentParser(" in p.read_text()
    }
    assert own == OWN_PARSER, "build the parser with charrnn.cli.parser() (it adds --version)"
    assert {"train.train", "export", "serve.local", "client", "client.demo", "bench.bench"} <= set(
        cli_modules()
    )


def run_version(module: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_command_prints_the_pyproject_version():
    modules = cli_modules()
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(modules, pool.map(run_version, modules)))
    wrong = {
        m: (r.returncode, r.stdout, r.stderr[-500:])
        for m, r in results.items()
        if r.returncode != 0 or r.stdout != f"{modules[m]} {VERSION}\n"
    }
    assert wrong == {}


def test_an_entry_point_prints_its_own_name_and_the_version():
    script = ROOT / ".venv" / "bin" / "charrnn-client"
    if not script.exists():
        pytest.skip("the entry points are installed by `make setup`")
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, f"charrnn-client {VERSION}\n"), r.stderr


def test_the_library_reads_the_version_from_pyproject():
    import charrnn

    assert charrnn.version() == charrnn.__version__ == VERSION


def test_help_lists_version_like_help():
    """--version is every command's, like -h: --help lists it, and docs/flags.md says so once."""
    help_text = subprocess.run(
        [sys.executable, "-m", "serve.local", "--help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert "--version  " in help_text and "print the version and exit" in help_text
    assert "`--version`" in (ROOT / "docs" / "flags.md").read_text().split("\n## ", 1)[0]


def test_licence_file_and_pyproject_agree():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 the charrnn-triton authors\n")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    project = PROJECT["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression (PEP 639)
    assert project["license-files"] == ["LICENSE"]
    # setuptools reads a PEP 639 licence string from 77.0 on; older ones reject it
    (setuptools,) = [r for r in PROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools == "setuptools>=77"


def test_changelog_has_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert re.search(
        rf"^## \[{re.escape(VERSION)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M
    ), VERSION


MODEL = ROOT / "models" / "shakespeare-lstm-2x512"


def test_model_card_names_its_data_licence_and_lineage():
    card = (MODEL / "MODEL_CARD.md").read_text()
    assert "Tiny Shakespeare" in card
    assert "public domain" in card and "MIT" in card  # the text, and char-rnn's distribution of it
    assert "https://github.com/karpathy/char-rnn" in card
    assert "https://github.com/NVIDIA/TensorRT/tree/release/10.16/samples/sampleCharRNN" in card
    for heading in ("Intended use", "Out of scope", "Training data", "Lineage", "Evaluation"):
        assert re.search(rf"^## {heading}", card, re.M), heading
    assert "](model_card.json)" in card


def test_model_card_links_the_figures_instead_of_copying_them():
    card = (MODEL / "MODEL_CARD.md").read_text()
    import json

    metrics = json.loads((MODEL / "model_card.json").read_text())["metrics"]
    for name, value in metrics.items():
        for shown in (f"{value:.3f}", f"{value:.2f}"):
            assert shown not in card, f"{name} {shown} copied into MODEL_CARD.md"


def test_model_card_links_resolve():
    card = (MODEL / "MODEL_CARD.md").read_text()
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", card)
    assert links
    assert [link for link in links if not (MODEL / link).exists()] == []
