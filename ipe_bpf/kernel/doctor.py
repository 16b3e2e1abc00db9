"""What this machine has and lacks for enforcement (`ipe-bpf doctor`).

Fatal checks (no enforcement without them) come first; then which loader `load` will use,
and, from the kernel's BTF (features.probe), which hooks exist and, per policy property and
per op, whether this kernel can evaluate it and how.  `require_loadable()` turns the fatal
ones into a KernelError before anything is loaded.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from ..bpf_files import OBJECT, bpf_file
from ..errors import IpeBpfError, KernelError
from .pins import BPFFS

if TYPE_CHECKING:
    from ..policy.model import Policy

LSM_LIST = Path("/sys/kernel/security/lsm")
LOADERS = ("core", "bcc")
LOADER_ENV = "IPE_BPF_LOADER"
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

# Ops and the hooks that decide them (IPE's mapping).
OP_HOOKS = {
    "EXECUTE": ("bprm_check_security", "mmap_file", "file_mprotect"),
    "FIRMWARE": ("kernel_read_file", "kernel_load_data"),
    "KMODULE": ("kernel_read_file", "kernel_load_data"),
    "KEXEC_IMAGE": ("kernel_read_file", "kernel_load_data"),
    "KEXEC_INITRAMFS": ("kernel_read_file", "kernel_load_data"),
    "POLICY": ("kernel_read_file", "kernel_load_data"),
    "X509_CERT": ("kernel_read_file", "kernel_load_data"),
}


def default_loader(environ: dict[str, str] | None = None) -> str:
    """The loader `load` uses: $IPE_BPF_LOADER, else core."""
    env = os.environ if environ is None else environ
    name = env.get(LOADER_ENV) or "core"
    if name not in LOADERS:
        raise KernelError("EINVAL", f"{LOADER_ENV}={name!r}: expected one of {', '.join(LOADERS)}")
    return name


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


def check_root() -> Check:
    if os.geteuid() != 0:
        return Check("root", False, "not running as root: run ipe-bpf as root (it needs CAP_SYS_ADMIN "
                     "and CAP_BPF)", True)
    return Check("root", True, "uid 0", True)


def check_bpf_lsm() -> Check:
    lsms = _active_lsms()
    if lsms is None:
        return Check("bpf-lsm", False, f"{LSM_LIST} unreadable (securityfs not mounted, or not root?)", True)
    if "bpf" not in lsms:
        return Check("bpf-lsm", False, f"'bpf' not in active LSMs ({','.join(lsms)}); boot with lsm=...,bpf", True)
    return Check("bpf-lsm", True, ",".join(lsms), True)


def check_btf() -> Check:
    if not VMLINUX_BTF.exists():
        return Check("btf", False, f"{VMLINUX_BTF} missing (CONFIG_DEBUG_INFO_BTF)", True)
    return Check("btf", True, str(VMLINUX_BTF), True)


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


def check_core_loader() -> Check:
    obj = bpf_file(OBJECT)
    if not obj.is_file():
        return Check("loader", False, f"{obj} missing (reinstall ipe-bpf, or run scripts/build-bpf)", True)
    try:
        from . import libbpf

        libbpf.lib()
    except KernelError as err:
        return Check("loader", False, err.message, True)
    return Check("loader", True, f"core: {obj.name} through the distribution's libbpf.so.1", True)


def check_bcc_loader() -> Check:
    build = Path("/lib/modules") / platform.release() / "build"
    if importlib.util.find_spec("bcc") is None:
        return Check("loader", False, "bcc: python3 module bcc missing (install python3-bpfcc)", True)
    if not (build / "include").exists() and not (build / "Makefile").exists():
        return Check("loader", False, f"bcc: {build} missing (install linux-headers-{platform.release()})", True)
    return Check("loader", True, f"bcc: python3-bpfcc with the headers in {build.resolve()}", True)


def _loader_check(loader: str) -> Check:
    return check_bcc_loader() if loader == "bcc" else check_core_loader()


def kernel_checks() -> list[Check]:
    """Hooks, properties and ops, from the running kernel's BTF (not fatal: reported)."""
    from . import features

    try:
        if os.geteuid() == 0:
            features.load_modules()
        found = features.probe()
    except KernelError as err:
        return [Check("kernel", False, err.message, True)]
    checks = [Check("hooks", not found.missing_hooks,
                    "all present" if not found.missing_hooks else
                    f"missing {', '.join(found.missing_hooks)} (what they capture is read another way, or "
                    f"the properties below are unavailable)", False)]
    for prop in found.properties().values():
        checks.append(Check(f"property {prop.property}", prop.supported, prop.detail, False))
    for op, hooks in OP_HOOKS.items():
        have = [h for h in hooks if h in found.hooks]
        detail = "judged at " + ", ".join(have) if have else "no hook"
        if op == "KMODULE":
            detail += ("; compressed modules too" if found.compressed_module_ids
                       else "; (this kernel has no separate compressed-module ids)")
        checks.append(Check(f"op {op}", len(have) == len(hooks), detail, False))
    checks.append(Check("kernel-ipe", "ipe" in (_active_lsms() or []),
                        "kernel IPE is active too" if "ipe" in (_active_lsms() or [])
                        else "kernel IPE not in this kernel (ipe-bpf stands in for it)", False))
    return checks


# ---------------------------------------------------------------- what the seal rests on

LOCKDOWN = Path("/sys/kernel/security/lockdown")
KERNEL_LOADS = {"KMODULE": "kernel module", "KEXEC_IMAGE": "kexec kernel", "KEXEC_INITRAMFS": "kexec initramfs"}


def seal_checks(policy: "Policy | None", lockdown: str | None) -> list[Check]:
    """The seal (docs/seal.md) guards ipe-bpf's own programs, maps and pins; a kernel module
    or a kexec'd kernel can undo anything, so the policy must judge KMODULE and KEXEC (an
    allowlist: their default DENY), and lockdown=integrity must keep root from writing kernel
    memory (/dev/mem, unsigned modules, hibernation images).  `lockdown` is the text of
    /sys/kernel/security/lockdown (None: no lockdown LSM)."""
    from ..policy.model import Action, Op

    checks = []
    for name, what in KERNEL_LOADS.items():
        op = Op[name]
        if policy is None:
            checks.append(Check(f"seal {name}", False, "no active policy: every kernel module and kexec image "
                                "loads; activate a policy that judges them", False))
            continue
        own = policy.op_default(op)
        fallback = own if own is not None else policy.global_default
        ok = fallback == Action.DENY
        detail = (f"judged by the active policy ({len(policy.rules_for(op))} rules, default DENY)" if ok else
                  f"the active policy allows what no rule matches: a root process can load a {what} that undoes "
                  f"the seal; recommended: `DEFAULT op={name} action=DENY` and rules allowing yours "
                  f"(dm-verity, fs-verity, boot_verified)")
        checks.append(Check(f"seal {name}", ok, detail, False))
    mode = None if lockdown is None else next((w.strip("[]") for w in lockdown.split() if w.startswith("[")), None)
    if mode in ("integrity", "confidentiality"):
        checks.append(Check("seal lockdown", True, f"lockdown={mode}", False))
    else:
        checks.append(Check("seal lockdown", False, f"lockdown={mode or 'unavailable'}: root can write kernel memory "
                            f"(/dev/mem, unsigned modules, hibernation); boot with lockdown=integrity", False))
    return checks


def _active_policy() -> "Policy | None":
    from ..policy import signing
    from ..policy.parser import parse_policy
    from .store import PolicyStore

    try:
        store = PolicyStore.default()
        with store.locked(shared=True):
            stored = store.load().active_policy()
            if stored is None:
                return None
            blob = store.blob(stored)
        return parse_policy(signing.extract_content(blob) if stored.signed else blob)
    except (IpeBpfError, OSError):
        return None


def _lockdown() -> str | None:
    try:
        return LOCKDOWN.read_text()
    except OSError:
        return None


def run_checks(loader: str | None = None) -> list[Check]:
    fatal = [check_root(), check_bpf_lsm(), check_btf(), check_bpffs(), _loader_check(loader or default_loader())]
    if not all(c.ok for c in fatal[1:3]):
        return fatal
    return fatal + kernel_checks() + seal_checks(_active_policy(), _lockdown())


_ERRNO = {"root": "EPERM", "loader": "ENOPKG"}


def require_loadable(loader: str) -> None:
    """Raise a one-line KernelError for the first fatal problem."""
    for check in (check_root(), check_bpf_lsm(), check_btf(), check_bpffs(), _loader_check(loader)):
        if not check.ok:
            raise KernelError(_ERRNO.get(check.name, "EOPNOTSUPP"), f"{check.name}: {check.detail}")
