"""Which files a policy is generated for: named files, the executables of directories and of
installed Debian packages, then (unless turned off) everything they need to execute."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IpeBpfError
from . import dpkg
from .elf import Closure, closure, read_elf
from .ldso import LibrarySearch

EXECUTABLE_ELF = ("ET_EXEC", "ET_DYN")


def executable_like(path: str) -> bool:
    """Worth a rule: an ELF program or shared object, or a file with an execute bit (scripts)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if st.st_mode & 0o111:
        return True
    facts = read_elf(Path(path))
    return facts is not None and facts.kind in EXECUTABLE_ELF


def _walk(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        found += [os.path.join(root, name) for name in sorted(files)]
    return found


@dataclass
class Selection:
    """The files to allow (real path -> why) and what could not be followed."""

    files: dict[str, str] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)
    dlopen: list[str] = field(default_factory=list)


def select(paths: list[str], packages: list[str], with_closure: bool = True,
           search: LibrarySearch | None = None, admindir: Path = dpkg.ADMINDIR) -> Selection:
    """Named files always count; directories and packages contribute their executable files."""
    wanted: dict[str, str] = {}
    for path in paths:
        if os.path.isdir(path):
            wanted.update((p, f"in {path}") for p in _walk(path) if executable_like(p))
        elif os.path.isfile(path):
            wanted[path] = "requested"
        else:
            raise IpeBpfError("ENOENT", "no such file or directory", path=path)
    for spec in packages:
        wanted.update((p, f"package {spec}") for p in dpkg.package_files(spec, admindir) if executable_like(p))
    if not with_closure:
        files: dict[str, str] = {}
        for path, why in wanted.items():
            files.setdefault(os.path.realpath(path), why)
        return Selection(files)
    found: Closure = closure(sorted(wanted), search)
    for path, why in wanted.items():  # say why a named file is there, not "requested"
        real = os.path.realpath(path)
        if found.files.get(real) == "requested":
            found.files[real] = why
    return Selection(found.files, found.unresolved, found.dlopen)
