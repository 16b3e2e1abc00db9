"""The static ELF closure equals what ld.so loads, as `ldd` reports it, on this machine's files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ipe_bpf.generate.elf import closure, read_shebang
from ipe_bpf.generate.ldso import Abi, LibrarySearch, conf_directories, expand_tokens, read_cache

# Dynamically linked programs of any Debian system with the project's build tools
# (ldd runs them through ld.so --list, which is what ld.so really maps).
PROGRAMS = ["/usr/bin/python3", "/usr/bin/ls", "/usr/bin/openssl", "/usr/bin/gcc", "/usr/bin/tar",
            "/usr/bin/ssh", "/usr/bin/git", "/usr/bin/qemu-system-x86_64", "/usr/sbin/mke2fs", "/usr/bin/curl"]
LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(\S+) \(0x[0-9a-f]+\)$")
GCC = shutil.which("gcc")


def ldd(path: str) -> set[str]:
    """The real paths of every object ldd says ld.so maps for `path` (the vDSO left out)."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        m = LDD_LINE.match(line)
        assert m, f"unexpected ldd line {line!r}"
        if m.group(2).startswith("/"):
            found.add(os.path.realpath(m.group(2)))
    return found


def present_programs() -> list[str]:
    found = [p for p in PROGRAMS if os.path.exists(p)]
    assert len(found) >= 4, f"too few of {PROGRAMS} on this machine"
    return found


@pytest.mark.parametrize("program", present_programs())
def test_closure_equals_ldd(program: str) -> None:
    got = closure([program])
    assert not got.unresolved
    assert set(got.files) == ldd(program) | {os.path.realpath(program)}


needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is part of the project's build tools")


def _build_origin_tree(tmp_path: Path, new_dtags: bool) -> tuple[Path, Path, Path]:
    """bin/prog --needs--> lib/libfoo.so --needs--> deps/libbar.so.

    prog's runpath is $ORIGIN/../lib:$ORIGIN/../deps; libfoo has none, so libbar is found only
    through prog's DT_RPATH (inherited by what prog loads) and never through a DT_RUNPATH
    (which applies only to the object itself).
    """
    (tmp_path / "src").mkdir()
    for d in ("bin", "lib", "deps"):
        (tmp_path / d).mkdir()
    (tmp_path / "src/bar.c").write_text("int bar(void) { return 7; }\n")
    (tmp_path / "src/foo.c").write_text("int bar(void);\nint foo(void) { return bar() + 1; }\n")
    (tmp_path / "src/prog.c").write_text("int foo(void);\nint main(void) { return foo() == 8 ? 0 : 1; }\n")
    dtags = "--enable-new-dtags" if new_dtags else "--disable-new-dtags"

    def cc(*args: str | Path) -> None:
        subprocess.run([GCC, *map(str, args)], check=True, cwd=tmp_path)

    cc("-shared", "-fPIC", "-o", "deps/libbar.so", "src/bar.c")
    cc("-shared", "-fPIC", "-o", "lib/libfoo.so", "src/foo.c", "-Ldeps", "-lbar")
    cc("-o", "bin/prog", "src/prog.c", "-Llib", "-lfoo", "-Ldeps", "-Wl,--allow-shlib-undefined",
       f"-Wl,{dtags},-rpath,$ORIGIN/../lib:$ORIGIN/../deps")
    return tmp_path / "bin/prog", tmp_path / "lib/libfoo.so", tmp_path / "deps/libbar.so"


@needs_gcc
def test_origin_rpath_is_inherited_like_ld_so(tmp_path: Path) -> None:
    prog, foo, bar = _build_origin_tree(tmp_path, new_dtags=False)
    # -lfoo only: prog does not need libbar itself (the linker drops unused -lbar)
    assert subprocess.run([str(prog)]).returncode == 0
    got = closure([str(prog)])
    assert not got.unresolved
    assert {str(foo), str(bar)} <= set(got.files)
    assert set(got.files) == ldd(str(prog)) | {str(prog)}


@needs_gcc
def test_origin_runpath_is_not_inherited_like_ld_so(tmp_path: Path) -> None:
    prog, foo, bar = _build_origin_tree(tmp_path, new_dtags=True)
    got = closure([str(prog)])
    listed = subprocess.run(["ldd", str(prog)], capture_output=True, text=True).stdout
    assert "libbar.so => not found" in listed  # ld.so: libfoo's own search cannot find it
    assert got.unresolved == [f"libbar.so (needed by {foo}): not found"]
    assert str(bar) not in got.files
    assert str(foo) in got.files


def test_ld_so_cache_lists_libc() -> None:
    entries = read_cache()
    assert any(os.path.realpath(p) == os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6") or p.endswith("/libc.so.6")
               for p, _ in entries.get("libc.so.6", ()))


def test_conf_follows_includes(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d/a.conf").write_text("/opt/a/lib # comment\n")
    (tmp_path / "conf.d/b.conf").write_text("include ../more.conf\n/opt/b/lib\n")
    (tmp_path / "more.conf").write_text("/opt/more\n")
    (tmp_path / "ld.so.conf").write_text("include conf.d/*.conf\n/usr/local/lib\n")
    assert conf_directories(tmp_path / "ld.so.conf") == ("/opt/a/lib", "/opt/more", "/opt/b/lib", "/usr/local/lib")


def test_tokens_expand() -> None:
    abi = Abi(2, 62)
    assert expand_tokens("$ORIGIN/../${LIB}/$PLATFORM", "/opt/x/bin", abi) == "/opt/x/bin/../lib/x86_64-linux-gnu/x86_64"


def test_script_brings_its_interpreter(tmp_path: Path) -> None:
    script = tmp_path / "s"
    script.write_text("#!/bin/sh -e\necho hi\n")
    other = tmp_path / "t"
    other.write_text("#!/usr/bin/env python3\n")
    assert read_shebang(script) == ("/bin/sh", "-e")
    got = closure([str(script), str(other)])
    assert os.path.realpath("/bin/sh") in got.files
    assert os.path.realpath("/usr/bin/env") in got.files
    assert os.path.realpath(shutil.which("python3", path="/usr/bin")) in got.files


def test_dlopen_importers_are_reported() -> None:
    got = closure(["/usr/bin/python3"])
    assert os.path.realpath("/usr/bin/python3") in got.dlopen
    libc = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")
    assert libc in got.files and libc not in got.dlopen  # libc defines dlopen, it does not import it


def test_without_a_cache_the_system_directories_are_searched(tmp_path: Path) -> None:
    search = LibrarySearch(conf=tmp_path / "none.conf", cache=tmp_path / "none.cache")
    got = closure(["/usr/bin/ls"], search)  # without the cache, the system directories still find libc
    assert not got.unresolved
    assert os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6") in got.files
