"""Reading the guest's serial console: the marker lines PID 1 prints, and what went wrong.

PID 1 prints ``IPE-BPF-VM-STATUS <nonce> <status>`` after the command, then
``IPE-BPF-VM-RESULTS <nonce> ok|failed`` after writing /results, or
``IPE-BPF-VM-FAIL <reason>`` when it cannot run the command at all.  The nonce is fresh per
run, so output of the command that happens to look like a marker is not taken for one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_MARKER = re.compile(r"IPE-BPF-VM-(STATUS|RESULTS|FAIL) ?(\S*) ?(.*?)\s*$")
_PANIC = re.compile(r"Kernel panic - not syncing: ?(.*)")
_SANE_STATUS = range(0, 256)


@dataclass
class ConsoleState:
    """What has been learnt from the console so far."""

    nonce: str
    status: int | None = None
    results: str | None = None  # "ok" or "failed"
    failure: str | None = None  # PID 1's reason for not running the command
    panic: str | None = None
    watchdog: bool = False  # PID 1 listed the processes because the timeout was near
    lines: int = 0
    tail: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        """Take one console line (without its newline)."""
        self.lines += 1
        self.tail = (self.tail + [line])[-20:]
        if "IPE-BPF-VM-WATCHDOG" in line:
            self.watchdog = True
        panic = _PANIC.search(line)
        if panic and self.panic is None:
            self.panic = panic.group(1).strip() or "kernel panic"
        match = _MARKER.search(line)
        if not match:
            return
        kind, first, rest = match.groups()
        if kind == "FAIL":
            if self.status is None:
                self.failure = " ".join(part for part in (first, rest) if part) or "unknown failure"
            return
        if first != self.nonce:
            return
        if kind == "STATUS" and self.status is None:
            try:
                value = int(rest)
            except ValueError:
                return
            if value in _SANE_STATUS:
                self.status = value
        elif kind == "RESULTS" and self.results is None and rest in {"ok", "failed"}:
            self.results = rest

    @property
    def finished(self) -> bool:
        """The guest said all it will say (it powers off next)."""
        return self.results is not None or self.failure is not None or self.panic is not None


def split_lines(buffer: bytes) -> tuple[list[str], bytes]:
    """Complete console lines of BUFFER (CR/LF stripped) and the incomplete rest."""
    *lines, rest = buffer.split(b"\n")
    return [line.rstrip(b"\r").decode(errors="replace") for line in lines], rest
