"""KMODULE: kernel_read_file (finit_module) and kernel_load_data (init_module) (real kernel)."""

from __future__ import annotations

import lzma
import os
import platform
from pathlib import Path

import pytest

from .kernel_fixtures import FSV, SCRATCH, Kernel, get_kernel, ipe, kernel, policy, sh, verity_copy  # noqa: F401

EACCES = 13
MODULE_INIT_COMPRESSED_FILE = 4
CANDIDATES = ("dummy", "crc-itu-t", "crc7", "crc8", "ts_kmp", "ts_bm", "ts_fsm")


def _loaded(name: str) -> bool:
    return any(line.split()[0] == name.replace("-", "_") for line in Path("/proc/modules").read_text().splitlines())


def _module() -> tuple[str, Path]:
    """A harmless module with no dependencies that is not loaded now."""
    for name in CANDIDATES:
        r = sh("modinfo", "-n", name, check=False)
        path = Path(r.stdout.strip())
        if r.returncode != 0 or not path.exists() or _loaded(name):
            continue
        if sh("modinfo", "-F", "depends", name).stdout.strip():
            continue
        return name, path
    pytest.fail(f"none of {CANDIDATES} is available in /lib/modules/{platform.release()}")


def _flags(path: Path) -> str:
    return str(MODULE_INIT_COMPRESSED_FILE if path.suffix in (".xz", ".zst", ".gz") else 0)


def _raw(path: Path) -> Path:
    out = SCRATCH / (path.name.split(".ko")[0] + ".ko")
    data = path.read_bytes()
    out.write_bytes(lzma.decompress(data) if path.suffix == ".xz" else data)
    return out


def _unload(k: Kernel, name: str) -> None:
    if _loaded(name):
        assert k.run("delmod", name.replace("-", "_")) == 0


def test_module_from_file_and_from_memory(ipe: Kernel) -> None:
    name, path = _module()
    copy = FSV / path.name
    digest = verity_copy(path, copy)
    raw = _raw(path)
    ipe.activate(policy(
        f"op=KMODULE fsverity_digest={digest} action=ALLOW",
        extra_defaults="DEFAULT op=KMODULE action=DENY",
    ))
    try:
        assert ipe.run("finit", path, _flags(path)) == EACCES  # not fs-verity: op default
        assert not _loaded(name)
        assert ipe.run("init", raw) == EACCES  # from memory: no file, no property holds
        assert not _loaded(name)
        assert ipe.run("finit", copy, _flags(copy)) == 0
        assert _loaded(name)
    finally:
        _unload(ipe, name)
    recs = [r for r in ipe.drain() if r.op == "KMODULE"]
    hooks = {(r.hook, r.action, r.path is None) for r in recs}
    assert ("KERNEL_READ", "DENY", False) in hooks
    assert ("KERNEL_LOAD", "DENY", True) in hooks


def test_module_from_memory_allowed_without_kmodule_rules(ipe: Kernel) -> None:
    name, path = _module()
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"))
    try:
        assert ipe.run("init", _raw(path)) == 0
        assert _loaded(name)
    finally:
        _unload(ipe, name)
