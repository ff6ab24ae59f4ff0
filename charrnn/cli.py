"""The argument parser every command-line entry point builds: its program name, its docstring once, defaults shown."""

from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help; the description and the epilog's examples kept as written.

    No default is shown where there is none to show: None (the help says what happens then), an empty list and
    on/off switches (store_true). A string that line wrapping would mangle ("ROMEO:\\n") is shown quoted. A help
    text written as several lines (one per subcommand) keeps them, each wrapped on its own."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        lines = []
        for line in text.splitlines():  # a loop: super() fails in a comprehension
            lines += super()._split_lines(line, width)
        return lines

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        takes_default = action.option_strings or action.nargs in (
            argparse.OPTIONAL,
            argparse.ZERO_OR_MORE,
        )
        if (
            not takes_default
            or "%(default)" in text
            or action.nargs == 0
            or default is None
            or default is argparse.SUPPRESS
            or default == []
        ):
            return text
        if isinstance(default, str) and (not default or default != " ".join(default.split())):
            return f"{text} (default: {repr(default).replace('%', '%%')})"
        return text + " (default: %(default)s)"


class VersionAction(argparse.Action):
    """`--version`: prints `<prog> <version>` (pyproject.toml's version, charrnn.version()) and exits 0. The
    version is read only when asked for."""

    def __init__(
        self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None
    ):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from charrnn import version

        print(f"{parser.prog} {version()}")  # on stdout, like argparse's own version action
        parser.exit()


DEFAULT_MODEL_DIR = "models/shakespeare-lstm-2x512"


def add_model_dir(
    p: argparse.ArgumentParser, help: str = "model directory", default: str = DEFAULT_MODEL_DIR
) -> argparse.Action:
    """`--model-dir DIR` -> args.model_dir: a trained model's directory under models/ (`make train`). `--model`,
    its first spelling, is still accepted (the same option, shown in --help after it)."""
    return p.add_argument(
        "--model-dir", "--model", dest="model_dir", metavar="DIR", default=default, help=help
    )


def parser(prog: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """The ArgumentParser of one command: `prog` as users type it ("python -m client", or the entry point's
    name, e.g. charrnn-client, when run as one); the module docstring's
    first paragraph as the description and the rest (examples, details, exit codes) as the epilog, each once;
    every option's default shown; `--version` prints `<prog> <version>`. kwargs go to argparse.ArgumentParser
    (usage=, allow_abbrev=, ...).
    """
    summary, _, rest = (doc or "").strip("\n").partition("\n\n")
    invoked = os.path.basename(sys.argv[0] if sys.argv else "")
    # run as an installed entry point (pyproject.toml [project.scripts])
    if invoked.startswith("charrnn-"):
        prog = invoked
    kwargs.setdefault("formatter_class", HelpFormatter)
    p = argparse.ArgumentParser(
        prog=prog, description=summary or None, epilog=rest.strip("\n") or None, **kwargs
    )
    # Every command has it, like -h; docs/flags.md says so once (tests/test_docs.py leaves both out).
    p.add_argument("--version", action=VersionAction, help="print the version and exit")
    return p
