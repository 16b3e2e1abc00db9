"""The files of installed Debian packages, from dpkg's own database (as fapolicyd's deb backend).

dpkg keeps, per installed package, `info/<name>[:<arch>].list` (every path it unpacked) and
`status` (whether it is installed); `diversions` says where a file another package diverted
really is.  Read directly: no dpkg process, so it also works on a mounted image's database.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import IpeBpfError

ADMINDIR = Path("/var/lib/dpkg")


@dataclass(frozen=True)
class InstalledPackage:
    name: str  # as dpkg names its files: NAME or NAME:ARCH
    list_file: Path


def _installed(status: str) -> set[tuple[str, str]]:
    """(package, architecture) of every paragraph whose Status says installed."""
    found = set()
    for paragraph in status.split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith((" ", "\t")):
                fields[key] = value.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            found.add((fields["Package"], fields.get("Architecture", "all")))
    return found


def find_package(spec: str, admindir: Path = ADMINDIR) -> list[InstalledPackage]:
    """The installed instance(s) of NAME (every architecture) or NAME:ARCH; ENOENT if none."""
    name, _, arch = spec.partition(":")
    try:
        status = (admindir / "status").read_text(errors="replace")
    except OSError as err:
        raise IpeBpfError("ENOENT", f"cannot read dpkg's status ({err.strerror})", path=str(admindir / "status")) from None
    arches = sorted(a for n, a in _installed(status) if n == name and (not arch or a == arch))
    found = []
    for a in arches:
        for candidate in (admindir / "info" / f"{name}:{a}.list", admindir / "info" / f"{name}.list"):
            if candidate.exists():
                found.append(InstalledPackage(candidate.name[:-len(".list")], candidate))
                break
    if not found:
        raise IpeBpfError("ENOENT", f"package {spec!r} is not installed (dpkg's status and info/*.list)")
    return found


def diversions(admindir: Path = ADMINDIR) -> dict[str, tuple[str, str]]:
    """{diverted path: (where it is now, diverting package or ':' for a local diversion)}."""
    try:
        lines = (admindir / "diversions").read_text(errors="surrogateescape").splitlines()
    except OSError:
        return {}
    return {lines[i]: (lines[i + 1], lines[i + 2]) for i in range(0, len(lines) - 2, 3)}


def package_files(spec: str, admindir: Path = ADMINDIR) -> list[str]:
    """Every path the package installed, where it is now (diversions applied), sorted."""
    diverted = diversions(admindir)
    paths: set[str] = set()
    for pkg in find_package(spec, admindir):
        own_name = pkg.name.split(":", 1)[0]
        for line in pkg.list_file.read_text(errors="surrogateescape").splitlines():
            if not line or line == "/.":
                continue
            to, by = diverted.get(line, (line, own_name))
            paths.add(line if by == own_name else to)
    return sorted(paths)
