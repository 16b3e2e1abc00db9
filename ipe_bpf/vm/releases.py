"""Which kernel release a VmConfig means: the pinned or given one, or for the floating line
the newest its archive serves (asked when an image is built, remembered for the runs after)."""

from __future__ import annotations

import os

from .archive import served_release
from .config import VmConfig


def known_release(config: VmConfig) -> str | None:
    """The kernel release --kernel means, without asking the mirror: the pinned or given one,
    else the one the floating line resolved to at its last build (None before any)."""
    choice = config.choice
    if choice.release is not None:
        return choice.release
    try:
        return config.resolved_path(choice.line).read_text().strip() or None
    except OSError:
        return None


def resolve_release(config: VmConfig, mirror: str) -> str:
    """The release to build: for a floating line the newest its suite serves now (remembered)."""
    choice = config.choice
    if choice.release is not None:
        return choice.release
    release = served_release(choice.line, mirror)
    path = config.resolved_path(choice.line)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(release + "\n")
    tmp.replace(path)
    return release
