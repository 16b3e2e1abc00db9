"""The committed CO-RE object is the build of its source, and carries what the loader expects.

scripts/build-bpf needs clang-19, llvm-19 and libbpf-dev (scripts/dev installs them): without
them these tests fail.  Byte equality is a property of one toolchain (bpf/TOOLCHAIN, Debian
12's, which CI has): on another, the byte comparison is reported as skipped with the two
toolchains named, and the rest still runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from ipe_bpf.bpf_files import OBJECT, bpf_file
from ipe_bpf.kernel.pins import HOOKS, MAP_NAMES

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "scripts" / "build-bpf"


def _build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BUILD), *args], capture_output=True, text=True, cwd=ROOT)


def _same_toolchain() -> None:
    here = _build("--toolchain")
    assert here.returncode == 0, here.stderr
    recorded = (ROOT / "bpf" / "TOOLCHAIN").read_text()
    if here.stdout != recorded:
        pytest.skip(f"byte equality needs the recorded toolchain ({recorded.strip()}); "
                    f"this machine has {here.stdout.strip()}")


def test_committed_object_is_the_build_of_its_source() -> None:
    _same_toolchain()
    proc = _build("--check")
    assert proc.returncode == 0, proc.stderr


def test_rebuilds_are_byte_identical(tmp_path: Path) -> None:
    first, second = tmp_path / "a.o", tmp_path / "b.o"
    for out in (first, second):
        proc = _build("--output", str(out))
        assert proc.returncode == 0, proc.stderr
    assert first.read_bytes() == second.read_bytes()


def test_check_fails_when_the_object_drifts(tmp_path: Path) -> None:
    """--check compares with the committed object: a different object must fail it."""
    _same_toolchain()
    obj = bpf_file(OBJECT)
    saved = obj.read_bytes()
    try:
        obj.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        proc = _build("--check")
    finally:
        obj.write_bytes(saved)
    assert proc.returncode == 1
    assert "differs from a rebuild" in proc.stderr


def _elf() -> ELFFile:
    return ELFFile(bpf_file(OBJECT).open("rb"))


def test_object_has_one_lsm_program_per_hook() -> None:
    sections = {s.name for s in _elf().iter_sections()}
    assert {f"lsm/{hook}" for hook in HOOKS} <= sections


def test_object_defines_every_pinned_map_and_carries_btf() -> None:
    elf = _elf()
    symbols = elf.get_section_by_name(".symtab")
    maps = elf.get_section_by_name(".maps")
    assert symbols is not None and maps is not None
    maps_index = next(i for i, s in enumerate(elf.iter_sections()) if s.name == ".maps")
    in_maps = {sym.name for sym in symbols.iter_symbols() if sym["st_shndx"] == maps_index}
    assert set(MAP_NAMES) <= in_maps
    assert elf.get_section_by_name(".BTF") is not None
    assert elf.get_section_by_name(".BTF.ext") is not None  # the CO-RE relocations
    assert not any(s.name.startswith(".debug") for s in elf.iter_sections())  # DWARF stripped
