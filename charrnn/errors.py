"""User-facing errors: `error: <what>: <why> (<what to do>)` and the exit codes every CLI uses."""

from __future__ import annotations

import functools
import sys
from typing import Callable

# Exit codes shared by every command-line entry point of the project.
EXIT_OK = 0
EXIT_FAILURE = 1  # a check failed (parity mismatch, test of the output, ...)
EXIT_USAGE = 2  # bad input from the user: flags, prompt, files
EXIT_UNAVAILABLE = 3  # a dependency is missing or unreachable (server, TensorRT, network)
EXIT_INTERRUPTED = 130  # Ctrl-C


class UserError(Exception):
    """An error the user can fix; printed as `error: <what>: <why> (<what to do>)`."""

    exit_code = EXIT_USAGE

    def __init__(self, what: str, why: str, fix: str = "") -> None:
        self.what, self.why, self.fix = what, why, fix
        super().__init__(self.message())

    def message(self) -> str:
        text = f"error: {self.what}: {self.why}"
        return f"{text} ({self.fix})" if self.fix else text


class UnavailableError(UserError):
    """Something the command needs is not there (a server, TensorRT, the network)."""

    exit_code = EXIT_UNAVAILABLE


class CheckFailed(UserError):
    """A verification ran and its result was wrong."""

    exit_code = EXIT_FAILURE


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI `main`: print UserErrors on stderr, map them and Ctrl-C to exit codes."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return int(main(*args, **kwargs) or EXIT_OK)
        except UserError as e:
            print(e.message(), file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapper
