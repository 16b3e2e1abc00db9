"""The files a program needs to execute: its interpreter and libraries, found statically.

For an ELF file (pyelftools): PT_INTERP, and each DT_NEEDED library resolved as ld.so does
(see ldso.py), recursively, breadth first like the loader (the object that first needs a
library is its loader, whose DT_RPATH chain applies).  For a `#!` script: its interpreter
(and the program `env` is asked to run).  What ld.so does at run time on request (dlopen)
cannot be known from the files: an object that imports dlopen is reported.
"""

from __future__ import annotations

import mmap
import os
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.hash import GNUHashTable
from elftools.elf.sections import Symbol

from .ldso import Abi, LibrarySearch, expand_tokens, read_abi

DLOPEN_SYMBOLS = frozenset({"dlopen", "dlmopen"})
SCRIPT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SHEBANG_MAX = 256  # BINPRM_BUF_SIZE: the kernel reads no further


@dataclass(frozen=True)
class ElfFacts:
    """What ld.so reads from one ELF file."""

    abi: Abi
    kind: str  # ET_EXEC, ET_DYN, ET_REL, ...
    interp: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]
    calls_dlopen: bool


def _split_path_list(value: str) -> tuple[str, ...]:
    return tuple(part for part in value.split(":") if part)


def read_elf(path: Path) -> ElfFacts | None:
    """The loader-relevant facts of an ELF file; None if it is not ELF (or unreadable as such)."""
    abi = read_abi(path)
    if abi is None:
        return None
    try:
        with open(path, "rb") as stream:
            elf = ELFFile(stream)
            interp, needed, rpath, runpath, dlopen = None, [], (), (), False
            for segment in elf.iter_segments():
                if segment["p_type"] == "PT_INTERP":
                    interp = segment.get_interp_name()
                elif isinstance(segment, DynamicSegment):
                    for tag in segment.iter_tags():
                        if tag.entry.d_tag == "DT_NEEDED":
                            needed.append(tag.needed)
                        elif tag.entry.d_tag == "DT_RPATH":
                            rpath = _split_path_list(tag.rpath)
                        elif tag.entry.d_tag == "DT_RUNPATH":
                            runpath = _split_path_list(tag.runpath)
                    dlopen = _imports_dlopen(stream, segment)
            return ElfFacts(abi, elf["e_type"], interp, tuple(needed), rpath, runpath, dlopen)
    except (ELFError, OSError, ValueError, KeyError, AssertionError):
        return None


def _undefined_symbols(segment: DynamicSegment) -> Iterator[Symbol]:
    """The dynamic symbols an object imports: with a GNU hash table, those below its symoffset
    (the table holds only defined symbols and the linker puts the others first)."""
    _, gnu_hash = segment.get_table_offset("DT_GNU_HASH")
    if gnu_hash is None:
        yield from (sym for sym in segment.iter_symbols() if sym["st_shndx"] == "SHN_UNDEF")
        return
    for index in range(GNUHashTable(segment.elffile, gnu_hash, segment).params["symoffset"]):
        sym = segment.get_symbol(index)
        if sym["st_shndx"] == "SHN_UNDEF":
            yield sym


def _imports_dlopen(stream: BinaryIO, segment: DynamicSegment) -> bool:
    with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if all(data.find(name.encode() + b"\0") < 0 for name in DLOPEN_SYMBOLS):
            return False  # cheap: the name is not even in the file
    return any(sym.name in DLOPEN_SYMBOLS for sym in _undefined_symbols(segment))


