"""The development loader: BCC compiles bpf/ipe_bpf.bpf.c at load time (`--loader bcc`).

Needs python3-bpfcc, clang/LLVM (BCC's) and the running kernel's headers; slow under
emulation (a minute or more), seconds on hardware.  BCC has no CO-RE, so the private structs'
offsets come from the kernel's BTF (btf.py) as -D constants, and BCC's own syntax lives in
bpf/bcc_compat.h, spliced into the source (BCC rewrites map calls only in the main buffer).
Kept for development on kernels whose headers BCC understands (Debian's 6.12).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..bpf_files import BCC_COMPAT, SOURCE, bpf_dir, bpf_file
from ..errors import KernelError
from . import btf



def available() -> str | None:
    """None if BCC can be used, else why not."""
    if importlib.util.find_spec("bcc") is None:
        return "python3 module bcc missing (install python3-bpfcc)"
    return None


def program_text() -> str:
    """The program source with bcc_compat.h inlined (see the module doc)."""
    source = bpf_file(SOURCE).read_text()
    include = f'#include "{BCC_COMPAT}"'
    if include not in source:
        raise KernelError("EINVAL", f"{bpf_file(SOURCE)} does not include {BCC_COMPAT}")
    return source.replace(include, bpf_file(BCC_COMPAT).read_text(), 1)


def cflags(ringbuf_pages: int, offsets: list[str] | None = None) -> list[str]:
    return [
        f"-I{bpf_dir()}",
        f"-DIPE_RINGBUF_PAGES={ringbuf_pages}",
        *(btf.kernel_defines() if offsets is None else offsets),
    ]


def _bcc_error(exc: BaseException) -> KernelError:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if "Permission denied" in first or "Operation not permitted" in first:
        return KernelError("EPERM", f"the kernel refused the BPF program: {first}")
    if "compile" in first.lower():
        return KernelError("EINVAL", f"BPF compile failed: {first} (details above)")
    return KernelError("EINVAL", f"BPF load failed: {first}")


@dataclass
class BccProgram:
    """A compiled, attached BCC module: fds for the caller to pin, then close()."""

    bpf: object

    def map_fd(self, name: str) -> int:
        from bcc.libbcc import lib  # type: ignore[import-not-found]

        fd = lib.bpf_table_fd(self.bpf.module, name.encode())  # type: ignore[attr-defined]
        if fd < 0:
            raise KernelError("ENOENT", f"map {name} not found in the compiled program")
        return int(fd)

    def link_fds(self) -> dict[str, int]:
        return {name.decode().removeprefix("lsm__"): fd
                for name, fd in self.bpf.lsm_fds.items()}  # type: ignore[attr-defined]

    def close(self) -> None:
        self.bpf.cleanup()  # type: ignore[attr-defined]


def load_program(ringbuf_pages: int) -> BccProgram:
    why = available()
    if why is not None:
        raise KernelError("ENOPKG", why)
    from bcc import BPF  # type: ignore[import-not-found]  # lazily: a system package

    try:
        b = BPF(text=program_text().encode(), cflags=cflags(ringbuf_pages))
    except Exception as exc:  # BCC raises plain Exception for compile/load/attach errors
        raise _bcc_error(exc) from None
    return BccProgram(b)
