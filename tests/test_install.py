"""pyproject.toml: nothing generic in site-packages, one extra per role, entry points that resolve."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib

import pytest

from tests.helpers import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PROJECT["tool"]["setuptools"]


def test_every_installed_package_is_named_charrnn():
    assert SETUPTOOLS["packages"] and all(
        re.fullmatch(r"charrnn(_[a-z0-9]+)?(\.[a-z0-9_]+)*", p) for p in SETUPTOOLS["packages"]
    ), SETUPTOOLS["packages"]
    for name, folder in SETUPTOOLS["package-dir"].items():
        assert name == f"charrnn_{folder}" and (ROOT / folder / "__init__.py").is_file()


def test_the_client_extra_installs_no_tensorflow():
    extras = PROJECT["project"]["optional-dependencies"]
    assert PROJECT["project"]["dependencies"] == ["numpy>=1.26,<3"]
    assert not any(d.startswith(("tensorflow", "tf2onnx", "matplotlib")) for d in extras["client"])
    assert set(extras) >= {"client", "train", "export", "serve", "bench", "all", "dev"}


@pytest.mark.parametrize("name, target", sorted(PROJECT["project"]["scripts"].items()))
def test_entry_points_resolve_to_a_main(name, target):
    module, func = target.split(":")
    # the editable install of `make setup`
    assert callable(getattr(importlib.import_module(module), func))


def test_client_modules_import_without_tensorflow():
    """What `pip install ".[client]"` gets must not need TensorFlow: import it with tensorflow made unimportable."""
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
        "import charrnn_client.__main__, charrnn_client.generate, charrnn_client.connection\n"
        "assert 'tensorflow' not in {m for m in sys.modules if sys.modules[m] is not None}"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
