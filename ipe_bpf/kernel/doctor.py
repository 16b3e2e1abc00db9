"""What this machine has and lacks for enforcement (`ipe-bpf doctor`).

Each check is cheap and side-effect free; `require_loadable()` turns the fatal ones into
a KernelError before the (slow) BCC compile starts.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import KernelError
from . import btf as btf_mod
from .pins import BPFFS

LSM_LIST = Path("/sys/kernel/security/lsm")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fatal: bool  # enforcement cannot work without it

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _active_lsms() -> list[str] | None:
    try:
        return LSM_LIST.read_text().strip().split(",")
    except OSError:
        return None


def check_bpf_lsm() -> Check:
    lsms = _active_lsms()
    if lsms is None:
        return Check("bpf-lsm", False, f"{LSM_LIST} unreadable (securityfs not mounted?)", True)
    if "bpf" not in lsms:
        return Check("bpf-lsm", False, f"'bpf' not in active LSMs ({','.join(lsms)}); boot with lsm=...,bpf", True)
    return Check("bpf-lsm", True, ",".join(lsms), True)


def check_btf() -> Check:
    path = btf_mod.VMLINUX_BTF
    if not path.exists():
        return Check("btf", False, f"{path} missing (CONFIG_DEBUG_INFO_BTF)", True)
    return Check("btf", True, str(path), True)


def check_fsverity_btf() -> Check:
    if not btf_mod.VMLINUX_BTF.exists():
        return Check("fsverity-offsets", False, "no kernel BTF", False)
    try:
        found = btf_mod.fsverity_offsets()
    except KernelError as exc:
        return Check("fsverity-offsets", False, exc.message, False)
    if found.missing is not None:
        return Check("fsverity-offsets", False, f"{found.missing}: fsverity_digest rules can never match", False)
    return Check("fsverity-offsets", True, " ".join(f"{k}={v}" for k, v in sorted(found.values.items())), False)


def check_headers() -> Check:
    build = Path("/lib/modules") / platform.release() / "build"
    if not (build / "include").exists() and not (build / "Makefile").exists():
        return Check("kernel-headers", False, f"{build} missing (install linux-headers-{platform.release()})", True)
    return Check("kernel-headers", True, str(build.resolve()), True)


def check_bpffs() -> Check:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        mounts = []
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and parts[1] == str(BPFFS) and parts[2] == "bpf":
            return Check("bpffs", True, str(BPFFS), True)
    return Check("bpffs", False, f"no bpf filesystem on {BPFFS} (mount -t bpf bpf {BPFFS})", True)


def check_bcc() -> Check:
    if importlib.util.find_spec("bcc") is None:
        return Check("bcc", False, "python3 module bcc missing (install python3-bpfcc)", True)
    return Check("bcc", True, "python3-bpfcc", True)


def check_root() -> Check:
    if os.geteuid() != 0:
        return Check("root", False, "not running as root (needs CAP_SYS_ADMIN and CAP_BPF)", True)
    return Check("root", True, "uid 0", True)


def run_checks() -> list[Check]:
    return [check_root(), check_bpf_lsm(), check_btf(), check_bpffs(), check_headers(), check_bcc(), check_fsverity_btf()]


def require_loadable() -> None:
    """Raise a one-line KernelError for the first fatal problem."""
    for check in (check_root(), check_bpf_lsm(), check_btf(), check_bpffs(), check_headers(), check_bcc()):
        if not check.ok:
            errno_name = {"root": "EPERM", "bcc": "ENOPKG", "kernel-headers": "ENOPKG"}.get(check.name, "EOPNOTSUPP")
            raise KernelError(errno_name, f"{check.name}: {check.detail}")
