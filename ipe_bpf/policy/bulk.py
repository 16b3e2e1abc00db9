"""Helpers for the parser and the compiler when a policy has 100k or a million rules: no Python
code per row where a C loop can do it, and no cyclic garbage collection while millions of
objects that cannot form cycles are made (a collection walks every live object: at 100k rules
it cost the compiler more than its own work)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from operator import itemgetter
from typing import Any, ParamSpec, TypeVar

__all__ = ["columns", "gc_paused", "without_gc"]

P = ParamSpec("P")
R = TypeVar("R")


def columns(rows: Iterable[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows of `width` items as `width` lists, in C loops (zip(*rows) is slow for long inputs)."""
    rows = rows if isinstance(rows, list) else list(rows)
    return [list(map(itemgetter(i), rows)) for i in range(width)]


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection inside (what was enabled is enabled again after)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def without_gc(function: Callable[P, R]) -> Callable[P, R]:
    """`function` runs with gc_paused()."""
    @wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with gc_paused():
            return function(*args, **kwargs)

    return run
