"""The library every stage imports: vocabulary, tensor contract, the network and its model directory
(charrnn.model), sampling, the table of served models, the one way to open an ONNX model, errors and CLI help.

Only `charrnn.model` imports TensorFlow; everything else needs NumPy (and ONNX Runtime or tritonclient where it
says so), so the python-backend models and the client stay light. The serving code (the python models' runtime,
the local Triton launcher) is the serve stage's: serve/runtime/, serve/local_triton.py.
"""

from __future__ import annotations

import functools

__all__ = ["version"]


@functools.cache
def version() -> str:
    """The project's version, defined once: pyproject.toml's `[project] version`. A checkout reads its own
    pyproject.toml (so an editable install made before a version bump still tells the truth); an installed
    wheel, its distribution metadata (importlib.metadata); "unknown" where neither is there (e.g. the library
    copied into a container)."""
    import tomllib
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
        if project["name"] == "charrnn-triton":
            return project["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    try:
        return installed_version("charrnn-triton")
    except PackageNotFoundError:
        return "unknown"


def __getattr__(name: str) -> str:
    """charrnn.__version__, read when asked for (importing charrnn reads no file)."""
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
