"""The kernel's own IPE, through its securityfs files (/sys/kernel/security/ipe): ipe-bpf's peer.

Used where the real IPE runs next to ipe-bpf for comparison (tests/vm, benchmarks): it takes
only policies signed by a key in the kernel's keyrings, and once a policy is active there is
no way back to "no policy", so callers keep it permissive.
"""

from __future__ import annotations

import os
from pathlib import Path

IPE_FS = Path("/sys/kernel/security/ipe")


def write(relative: str, data: bytes) -> None:
    """One write(2) of ``data`` to an IPE securityfs file (OSError carries the kernel's errno)."""
    fd = os.open(IPE_FS / relative, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def deploy(blob: bytes) -> None:
    """new_policy: load a signed policy (not activated)."""
    write("new_policy", blob)


def activate(name: str) -> None:
    write(f"policies/{name}/active", b"1")


def delete(name: str) -> None:
    write(f"policies/{name}/delete", b"1")


def is_deployed(name: str) -> bool:
    return (IPE_FS / "policies" / name).is_dir()


def set_enforce(on: bool) -> None:
    write("enforce", b"1" if on else b"0")


def set_success_audit(on: bool) -> None:
    write("success_audit", b"1" if on else b"0")