def read_shebang(path: Path) -> tuple[str, str | None] | None:
    """(interpreter, optional argument) of a `#!` script, split the way the kernel does."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SHEBANG_MAX)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].strip(b" \t")
    if not line:
        return None
    interp, _, arg = line.replace(b"\t", b" ").partition(b" ")
    arg = arg.strip(b" ")
    return os.fsdecode(interp), (os.fsdecode(arg) if arg else None)


def _env_program(arg: str | None) -> str | None:
    """The program `#!/usr/bin/env [-S] prog ...` runs."""
    if arg is None:
        return None
    words = [w for w in arg.split() if w != "-S" and not (w.startswith("-") or "=" in w)]
    return words[0] if words else None


@dataclass
class Closure:
    """The files found, why each was added, and what could not be decided statically."""

    files: dict[str, str] = field(default_factory=dict)  # real path -> how it was found
    unresolved: list[str] = field(default_factory=list)
    dlopen: list[str] = field(default_factory=list)  # real paths of objects that import dlopen


class ClosureWalker:
    def __init__(self, search: LibrarySearch | None = None, script_path: str = SCRIPT_PATH) -> None:
        self.search = search or LibrarySearch()
        self.script_path = script_path
        self.closure = Closure()
        self._facts: dict[str, ElfFacts | None] = {}
        self._done: set[str] = set()

    def facts(self, path: str) -> ElfFacts | None:
        if path not in self._facts:
            self._facts[path] = read_elf(Path(path))
        return self._facts[path]

    def _add(self, path: str, why: str) -> str | None:
        """Record a file (by real path) the first time it is found; its real path if it exists."""
        real = os.path.realpath(path)
        if not os.path.isfile(real):
            self.closure.unresolved.append(f"{path} ({why}): no such file")
            return None
        self.closure.files.setdefault(real, why)
        return real

    def add(self, path: str, why: str = "requested") -> None:
        """Add a file and everything it needs to execute."""
        real = self._add(path, why)
        if real is None or real in self._done:
            return
        self._done.add(real)
        if (facts := self.facts(real)) is not None:
            self._walk_elf(real, facts)
        elif (shebang := read_shebang(Path(real))) is not None:
            self._walk_script(real, *shebang)

    def _walk_script(self, script: str, interp: str, arg: str | None) -> None:
        self.add(interp, f"interpreter of {script}")
        if os.path.basename(interp) == "env" and (program := _env_program(arg)) is not None:
            found = program if "/" in program else shutil.which(program, path=self.script_path)
            if found is None:
                self.closure.unresolved.append(f"{program} (run by {script} through env): not in {self.script_path}")
            else:
                self.add(found, f"run by {script} through env (found in PATH {self.script_path})")

    def _walk_elf(self, root: str, facts: ElfFacts) -> None:
        """Breadth first from one object, as ld.so loads its dependencies."""
        if facts.interp:
            self.add(facts.interp, f"interpreter of {root}")
        loader_of: dict[str, str | None] = {root: None}
        origin_of = {root: os.path.dirname(root)}
        queue = deque([root])
        while queue:
            obj = queue.popleft()
            obj_facts = self.facts(obj)
            if obj_facts is None:
                continue
            if obj_facts.calls_dlopen and (real_obj := os.path.realpath(obj)) not in self.closure.dlopen:
                self.closure.dlopen.append(real_obj)
            for name in obj_facts.needed:
                found = self.search.find(name, facts.abi, self._rpaths(obj, loader_of, origin_of),
                                         self._expand(obj, obj_facts.runpath, origin_of))
                needer = os.path.realpath(obj)
                if not found:
                    self.closure.unresolved.append(f"{name} (needed by {needer}): not found")
                    continue
                for path in found:
                    real = self._add(path, f"needed by {needer}")
                    if real is not None and path not in loader_of:
                        loader_of[path] = obj
                        origin_of[path] = os.path.dirname(path)
                        queue.append(path)
                        self._done.add(real)

    def _expand(self, obj: str, entries: tuple[str, ...], origin_of: dict[str, str]) -> tuple[str, ...]:
        facts = self.facts(obj)
        abi = facts.abi if facts else Abi(0, 0)
        return tuple(expand_tokens(e, origin_of[obj], abi) for e in entries)

    def _rpaths(self, obj: str, loader_of: dict[str, str | None], origin_of: dict[str, str]) -> list[tuple[str, ...]]:
        """DT_RPATH lists of obj and its loaders up to the executable (none if obj has DT_RUNPATH)."""
        facts = self.facts(obj)
        if facts is None or facts.runpath:
            return []
        chain: list[tuple[str, ...]] = []
        current: str | None = obj
        while current is not None:
            current_facts = self.facts(current)
            if current_facts is not None and current_facts.rpath and not current_facts.runpath:
                chain.append(self._expand(current, current_facts.rpath, origin_of))
            current = loader_of.get(current)
        return chain


def closure(paths: list[str], search: LibrarySearch | None = None) -> Closure:
    """Every file the given files need to execute, themselves included."""
    walker = ClosureWalker(search)
    for path in paths:
        walker.add(path)
    return walker.closure
