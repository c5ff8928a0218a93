"""What every command-line tool of the package shares: one-line usage errors and exit codes.

A user error (bad flag value, missing file) prints one line on stderr and exits with status 2,
never a traceback; library errors (`PaliGemmaError`) are reported the same way by `run_main`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Optional, Sequence

from .errors import PaliGemmaError

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`prog: error: ...`) and exit status 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def fail(prog: str, message: str) -> int:
    """Print a user error in the CLI's one-line form and return the exit status to use."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a CLI body; `PaliGemmaError` becomes one line on stderr and exit 2, Ctrl-C exit 130."""
    try:
        return body()
    except PaliGemmaError as e:
        return fail(prog, str(e))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main_entry(main: Callable[[Optional[Sequence[str]]], int]) -> NoReturn:
    """`if __name__ == "__main__": main_entry(main)`: exit with what `main` returns."""
    sys.exit(main(None))
