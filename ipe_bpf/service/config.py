"""The service settings: /etc/ipe-bpf/ipe-bpf.conf (or ``$IPE_BPF_CONFIG``).

One ``key = value`` per line, ``#`` starts a comment, blank lines are ignored; a missing file
means every default.  Every error names the file and line (``ipe-bpf.conf:4: EINVAL: ...``)::

    log_file = /var/log/ipe-bpf/audit.log   # the durable log (absolute path)
    log_max_size = 8M          # rotate when the log would grow past this (K, M, G suffixes)
    log_keep = 5               # rotated files kept: audit.log.1 (newest) .. audit.log.5
    log_fsync = batch          # batch: fdatasync every drained batch before it is released
                               #   from the ring buffer; none: leave it to the page cache
    journal = yes              # send each record to journald (native protocol)
    kernel_audit = auto        # auto: to the kernel audit subsystem while auditd is
                               #   registered; yes: always; no: never
    ring_buffer_size = 4M      # the BPF ring buffer (a power of two, at least a page; one
                               #   record takes 608 bytes: 4M holds about 6900); takes
                               #   effect at the next load
    boot_failure = open        # what the boot unit does when it cannot load: open (boot on,
                               #   unenforced), emergency (emergency.target: console only),
                               #   poweroff; `ipe-bpf service install` applies it
    seal = no                  # yes: `ipe-bpf load` (the boot unit) seals right after loading:
                               #   until reboot nobody, root included, can unload ipe-bpf, switch
                               #   enforcement off or change the policy (docs/seal.md); a load
                               #   that cannot seal (permissive, no policy) fails

``$IPE_BPF_RUN_DIR`` (default /run/ipe-bpf) holds the per-boot state: the serial counter, the
control-record spool, the daemon's ring-buffer cursor and status.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..audit.control_log import DEFAULT_RUN_DIR, run_dir
from ..errors import ServiceError

DEFAULT_CONFIG = Path("/etc/ipe-bpf/ipe-bpf.conf")
CONFIG_ENV = "IPE_BPF_CONFIG"

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_TRUE = ("yes", "true", "on", "1")
_FALSE = ("no", "false", "off", "0")


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get(CONFIG_ENV) or DEFAULT_CONFIG)


@dataclass(frozen=True)
class Config:
    log_file: Path = Path("/var/log/ipe-bpf/audit.log")
    log_max_size: int = 8 << 20
    log_keep: int = 5
    log_fsync: str = "batch"
    journal: bool = True
    kernel_audit: str = "auto"
    ring_buffer_size: int = 4 << 20
    boot_failure: str = "open"
    seal: bool = False
    run_dir: Path = field(default=DEFAULT_RUN_DIR, metadata={"file": False})

    @property
    def ringbuf_pages(self) -> int:
        """What the loader takes (LoadOptions.ringbuf_pages)."""
        return self.ring_buffer_size // mmap.PAGESIZE

    @property
    def fsync_batches(self) -> bool:
        return self.log_fsync == "batch"


# ------------------------------------------------------------------------ value parsers


def _size(text: str) -> int:
    number, suffix = text[:-1], text[-1:].upper()
    if suffix not in _SUFFIXES or suffix == "":
        number, suffix = text, ""
    if not number.isdigit():
        raise ValueError(f"expected a size like 8M or 262144, got {text!r}")
    return int(number) * _SUFFIXES[suffix]


def _bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected {' or '.join(allowed)}, got {text!r}")
        return text

    return parse


def _absolute(text: str) -> Path:
    path = Path(text)
    if not path.is_absolute():
        raise ValueError(f"expected an absolute path, got {text!r}")
    return path


def _keep(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise ValueError(f"expected a number of files from 1 to 1000, got {text!r}")
    return int(text)


def _log_size(text: str) -> int:
    size = _size(text)
    if size < 4096:
        raise ValueError(f"log_max_size must be at least 4K, got {text!r}")
    return size


def _ring_size(text: str) -> int:
    size = _size(text)
    if size < mmap.PAGESIZE or size & (size - 1):
        raise ValueError(f"ring_buffer_size must be a power of two of at least {mmap.PAGESIZE} "
                         f"bytes, got {text!r}")
    return size


_PARSERS: dict[str, Callable[[str], object]] = {
    "log_file": _absolute,
    "log_max_size": _log_size,
    "log_keep": _keep,
    "log_fsync": _choice("batch", "none"),
    "journal": _bool,
    "kernel_audit": _choice("auto", "yes", "no"),
    "ring_buffer_size": _ring_size,
    "boot_failure": _choice("open", "emergency", "poweroff"),
    "seal": _bool,
}
assert set(_PARSERS) == {f.name for f in fields(Config) if f.metadata.get("file", True)}


def parse_config(text: str, source: str) -> Config:
    """The settings in ``text`` (read from ``source``, which errors name) over the defaults."""
    values: dict[str, object] = {}
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep or not key:
            raise ServiceError("EINVAL", f"expected `key = value`, got {line!r}", path=source, line=number)
        parser = _PARSERS.get(key)
        if parser is None:
            known = ", ".join(sorted(_PARSERS))
            raise ServiceError("EINVAL", f"unknown key {key!r} (known: {known})", path=source, line=number)
        if key in seen:
            raise ServiceError("EINVAL", f"{key} is set twice (first on line {seen[key]})",
                               path=source, line=number)
        seen[key] = number
        try:
            values[key] = parser(value)
        except ValueError as exc:
            raise ServiceError("EINVAL", f"{key}: {exc}", path=source, line=number) from None
    return replace(Config(), **values)  # type: ignore[arg-type]


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The settings file (a missing one gives the defaults) with the run directory of ``environ``."""
    path = config_path(environ) if path is None else path
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        text = ""
    except UnicodeDecodeError:
        raise ServiceError("EILSEQ", "not UTF-8 text", path=str(path)) from None
    except OSError as exc:
        raise ServiceError(errno.errorcode.get(exc.errno or 0, "EIO"), f"cannot read: {exc.strerror}",
                           path=str(path)) from None
    return replace(parse_config(text, str(path)), run_dir=run_dir(environ))
