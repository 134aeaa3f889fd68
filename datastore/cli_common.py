"""The convention every command-line tool follows (spec-generate, spec-bench, index-build, datastore-serve).

Exit statuses:

    0    done
    1    internal error: one line on stderr naming the file that holds the full traceback
    2    usage or input error (bad option, missing file, bad value): one line on stderr, no traceback
    130  interrupted (Ctrl-C / SIGINT), as the shell reports a process killed by SIGINT

``--version`` prints ``<prog> <version of the installed specstore distribution>``.

This module lives in the base layer (imports no torch, nothing from ``client/``) so that every CLI can use it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import traceback
from importlib import metadata
from typing import Callable, Optional

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + int(signal.SIGINT)

DISTRIBUTION = "specstore"

# Input errors every CLI treats as the user's (exit 2); ModelNotFoundError is a FileNotFoundError.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


class UsageError(ValueError):
    """A bad combination of options found after parsing: one line on stderr, exit status 2."""


def package_version() -> str:
    """The installed distribution's version (pyproject's ``version``), or "unknown" when not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


class CliParser(argparse.ArgumentParser):
    """argparse with the convention: ``--version``, and usage errors as one line with exit status 2.

    argparse builds subcommand parsers with the parent's class, so they follow it too.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                          help="print the version and exit")

    def error(self, message: str):
        # argparse's own error() prints the whole usage block first; one line is easier to read and to grep
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces (error messages must stay on one line)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def usage_error(prog: str, err: BaseException | str) -> int:
    """Print ``prog: error: err`` on one line; EXIT_USAGE."""
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return EXIT_USAGE


def internal_error(prog: str, err: BaseException) -> int:
    """Write the current traceback to a log file, print one line pointing at it; EXIT_INTERNAL.

    Call from an ``except`` block (the traceback is the one being handled).
    """
    summary = one_line(f"{type(err).__name__}: {err}")
    try:
        fd, path = tempfile.mkstemp(prefix=f"{prog}-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{prog} {package_version()}\ncommand: {shlex.join(sys.argv)}\n\n")
            traceback.print_exc(file=f)
    except OSError:  # no writable temp folder: the traceback goes to stderr after all
        traceback.print_exc()
        path = "the traceback above"
    print(f"{prog}: internal error: {summary} (full traceback in {path})", file=sys.stderr)
    return EXIT_INTERNAL


def interrupted(prog: str, hint: Optional[str] = None) -> int:
    """Print ``prog: interrupted`` (with ``hint``); EXIT_INTERRUPTED."""
    print(f"{prog}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
    return EXIT_INTERRUPTED


def run_cli(prog: str, body: Callable[[], int], *, input_errors: tuple[type[BaseException], ...] = (),
            interrupt_hint: Optional[str] = None) -> int:
    """Run ``body()`` (a command after its arguments were parsed) under the convention; the exit status.

    ``input_errors``: exception types that mean bad input for this command, besides INPUT_ERRORS. Any other
    exception is an internal error. SystemExit passes through (argparse, ``--version``).
    """
    try:
        return body()
    except (*INPUT_ERRORS, *input_errors) as e:
        return usage_error(prog, e)
    except KeyboardInterrupt:
        return interrupted(prog, interrupt_hint)
    except Exception as e:  # noqa: BLE001 - the catch-all that turns a traceback into one line + a log file
        return internal_error(prog, e)
