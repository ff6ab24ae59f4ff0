"""Paths of the checkout, the test environment, and small helpers every kind of test uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
# CHARRNN_TEST_MODEL: run the suite against another model directory (e.g. a snapshot while training).
SHIPPED_MODEL = Path(
    os.environ.get("CHARRNN_TEST_MODEL", ROOT / "models" / "shakespeare-lstm-2x512")
)
COMMITTED_REPO = ROOT / "model_repository"
PY = sys.executable

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(*args, timeout=120):
    """`python <args>` in the checkout, output captured as text."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def read_json(path):
    return json.loads(path.read_text())


def all_strings(node) -> list[str]:
    """Every string in a parsed YAML document, keys included (compose file, Kubernetes manifests)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in all_strings(k) + all_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in all_strings(v)]
    return []
