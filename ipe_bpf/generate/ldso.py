"""Where the dynamic loader (glibc's ld.so) finds a DT_NEEDED library, decided statically.

The order is ld.so's (`ld.so --help` lists it): the DT_RPATH of the object that needs the
library and of each object that loaded it, up to the executable (unless the object has a
DT_RUNPATH); then the object's DT_RUNPATH; then /etc/ld.so.cache; then the system
directories (multiarch first).  The /etc/ld.so.conf directories count through the cache
(ldconfig writes them into it), or directly when there is no cache.  LD_LIBRARY_PATH and LD_PRELOAD belong to the environment of
a run, not to the files, and are not followed.  Libraries the cache or a search directory
offers for other hardware capabilities (glibc-hwcaps/*) are all returned, so that a policy
works on any CPU.
"""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

LD_SO_CONF = Path("/etc/ld.so.conf")
LD_SO_CACHE = Path("/etc/ld.so.cache")
_CACHE_MAGIC = b"glibc-ld.so.cache1.1"
_CACHE_HEADER = struct.Struct("<20sIIB3xI12x")  # magic+version, nlibs, len_strings, flags, ext
_CACHE_ENTRY = struct.Struct("<iIIIQ")  # flags, key, value, osversion, hwcap

# e_machine -> the multiarch triplet of Debian's library directories
MULTIARCH = {
    3: "i386-linux-gnu",
    40: "arm-linux-gnueabihf",
    62: "x86_64-linux-gnu",
    183: "aarch64-linux-gnu",
    243: "riscv64-linux-gnu",
    21: "powerpc64le-linux-gnu",
    22: "s390x-linux-gnu",
}
ELFCLASS64 = 2


@dataclass(frozen=True)
class Abi:
    """What makes a library loadable by an object: ELF class (1: 32-bit, 2: 64-bit) and machine."""

    elfclass: int
    machine: int


def read_abi(path: Path) -> Abi | None:
    """The ELF class and machine of a file, None if it is not a readable ELF file."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[4] not in (1, 2):
        return None
    order = "<" if head[5] == 1 else ">"
    return Abi(head[4], struct.unpack(order + "H", head[18:20])[0])


def _conf_lines(path: Path, seen: set[Path]) -> list[str]:
    """Directories named by an ld.so.conf file and the files it includes (glob patterns)."""
    if path in seen:
        return []
    seen.add(path)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    dirs: list[str] = []
    for line in lines:
        words = line.split("#", 1)[0].split()
        if not words or words[0] == "hwcap":
            continue
        if words[0] == "include":
            for pattern in words[1:]:
                full = pattern if pattern.startswith("/") else str(path.parent / pattern)
                for inc in sorted(glob.glob(full)):
                    dirs += _conf_lines(Path(inc), seen)
            continue
        dirs += [w.split("=", 1)[0] for w in words]
    return dirs


def conf_directories(conf: Path = LD_SO_CONF) -> tuple[str, ...]:
    return tuple(dict.fromkeys(d.rstrip("/") or "/" for d in _conf_lines(conf, set())))


def read_cache(cache: Path = LD_SO_CACHE) -> dict[str, tuple[tuple[str, int], ...]]:
    """{soname: ((path, hwcap), ...)} from glibc's ld.so.cache (new format), in cache order."""
    try:
        data = cache.read_bytes()
    except OSError:
        return {}
    base = data.find(_CACHE_MAGIC)
    if base < 0 or len(data) < base + _CACHE_HEADER.size:
        return {}
    _, nlibs, _, _, _ = _CACHE_HEADER.unpack_from(data, base)
    out: dict[str, list[tuple[str, int]]] = {}

    def string(offset: int) -> str:
        start = base + offset
        end = data.find(b"\0", start)
        return data[start:end].decode("utf-8", "surrogateescape")

    for i in range(nlibs):
        at = base + _CACHE_HEADER.size + i * _CACHE_ENTRY.size
        if at + _CACHE_ENTRY.size > len(data):
            break
        _, key, value, _, hwcap = _CACHE_ENTRY.unpack_from(data, at)
        out.setdefault(string(key), []).append((string(value), hwcap))
    return {name: tuple(entries) for name, entries in out.items()}


def system_directories(abi: Abi) -> tuple[str, ...]:
    triplet = MULTIARCH.get(abi.machine)
    multiarch = (f"/lib/{triplet}", f"/usr/lib/{triplet}") if triplet else ()
    lib64 = ("/lib64", "/usr/lib64") if abi.elfclass == ELFCLASS64 else ()
    return (*multiarch, *lib64, "/lib", "/usr/lib")


def expand_tokens(entry: str, origin: str, abi: Abi) -> str:
    """$ORIGIN, $LIB and $PLATFORM (also as ${...}) the way ld.so expands them."""
    triplet = MULTIARCH.get(abi.machine, "")
    values = {"ORIGIN": origin, "LIB": f"lib/{triplet}" if triplet else "lib",
              "PLATFORM": triplet.split("-", 1)[0]}
    for name, value in values.items():
        entry = entry.replace("${" + name + "}", value).replace("$" + name, value)
    return entry


@dataclass
class LibrarySearch:
    """The loader's search configuration on this machine, read once."""

    conf: Path = LD_SO_CONF
    cache: Path = LD_SO_CACHE
    _cache: dict[str, tuple[tuple[str, int], ...]] | None = field(default=None, repr=False)
    _abis: dict[str, Abi | None] = field(default_factory=dict, repr=False)

    def cache_entries(self, name: str) -> tuple[tuple[str, int], ...]:
        if self._cache is None:
            self._cache = read_cache(self.cache)
        return self._cache.get(name, ())

    def loadable(self, path: str, abi: Abi) -> bool:
        if path not in self._abis:
            self._abis[path] = read_abi(Path(path)) if os.path.isfile(path) else None
        return self._abis[path] == abi

    def _in_directory(self, directory: str, name: str, abi: Abi) -> list[str]:
        variants = glob.glob(os.path.join(glob.escape(directory), "glibc-hwcaps", "*", glob.escape(name)))
        return [p for p in (os.path.join(directory, name), *sorted(variants)) if self.loadable(p, abi)]

    def find(self, name: str, abi: Abi, rpaths: list[tuple[str, ...]], runpath: tuple[str, ...]) -> list[str]:
        """Every file ld.so may map for DT_NEEDED `name`, first the one it maps on a baseline CPU.

        `rpaths`: the expanded DT_RPATH lists to search in order (already empty when the
        object has a DT_RUNPATH); `runpath`: the object's expanded DT_RUNPATH.
        """
        if "/" in name:
            return [name] if self.loadable(name, abi) else []
        for directories in (*rpaths, runpath):
            for directory in directories:
                if found := self._in_directory(directory, name, abi):
                    return found
        entries = sorted(self.cache_entries(name), key=lambda entry: entry[1] != 0)  # baseline first
        if cached := [path for path, _ in entries if self.loadable(path, abi)]:
            return list(dict.fromkeys(cached))
        # ld.so reads the ld.so.conf directories only through the cache ldconfig makes of them
        uncached = () if self.cache.exists() else conf_directories(self.conf)
        for directory in (*uncached, *system_directories(abi)):
            if found := self._in_directory(directory, name, abi):
                return found
        return []
