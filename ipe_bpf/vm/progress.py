"""How the VM tooling reports progress: a tiny protocol, a silent and a rich implementation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console


class Reporter(Protocol):
    """Receives the steps of a long operation."""

    def step(self, title: str) -> "StepHandle": ...

    def note(self, message: str) -> None: ...


class StepHandle(Protocol):
    def __enter__(self) -> "StepHandle": ...

    def __exit__(self, *exc: object) -> None: ...

    def update(self, detail: str) -> None: ...


class _SilentStep:
    def __enter__(self) -> "_SilentStep":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, detail: str) -> None:
        return None


class SilentReporter:
    def step(self, title: str) -> _SilentStep:
        return _SilentStep()

    def note(self, message: str) -> None:
        return None


class _RichStep:
    def __init__(self, console: Console, title: str) -> None:
        self._console = console
        self._title = title
        self._start = 0.0
        self._status = None

    def __enter__(self) -> "_RichStep":
        self._start = time.monotonic()
        if self._console.is_terminal:
            self._status = self._console.status(self._title)
            self._status.__enter__()
        else:
            self._console.print(f"[bold]==>[/] {self._title} ...")
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self._status is not None:
            self._status.__exit__(exc_type, *rest)
        took = time.monotonic() - self._start
        mark = "[green]done[/]" if exc_type is None else "[red]failed[/]"
        self._console.print(f"[bold]==>[/] {self._title}: {mark} in {took:.1f} s")

    def update(self, detail: str) -> None:
        if self._status is not None:
            elapsed = time.monotonic() - self._start
            detail = detail.strip().replace("[", r"\[")[:100]
            self._status.update(f"{self._title} [dim]({elapsed:.0f} s) {detail}[/]")


class RichReporter:
    """Spinners with elapsed time on a terminal, one line per step otherwise (stderr)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)

    def step(self, title: str) -> _RichStep:
        return _RichStep(self.console, title)

    def note(self, message: str) -> None:
        self.console.print(f"[bold]==>[/] {message}", markup=True)


@contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` leaves the seconds taken in ``t[0]``."""
    box = [0.0]
    start = time.monotonic()
    try:
        yield box
    finally:
        box[0] = time.monotonic() - start
