"""The docs cannot go stale silently.

docs/flags.md lists, under `### python -m <module>`, a table row per flag. For every command-line module, the
flags its `--help` usage line offers and the flags the page lists under it must be the same set: a flag added
in the code and not documented, or documented and gone from the code, fails here. The Makefile's `##` targets
and variables are checked the same way, and every relative link in README.md and docs/*.md must resolve.

Each `--help` runs as a subprocess (argparse prints and exits before any module imports TensorFlow, so each
takes well under a second). client.demo is not run: it has no flags of its own (it hands its arguments to
`python -m client` on a server it starts), so its source is checked for that instead.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

FLAGS_MD = ROOT / "docs" / "flags.md"

CLIS = (
    "train.prepare",
    "train.train",
    "train.sample",
    "train.evaluate",
    "train.import_tf1",
    "export",
    "export.gen_export",
    "export.trt_check",
    "export.build_plan",
    "export.verify",
    "serve.local",
    "serve.backend",
    "serve.tls",
    "serve.images",
    "client",
    "bench.bench",
    "bench.chunked",
    "bench.ab",
    "bench.soak",
    "bench.mixed_soak",
    "bench.scale",
    "bench.perf_input",
    "bench.perf_report",
)
NOT_RUN = ("client.demo",)  # starts a server; passes its arguments to `python -m client`

FLAG = r"(?<![\w-])--[a-z0-9][a-z0-9-]*"


def documented() -> dict[str, set[str]]:
    """module -> the flags docs/flags.md lists in the table under `### python -m <module>`."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in FLAGS_MD.read_text().splitlines():
        heading = re.match(r"### `python -m ([\w.]+)`", line)
        if heading:
            current = sections.setdefault(heading.group(1), set())
        elif line.startswith("#"):
            current = None
        elif current is not None and line.startswith("| `--"):
            current.add(re.match(rf"\| `({FLAG})`", line).group(1))
    return sections


def help_flags(module: str) -> set[str]:
    """The flags of `python -m <module> --help`'s usage block (every option argparse knows, nothing else)."""
    r = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f"python -m {module} --help: exit {r.returncode}\n{r.stderr[-2000:]}"
    usage = r.stdout.split("\n\n", 1)[0]
    assert usage.startswith("usage:"), r.stdout[:500]
    return set(re.findall(FLAG, usage)) - {"--help", "--version"}


def test_flags_md_has_a_section_per_command():
    assert set(documented()) == set(CLIS) | set(NOT_RUN)


@pytest.mark.parametrize("module", CLIS)
def test_flags_md_lists_exactly_the_flags_of(module):
    offered, listed = help_flags(module), documented()[module]
    assert offered - listed == set(), f"python -m {module}: flags missing from docs/flags.md"
    assert (
        listed - offered == set()
    ), f"python -m {module}: docs/flags.md lists flags the command lacks"


def test_client_demo_has_no_flags_of_its_own():
    """client.demo hands its arguments to the client; if it ever parses its own, document them."""
    source = (ROOT / "client" / "demo.py").read_text()
    assert "add_argument" not in source and "client_main(" in source
    assert documented()["client.demo"] == set()


def section(text: str, heading: str) -> str:
    return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def test_flags_md_lists_the_makefile_targets_and_variables():
    makefile = (ROOT / "Makefile").read_text()
    make = section(FLAGS_MD.read_text(), "## make")
    targets = set(re.findall(r"^([a-z-]+):.*## ", makefile, re.M))
    assert set(re.findall(r"^\| `make ([a-z-]+)` \|", make, re.M)) == targets
    variables = set(re.findall(r"^([A-Z_]+) \?=", makefile, re.M))
    variables |= set(re.findall(r"\$\(([A-Z_]+_FLAGS)\)", makefile))
    assert set(re.findall(r"^\| `([A-Z_]+)` \|", make, re.M)) == variables


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_in_readme_and_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []
