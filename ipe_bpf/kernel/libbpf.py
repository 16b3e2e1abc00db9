"""The distribution's libbpf (libbpf.so.1) through ctypes: the few calls the CO-RE loader and
the kernel probe need, each turned into a KernelError with the errno name on failure.

libbpf 1.x conventions: constructors return NULL and set errno, other calls return a negative
errno.  Its log lines (the verifier's output when a load fails) are collected through
libbpf_set_print, so an error can show the lines that explain it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from ..errors import KernelError

_c = ctypes.c_void_p
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

# name: (restype, argtypes)
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "libbpf_set_print": (_c, [_PRINT_FN]),
    "bpf_object__open_file": (_c, [ctypes.c_char_p, _c]),
    "bpf_object__load": (ctypes.c_int, [_c]),
    "bpf_object__close": (None, [_c]),
    "bpf_object__next_program": (_c, [_c, _c]),
    "bpf_object__next_map": (_c, [_c, _c]),
    "bpf_object__find_map_by_name": (_c, [_c, ctypes.c_char_p]),
    "bpf_program__name": (ctypes.c_char_p, [_c]),
    "bpf_program__section_name": (ctypes.c_char_p, [_c]),
    "bpf_program__set_autoload": (ctypes.c_int, [_c, ctypes.c_bool]),
    "bpf_program__autoload": (ctypes.c_bool, [_c]),
    "bpf_program__attach": (_c, [_c]),
    "bpf_program__fd": (ctypes.c_int, [_c]),
    "bpf_link__pin": (ctypes.c_int, [_c, ctypes.c_char_p]),
    "bpf_link__fd": (ctypes.c_int, [_c]),
    "bpf_link__disconnect": (None, [_c]),
    "bpf_link__destroy": (ctypes.c_int, [_c]),
    "bpf_map__name": (ctypes.c_char_p, [_c]),
    "bpf_map__fd": (ctypes.c_int, [_c]),
    "bpf_map__set_max_entries": (ctypes.c_int, [_c, ctypes.c_uint32]),
    "bpf_map__set_initial_value": (ctypes.c_int, [_c, ctypes.c_void_p, ctypes.c_size_t]),
    "bpf_map__initial_value": (_c, [_c, ctypes.POINTER(ctypes.c_size_t)]),
    "bpf_map__pin": (ctypes.c_int, [_c, ctypes.c_char_p]),
    "btf__load_vmlinux_btf": (_c, []),
    "btf__load_module_btf": (_c, [ctypes.c_char_p, _c]),
    "btf__free": (None, [_c]),
    "btf__find_by_name_kind": (ctypes.c_int32, [_c, ctypes.c_char_p, ctypes.c_uint32]),
    "btf__type_by_id": (_c, [_c, ctypes.c_uint32]),
    "btf__name_by_offset": (ctypes.c_char_p, [_c, ctypes.c_uint32]),
}


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    """libbpf.so.1, loaded once (KernelError ENOPKG if the distribution's libbpf1 is missing)."""
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        handle = ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise KernelError("ENOPKG", "libbpf.so.1 not found (install the distribution's libbpf1 package)") from None
    for fn, (restype, argtypes) in _SIGNATURES.items():
        func = getattr(handle, fn)
        func.restype = restype
        func.argtypes = argtypes
    return handle


def check(ret: int, what: str) -> int:
    """A libbpf int result: negative -> KernelError with that errno."""
    if ret < 0:
        raise failure(what, -ret)
    return ret


def check_ptr(ptr: int | None, what: str) -> int:
    """A libbpf constructor's result: NULL -> KernelError with errno."""
    if not ptr:
        raise failure(what, ctypes.get_errno() or errno.EINVAL)
    return ptr


def failure(what: str, err: int) -> KernelError:
    detail = log_tail()
    message = f"{what}: {os.strerror(err)}" + (f" ({detail})" if detail else "")
    return KernelError(errno.errorcode.get(err, f"E{err}"), message)


# ------------------------------------------------------------------------------- logging

_log: list[str] = []
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]


def _print(level: int, fmt: bytes, args: int) -> int:
    if platform.machine() == "x86_64":  # va_list is a pointer there: vsnprintf can format it
        # a verifier log comes as one message of up to 16 MiB; its end says why
        buf = ctypes.create_string_buffer(_VERIFIER_LOG_BYTES if b"LOG" in fmt else 4096)
        _libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace")
    else:
        text = fmt.decode(errors="replace")
    _log.extend(line for line in text.splitlines() if line.strip())
    del _log[:-_KEPT_LINES]
    return 0


_VERIFIER_LOG_BYTES = 17 << 20
_KEPT_LINES = 4000


_print_fn = _PRINT_FN(_print)  # kept alive for as long as libbpf may call it


@contextmanager
def collecting_log() -> Iterator[list[str]]:
    """Collect libbpf's messages (warnings, verifier output) for the duration."""
    _log.clear()
    old = lib().libbpf_set_print(_print_fn)
    try:
        yield _log
    finally:
        lib().libbpf_set_print(ctypes.cast(old, _PRINT_FN) if old else _PRINT_FN())


def log_tail(lines: int = 3) -> str:
    """The last verifier/libbpf lines worth showing in a one-line error."""
    interesting = [line.strip() for line in _log if not line.startswith("libbpf: elf:")]
    return " | ".join(interesting[-lines:])


def full_log() -> list[str]:
    return list(_log)
