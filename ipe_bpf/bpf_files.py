"""Where the BPF program's files are: bpf/ in a source checkout, ipe_bpf/bpf/ in an install.

pyproject.toml maps the top-level bpf/ directory into the package as ipe_bpf/bpf, so a wheel
carries the prebuilt CO-RE object, its sources and the shared header.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent

HEADER = "ipe_bpf.h"
SOURCE = "ipe_bpf.bpf.c"
OBJECT = "ipe_bpf.bpf.o"
BCC_COMPAT = "bcc_compat.h"


def bpf_dir() -> Path:
    """The directory holding ipe_bpf.h, ipe_bpf.bpf.c and the object."""
    for candidate in (_PACKAGE / "bpf", _PACKAGE.parent / "bpf"):
        if (candidate / HEADER).is_file():
            return candidate
    return _PACKAGE.parent / "bpf"  # errors name the source-checkout location


def bpf_file(name: str) -> Path:
    return bpf_dir() / name
