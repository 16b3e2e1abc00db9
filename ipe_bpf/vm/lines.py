"""The kernel lines the test VM boots, and which release of each.

A line is a Debian kernel series with its own guest: ``6.1`` (bookworm: BPF LSM, no kernel IPE),
``6.12`` (trixie: BPF LSM and kernel IPE; the default) and ``7.x`` (trixie-backports' newest).
``--kernel`` takes a line name or an exact release (``6.1.0-50-cloud-amd64``,
``7.3.4+deb13-cloud-amd64``), which belongs to the line whose series it starts with.

Releases: the stable lines are pinned (reproducible runs; when the archive drops the pinned
release the build fails naming the release it serves now and the override), ``7.x`` is the
newest release its archive serves, looked up in the mirror's package index when an image is
built (backports replaces its kernel every few weeks).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import VmError

FLAVOUR = "-cloud-amd64"  # BPF LSM in the default LSM list, NVMe and ext4 built in: no initrd


@dataclass(frozen=True)
class KernelLine:
    """One kernel series and the guest that goes with it."""

    name: str  # what --kernel takes
    suite: str  # the guest's Debian release
    kernel_suite: str  # the archive suite its kernel comes from
    series: str  # its releases start with this ("6.1.", "7.")
    python: str  # the guest's python3 (the host downloads wheels for it)
    glibc: tuple[int, int]  # the guest's C library (which manylinux wheels run there)
    pinned: str | None  # the release; None: the newest kernel_suite serves
    bcc: bool  # BCC and the kernel headers it compiles against (the BCC development loader)

    @property
    def backports(self) -> bool:
        return self.kernel_suite != self.suite

    def owns(self, release: str) -> bool:
        return release.startswith(self.series)


# Pinned 2026-12-01 from the mirror's package index: bookworm serves 6.1.0-50 (Debian
# 6.1.176-1) and trixie 6.12.117 (6.12.117-1); trixie-backports' newest was 7.3.4 (7.3.4-1~bpo13+1).
LINES: tuple[KernelLine, ...] = (
    KernelLine("6.1", "bookworm", "bookworm", "6.1.", "3.11", (2, 36), "6.1.0-50-cloud-amd64", bcc=False),
    KernelLine("6.12", "trixie", "trixie", "6.12.", "3.13", (2, 41), "6.12.117+deb13-cloud-amd64", bcc=True),
    KernelLine("7.x", "trixie", "trixie-backports", "7.", "3.13", (2, 41), None, bcc=False),
)
DEFAULT_LINE = "6.12"
RELEASE_EXAMPLE = "6.1.0-50-cloud-amd64"


def line_named(name: str) -> KernelLine:
    for line in LINES:
        if line.name == name:
            return line
    raise VmError("EINVAL", f"no kernel line {name!r} (lines: {', '.join(l.name for l in LINES)})")


def line_of_release(release: str) -> KernelLine | None:
    """The line a kernel release (``uname -r`` or a package's ABI name) belongs to."""
    for line in sorted(LINES, key=lambda l: len(l.series), reverse=True):  # "6.12." before "6.1."
        if line.owns(release):
            return line
    return None


@dataclass(frozen=True)
class KernelChoice:
    """What --kernel asked for: a line, and an exact release unless the line floats."""

    line: KernelLine
    release: str | None  # None: the newest release of line.kernel_suite

    @property
    def spec(self) -> str:
        return self.release or self.line.name


def parse_kernel(spec: str) -> KernelChoice:
    """A line name (its pinned release, or floating) or an exact cloud kernel release."""
    spec = spec.strip()
    for line in LINES:
        if spec == line.name:
            return KernelChoice(line, line.pinned)
    names = ", ".join(line.name for line in LINES)
    if not re.fullmatch(r"\d+\.\d+[0-9A-Za-z.+~-]*" + re.escape(FLAVOUR), spec):
        raise VmError(
            "EINVAL",
            f"kernel {spec!r} is neither a line ({names}) nor a Debian cloud kernel release (e.g. {RELEASE_EXAMPLE})",
        )
    line = line_of_release(spec)
    if line is None:
        raise VmError("EINVAL", f"kernel {spec} belongs to none of the lines {names}")
    return KernelChoice(line, spec)


def release_order(release: str) -> tuple[int, ...]:
    """Sort key of releases of one line: their numbers in order (6.1.0-50 > 6.1.0-47, 7.3.4 > 7.2.12)."""
    return tuple(int(n) for n in re.findall(r"\d+", release.removesuffix(FLAVOUR)))


def newest_release(line: KernelLine, releases: Iterable[str]) -> str | None:
    """The newest cloud kernel release of LINE among RELEASES (None if there is none)."""
    mine = [r for r in releases if r.endswith(FLAVOUR) and line_of_release(r) == line]
    return max(mine, key=release_order, default=None)
