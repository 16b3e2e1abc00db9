"""`ipe-bpf vm setup`: the host programs the VM tooling needs, installed with apt."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmError
from . import host, uefi

# Debian/Ubuntu packages of the host side, beyond what TOOLS lists per program.
EXTRA_PACKAGES = ("debian-archive-keyring", "ca-certificates")


@dataclass(frozen=True)
class SetupPlan:
    missing_packages: tuple[str, ...]
    missing_commands: tuple[str, ...]
    has_apt: bool
    is_root: bool

    @property
    def complete(self) -> bool:
        return not self.missing_packages


def plan_setup() -> SetupPlan:
    """What is missing on this machine (no changes made)."""
    missing_tools = host.missing_tools(host.TOOLS)
    packages = [tool.package for tool in missing_tools]
    if not host.KEYRING.is_file():
        packages.append("debian-archive-keyring")
    if not (uefi.OVMF_CODE.is_file() and uefi.OVMF_VARS.is_file()):
        packages.append(uefi.OVMF_PACKAGE)  # for `vm run --uefi-db`
    unique = tuple(dict.fromkeys(packages))
    return SetupPlan(
        missing_packages=unique,
        missing_commands=tuple(t.command for t in missing_tools),
        has_apt=shutil.which("apt-get") is not None and Path("/etc/debian_version").exists(),
        is_root=os.geteuid() == 0,
    )


def apply_setup(plan: SetupPlan) -> None:
    """Install the missing packages with apt-get (root, Debian/Ubuntu); else explain."""
    if plan.complete:
        return
    names = " ".join(plan.missing_packages)
    if not plan.has_apt:
        raise VmError(
            "ENOTSUP",
            f"not a Debian/Ubuntu machine: install by hand the programs {', '.join(plan.missing_commands) or '-'} "
            f"(Debian package names: {names}) and Debian's archive keyring at {host.KEYRING}",
        )
    if not plan.is_root:
        raise VmError("EPERM", f"missing {names}: run `ipe-bpf vm setup` as root (it runs apt-get install {names})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *plan.missing_packages, *EXTRA_PACKAGES],
    ):
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise VmError("EIO", f"`{' '.join(argv)}` failed with exit status {proc.returncode}: {last}")
    still = plan_setup()
    if not still.complete:
        raise VmError("ENOENT", f"still missing after apt-get: {' '.join(still.missing_packages)}")
