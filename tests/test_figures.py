"""Every figure the docs quote is in the results file its paragraph names.

A figure is a number with a unit of time, size, rate or ratio ("607 chars/s", "3.22x", "2,285 MiB") and, in a
table, a cell that is only a number. The docs (README.md and docs/*.md) are cut into blocks: runs of lines
between blank lines, outside fenced code; a table also counts the block just above it, its caption. Inline code
is not prose: `hard-stop-after 30s` is a setting spelled as the config spells it.

- A block that names a results file (a file that a script writes: `bench/results/*` committed, or a model's
  `model_card.json`) must find each of its figures in one of the files it names. A figure matches a number of
  the file when that number, rounded to the figure's decimals, is the figure ("3,709 s" matches 3708.8).
- A block that names none may quote settings only: the phrases in SETTINGS below, each with the file and
  the literal that set it, checked too. Anything else is a hand-measured figure: it goes to the closing note of the work that measured it, or
  its benchmark writes it to a results file.

    python -m pytest tests/test_figures.py
"""

from __future__ import annotations

import re
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
UNIT = (
    r"\s?(?:ms|µs|us|s|min|minutes|seconds|h|hours|MiB|GiB|KiB|MB|GB|kB|KB|%|"
    r"chars/s|characters/s|requests/s|req/s|infer/s)(?![\w/])|[x×](?![\w\d])"
)
FIGURE = re.compile(rf"(?<![\w.,/-])(?P<a>{NUM})(?:\s?(?:–|-|to)\s?(?P<b>{NUM}))?(?P<unit>{UNIT})")
CELL = re.compile(rf"^\**(?P<a>{NUM})(?P<unit>{UNIT})?\**$")

MODEL_CARDS = {p.relative_to(ROOT).as_posix(): p for p in ROOT.glob("models/*/model_card.json")}

# Settings the docs state without a results file: (a phrase of the docs that states it, the file that sets it,
# the literal that sets it there). The phrase carries enough words to stand for that one statement.
SETTINGS: list[tuple[str, str, str]] = [
    # README.md
    ("60 s idle timeout", "charrnn/contract.py", "MAX_SEQUENCE_IDLE_US = 60_000_000"),
    # docs/benchmarks.md
    ("±64 MiB", "bench/mixed_soak.py", "default=64.0"),
    ("10 minutes", "Makefile", "for 10 min"),
    # docs/failures.md
    ("60 s) is freed", "charrnn/contract.py", "MAX_SEQUENCE_IDLE_US = 60_000_000"),
    ("2 s timeout", "tests/helpers/servers.py", "SHORT_IDLE_US = 2_000_000"),
    ("no answer for 60 s", "client/generate.py", "RESULT_TIMEOUT_S = 60.0"),
    ("idle for 60 s", "charrnn/contract.py", "MAX_SEQUENCE_IDLE_US = 60_000_000"),
    ("parameter, 1 s", "charrnn/contract.py", "ADMISSION_TIMEOUT_US = 1_000_000"),
    ("slot within 1 s", "charrnn/contract.py", "ADMISSION_TIMEOUT_US = 1_000_000"),
    ("capacity for 60 s", "charrnn/contract.py", "MAX_SEQUENCE_IDLE_US = 60_000_000"),
    ("the 60 s timeout", "charrnn/contract.py", "MAX_SEQUENCE_IDLE_US = 60_000_000"),
    ("16 KiB buffer", "serve/haproxy.cfg", "tune.bufsize, 16 KiB"),
    # docs/flags.md
    ("at most 8 s", "client/generate.py", "max_delay: float = 8.0"),
    # docs/kubernetes.md
    ("2 s apart", "serve/haproxy.cfg", "check inter 2s rise 2"),
    ("2 s, so a replica", "serve/haproxy.cfg", "check inter 2s"),
    ("8 GiB limit", "serve/k8s/triton.yaml", "memory: 8Gi"),
    ("5 s in (it has already left", "serve/k8s/triton.yaml", 'command: ["sleep", "5"]'),
    ("45 s grace period", "serve/k8s/triton.yaml", "terminationGracePeriodSeconds: 45"),
    ("5 s; open streams", "serve/k8s/proxy.yaml", "sleep 5; kill -USR1 1"),
    ("1 GiB; no CPU limit", "serve/k8s/triton.yaml", "memory: 1Gi"),
    ("120 s), readiness", "serve/k8s/triton.yaml", "failureThreshold: 24"),
    ("1 GiB of", "serve/k8s/triton.yaml", "sizeLimit: 1Gi"),
    ("45 s grace period", "serve/k8s/proxy.yaml", "terminationGracePeriodSeconds: 45"),
    # docs/model.md
    ("default of 1 s is", "export/configs.py", "Triton's default, 1 s"),
    # docs/production.md
    ("30 s after a client died", "docker-compose.yml", "--exit-timeout-secs=30"),
    ("1 s timeout", "charrnn/contract.py", "ADMISSION_TIMEOUT_US = 1_000_000"),
    ("1 s with no END", "serve/runtime/sequence_state.py", "idle_seconds + 1.0"),
    ("30 s without an answer", "serve/monitoring/rules.yml", "for: 30s"),
    ("2 minutes in which", "serve/monitoring/rules.yml", "for: 2m"),
    ("10 minutes, 5 minutes on end", "serve/monitoring/rules.yml", "[10m]"),
    ("5 minutes on end", "serve/monitoring/rules.yml", "for: 5m"),
    # docs/scaling.md
    ("2 s, 2 in a row", "serve/haproxy.cfg", "check inter 2s rise 2 fall 2"),
    ("1 h of inactivity", "serve/haproxy.cfg", "HAPROXY_IDLE_TIMEOUT-1h"),
    ("3 s to connect", "serve/haproxy.cfg", "timeout connect 3s"),
    ("2 s per check", "serve/haproxy.cfg", "timeout check 2s"),
    ("10 s for request headers", "serve/haproxy.cfg", "timeout http-request 10s"),
    ("16 MiB and 411", "serve/haproxy.cfg", "gt 16777216"),
    ("16 MiB+", "serve/haproxy.cfg", "gt 16777216"),
    ("16 KiB of the body", "serve/haproxy.cfg", "tune.bufsize, 16 KiB"),
]


