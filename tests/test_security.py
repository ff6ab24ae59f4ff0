"""Repository-wide security scan: no unsafe deserialization or evaluation (pickle/marshal loads, eval, exec,
yaml.load, allow_pickle=True, shell=True) in any committed Python file. The security defaults of the servers
are tested where they are set: tests/test_local_triton.py (the local launcher) and tests/test_compose.py /
tests/test_compose_slim.py (docker compose)."""

from __future__ import annotations

import re
import subprocess

from tests.helpers import ROOT

UNSAFE = re.compile(
    r"\bpickle\s*\.\s*loads?\s*\(|(?<![\w.])eval\s*\(|(?<![\w.])exec\s*\(|\bmarshal\s*\.\s*loads?\s*\("
    r"|allow_pickle\s*=\s*True|\byaml\s*\.\s*load\s*\(|\bshell\s*=\s*True"
)


def test_no_pickle_eval_exec_anywhere():
    """No unsafe deserialization or evaluation in any committed Python file. (The importer's --trust-pickle
    path unpickles data only: tests/test_import_tf1.py checks a pickle with a global is refused.)"""
    files = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(files) > 20
    hits = []
    for name in files:
        path = ROOT / name
        # this file spells the patterns out
        if not path.is_file() or name == "tests/test_security.py":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            code = line.split("#", 1)[0]
            if UNSAFE.search(code):
                hits.append((name, number, line.strip()))
    assert hits == [], f"unsafe deserialization/evaluation: {hits}"
