"""System call numbers per architecture: the one table (glibc's syscall() takes raw numbers).

The numbers are the kernel's uapi ones (arch/*/entry/syscalls, include/uapi/asm-generic/unistd.h).
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from types import MappingProxyType

from ..errors import KernelError

SYSCALLS: Mapping[str, Mapping[str, int]] = MappingProxyType({
    "x86_64": MappingProxyType({"bpf": 321, "statx": 332}),
    "aarch64": MappingProxyType({"bpf": 280, "statx": 291}),
    "riscv64": MappingProxyType({"bpf": 280, "statx": 291}),
    "s390x": MappingProxyType({"bpf": 351, "statx": 379}),
    "ppc64le": MappingProxyType({"bpf": 361, "statx": 383}),
})


def number(name: str, machine: str | None = None) -> int:
    """The number of syscall `name` on `machine` (this one by default); ENOSYS if unknown."""
    machine = platform.machine() if machine is None else machine
    try:
        return SYSCALLS[machine][name]
    except KeyError:
        raise KernelError("ENOSYS", f"{name}(2) syscall number unknown for {machine}") from None
