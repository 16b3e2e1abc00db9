"""What every CLI command shares: one-line errors, exit codes, file reading, output."""

from __future__ import annotations

import errno
import os
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import typer

from ..errors import IpeBpfError

if TYPE_CHECKING:
    from rich.console import Console

PIPE_WIDTH = 1 << 16


class _LazyConsole:
    """A rich Console made at its first print: importing rich is a good part of the start-up
    of a command that prints plain lines (typer renders --help with its own console).

    Lines are never hard-wrapped; to a pipe or a file, tables are never narrowed either
    (rich would assume 80 columns and split digests and records over lines)."""

    def __init__(self, stderr: bool = False, **options: Any) -> None:
        self._stderr = stderr
        self._options = options
        self._console: Console | None = None

    def _rich(self) -> Console:
        if self._console is None:
            from rich.console import Console

            stream: TextIO = sys.stderr if self._stderr else sys.stdout
            wide = None if stream.isatty() else PIPE_WIDTH
            self._console = Console(soft_wrap=True, width=wide, stderr=self._stderr, **self._options)
        return self._console

    def print(self, *objects: Any, **options: Any) -> None:
        self._rich().print(*objects, **options)


console = _LazyConsole()
err_console = _LazyConsole(stderr=True, highlight=False)


MESSAGE_MAX = 1000  # an error line never echoes more (a 1 MB token stays a short line)


def one_line(message: str) -> str:
    """`message` on one line, at most MESSAGE_MAX characters."""
    flat = " ".join(message.splitlines())
    return flat if len(flat) <= MESSAGE_MAX else flat[: MESSAGE_MAX - 20] + f"... ({len(flat)} chars)"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit."""
    err_console.print(one_line(message), markup=False)
    raise typer.Exit(code)


@contextmanager
def reported_errors(path: str | None = None) -> Iterator[None]:
    """Turn library errors into `[FILE:[LINE:]] ERRNO: message` and exit status 1."""
    try:
        yield
    except IpeBpfError as err:
        if path is not None and err.path is None:
            err.located(path)
        fail(str(err) + root_hint(err.errno_name))
    except OSError as err:
        name = errno.errorcode.get(err.errno or 0, "EIO")
        where = err.filename if err.filename is not None else path
        fail(f"{where}: {name}: {err.strerror}" + root_hint(name))


def root_hint(errno_name: str) -> str:
    """' (run as root)' after a permission error of a user who is not root, else ''."""
    if errno_name in ("EPERM", "EACCES") and os.geteuid() != 0:
        return " (run as root)"
    return ""


def read_bytes(path: Path) -> bytes:
    """A file named on the command line (size-limited, no devices), or a one-line error."""
    from ..policy.files import read_input

    with reported_errors(str(path)):
        return read_input(path)


def print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")


def emit_line(line: str) -> None:
    """Print one line of a stream (audit records) at once; a reader that went away (`| head`)
    ends the command quietly instead of with a BrokenPipeError traceback."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        os.close(devnull)
        raise typer.Exit(0) from None