def results_files() -> dict[str, Path]:
    """Name -> path of every results file a doc may name: committed files under bench/results, model cards."""
    listed = subprocess.run(
        ["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    names = {Path(f).name: ROOT / f for f in listed if Path(f).suffix in (".md", ".json", ".csv")}
    names.update(MODEL_CARDS)
    return names


def blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each block of prose or table; fenced code dropped, inline code blanked."""
    out, current, start, fenced = [], [], 0, False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            line = ""
        if fenced or not line.strip():
            if current:
                out.append((start, "\n".join(current)))
            current = []
            continue
        if not current:
            start = number
        current.append(line)
    if current:
        out.append((start, "\n".join(current)))
    return out


def strip_code(text: str) -> str:
    return re.sub(r"`[^`]*`", lambda m: " " * len(m.group()), text)


def named_files(text: str, names: dict[str, Path]) -> list[Path]:
    """The results files a block names (by file name, as link, path or inline code)."""
    return [
        path
        for name, path in names.items()
        if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", text)
    ]


def figures(text: str, cells: bool = True) -> list[str]:
    """Every figure of a block: numbers with a unit, and (with `cells`) number-only table cells."""
    found, prose = [], []
    for line in strip_code(text).splitlines():
        if line.lstrip().startswith("|"):
            for cell in line.strip().strip("|").split("|"):
                match = CELL.match(cell.strip())
                if match and (cells or match.group("unit")):
                    found.append(match.group("a") + (match.group("unit") or "").strip())
            line = " ".join(c for c in line.split("|") if not CELL.match(c.strip()))
        prose.append(line)
    for match in FIGURE.finditer(" ".join(" ".join(prose).split())):
        unit = match.group("unit").strip()
        found += [n + unit for n in (match.group("a"), match.group("b")) if n]
    return found


def number(figure: str) -> Decimal:
    return Decimal(re.match(NUM, figure).group().replace(",", ""))


def numbers_in(text: str) -> set[Decimal]:
    return {Decimal(n.replace(",", "")) for n in re.findall(NUM, text)}


def in_file(figure: str, numbers: set[Decimal]) -> bool:
    """Whether the file has the figure, rounded to its decimals; a percentage may be a fraction there (73% = 0.73)."""
    quoted = number(figure)
    candidates = [quoted, quoted / 100] if figure.endswith("%") else [quoted]
    for q in candidates:
        places = Decimal(1).scaleb(q.as_tuple().exponent)
        if any(n.quantize(places) == q for n in numbers if abs(n - q) < 1):
            return True
    return False


def findings() -> list[str]:
    names = results_files()
    file_numbers = {path: numbers_in(path.read_text()) for path in set(names.values())}
    problems = []
    for doc in DOCS:
        previous = ""
        for line, text in blocks(doc):
            where = f"{doc.relative_to(ROOT)}:{line}"
            caption = previous if text.lstrip().startswith("|") else ""
            files = named_files(caption + text, names)
            previous = text
            numbers = set().union(*(file_numbers[p] for p in files))
            for figure in figures(text, cells=bool(files)):
                if files and not in_file(figure, numbers):
                    problems.append(
                        f"{where}: {figure} is not in {', '.join(p.name for p in files)}"
                    )
                elif not files and not is_setting(text, figure):
                    problems.append(f"{where}: {figure} has no results file in its paragraph")
    return problems


def is_setting(text: str, figure: str) -> bool:
    prose = " ".join(strip_code(text).split())
    return any(
        phrase in prose and number(figure) in numbers_in(phrase) for phrase, _, _ in SETTINGS
    )


def test_every_figure_is_in_the_results_file_its_paragraph_names():
    problems = findings()
    assert not problems, (
        f"{len(problems)} figure(s) without their results file (name the file the benchmark writes in the "
        "paragraph, or move a hand-measured figure to the closing note):\n" + "\n".join(problems)
    )


@pytest.mark.parametrize("value, file, literal", SETTINGS)
def test_each_setting_is_set_where_it_says(value, file, literal):
    assert literal in (ROOT / file).read_text(), f"{value}: {file} no longer contains {literal!r}"


def test_the_detector_finds_figures_and_their_files():
    names = results_files()
    text = "One stream served 607 chars/s, 4.05x one stream, in 2,285 MiB ([bench.md](bench/results/bench.md))."
    assert figures(text) == ["607chars/s", "4.05x", "2,285MiB"]
    assert [p.name for p in named_files(text, names)] == ["bench.md"]
    assert figures("| model | 1 | **477** | `30s` | 2×512 |") == ["1", "477"]
    assert in_file("3,709", {Decimal("3708.8")}) and not in_file("3,710", {Decimal("3708.8")})
    assert in_file("73%", {Decimal("0.73")}) and not in_file("73", {Decimal("0.73")})
