"""`ipe-bpf vm setup`: what is missing, and what happens where apt cannot help."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ipe_bpf.errors import VmError
from ipe_bpf.vm import host, setup


def test_missing_programs_map_to_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    present = {"tar", "cpio"}
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in present else None)
    monkeypatch.setattr(host, "KEYRING", tmp_path / "no-keyring.gpg")
    plan = setup.plan_setup()
    assert not plan.complete
    assert {"qemu-system-x86", "mmdebstrap", "e2fsprogs", "dpkg", "debian-archive-keyring"} <= set(plan.missing_packages)
    assert "tar" not in plan.missing_packages and "cpio" not in plan.missing_packages
    assert "qemu-system-x86_64" in plan.missing_commands


def test_not_debian_says_exactly_what_is_missing() -> None:
    plan = setup.SetupPlan(("qemu-system-x86",), ("qemu-system-x86_64",), has_apt=False, is_root=True)
    with pytest.raises(VmError) as caught:
        setup.apply_setup(plan)
    assert caught.value.errno_name == "ENOTSUP"
    assert "qemu-system-x86_64" in caught.value.message and "keyring" in caught.value.message


def test_not_root() -> None:
    plan = setup.SetupPlan(("mmdebstrap",), ("mmdebstrap",), has_apt=True, is_root=False)
    with pytest.raises(VmError) as caught:
        setup.apply_setup(plan)
    assert caught.value.errno_name == "EPERM" and "mmdebstrap" in caught.value.message


def test_nothing_to_do() -> None:
    setup.apply_setup(setup.SetupPlan((), (), has_apt=False, is_root=False))


def test_missing_ovmf_is_installed_by_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ipe_bpf.vm import uefi

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    (tmp_path / "keyring.gpg").write_bytes(b"")
    monkeypatch.setattr(host, "KEYRING", tmp_path / "keyring.gpg")
    monkeypatch.setattr(uefi, "OVMF_CODE", tmp_path / "none.fd")
    plan = setup.plan_setup()
    assert plan.missing_packages == ("ovmf",)
