"""load twice, unload restores, unload twice (runs last: it unloads the program)."""

from __future__ import annotations

import json
import subprocess

import pytest

from ipe_bpf.errors import KernelError
from ipe_bpf.kernel import loader, pins

from .kernel_fixtures import Kernel, get_kernel, ipe, kernel, policy  # noqa: F401

EACCES = 13


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["python3", "-m", "ipe_bpf", *args], capture_output=True, text=True)


def test_loading_twice_is_refused_without_touching_the_loaded_program(kernel: Kernel) -> None:
    r = _cli("load")
    assert r.returncode == 1 and r.stderr.startswith("EEXIST:") and len(r.stderr.strip().splitlines()) == 1
    assert pins.is_loaded()


def test_unload_restores_and_second_unload_is_an_error(ipe: Kernel) -> None:
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"))
    assert ipe.exec_status(ipe.bad) == EACCES
    assert sorted(loader.attached_link_ids()) == sorted(pins.HOOKS)
    waited = loader.unload()
    assert waited < 10
    assert not pins.is_loaded()
    assert ipe.exec_status(ipe.bad) == 0
    with pytest.raises(KernelError) as e:
        loader.unload()
    assert e.value.errno_name == "ENOENT"
    r = _cli("unload")
    assert r.returncode == 1 and r.stderr.startswith("ENOENT:")
    assert json.loads(_cli("status", "--json").stdout) == {"loaded": False}
