"""What the running kernel offers ipe-bpf, probed from its BTF (never from its version).

The probe asks libbpf (btf__load_vmlinux_btf, btf__load_module_btf) the same questions the
CO-RE object asks itself at load time (bpf/libbpf_compat.h's IPE_HAVE_*): which LSM hooks
exist, whether struct inode still has i_verity_info or the bpf_get_fsverity_digest kfunc
is there, overlayfs' layout, device-mapper's and dm-verity's structs.  From those facts it
derives, per policy property, whether this kernel can evaluate it and how; `doctor`,
`status` and the deploy-time check use that table.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

from ..errors import KernelError
from ..policy.model import BoolProperty, FileAttributes, Policy, Rule, property_keys
from . import libbpf
from .pins import HOOKS, LOADED_STATE

BTF_KIND_STRUCT, BTF_KIND_ENUM, BTF_KIND_FUNC, BTF_KIND_ENUM64 = 4, 6, 12, 19

DECISION_HOOKS = HOOKS[:5]  # without these there is no enforcement at all
# Hooks that only serve another one: file_open and file_ioctl note which fs-verity files'
# signature checks happen while loaded, which matters only where inode_setintegrity reports them.
SERVES = {"file_open": "inode_setintegrity", "file_ioctl": "inode_setintegrity"}
MODULES = ("overlay", "dm_mod", "dm_verity")  # their BTF must be there before a CO-RE load


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _Btf:
    """One BTF object (vmlinux or a module's split BTF) asked through libbpf."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def _find(self, name: str, kind: int) -> int:
        return int(libbpf.lib().btf__find_by_name_kind(self.handle, name.encode(), kind))

    def has_func(self, name: str) -> bool:
        return self._find(name, BTF_KIND_FUNC) > 0

    def _items(self, type_id: int, item_size: int) -> list[str]:
        lib = libbpf.lib()
        ptr = lib.btf__type_by_id(self.handle, type_id)
        t = _BtfType.from_address(ptr)
        vlen = t.info & 0xFFFF
        names = []
        for i in range(vlen):
            name_off = ctypes.c_uint32.from_address(ptr + ctypes.sizeof(_BtfType) + i * item_size).value
            names.append((lib.btf__name_by_offset(self.handle, name_off) or b"").decode())
        return names

    def members(self, struct: str) -> frozenset[str]:
        type_id = self._find(struct, BTF_KIND_STRUCT)
        return frozenset(self._items(type_id, 12)) if type_id > 0 else frozenset()

    def enum_values(self, enum: str) -> frozenset[str]:
        for kind, size in ((BTF_KIND_ENUM, 8), (BTF_KIND_ENUM64, 12)):
            type_id = self._find(enum, kind)
            if type_id > 0:
                return frozenset(self._items(type_id, size))
        return frozenset()


@dataclass(frozen=True)
class PropertySupport:
    """One policy property on one kernel.  What the kernel cannot evaluate is FALSE for every
    file (a signature it keeps no state of, a digest it cannot read), as kernel IPE evaluates a
    file it has no such fact about; `detail` says so."""

    property: str
    supported: bool
    how: str  # the mechanism, or why it cannot work on this kernel

    @property
    def detail(self) -> str:
        return self.how if self.supported else f"always FALSE on this kernel: {self.how}"


@dataclass(frozen=True)
class KernelFeatures:
    hooks: tuple[str, ...]  # LSM hooks this kernel has (of HOOKS)
    fsverity: str | None  # "inode" (i_verity_info), "kfunc" (bpf_get_fsverity_digest) or None
    overlay: str | None  # overlayfs layout: "6.5+", "6.1", or None (module not loaded)
    dm_table: bool  # device-mapper and dm-verity structs readable (live table walk)
    dm_table_signature: bool  # dm-verity keeps its verified root hash signature (6.12+)
    mount_walk: bool  # struct mount readable (MPROTECT paths)
    compressed_module_ids: bool  # READING_MODULE_COMPRESSED exists (7.x)

    @property
    def missing_hooks(self) -> tuple[str, ...]:
        return tuple(h for h in HOOKS if h not in self.hooks)

    @property
    def useful_hooks(self) -> tuple[str, ...]:
        """The hooks to attach: those this kernel has, less those serving one it lacks (on 6.1,
        file_open would cost every open() a trampoline for nothing)."""
        return tuple(h for h in self.hooks if SERVES.get(h, h) in self.hooks)

    def properties(self) -> dict[str, PropertySupport]:
        """Per policy property: can this kernel evaluate it, and how."""
        hook = set(self.hooks)
        dm = "bdev_setintegrity hook" if "bdev_setintegrity" in hook else None
        if self.dm_table:
            dm = (dm + " + " if dm else "") + "live dm table"
        if "bdev_setintegrity" in hook:
            dm_sig = "bdev_setintegrity hook"
        elif self.dm_table_signature:
            dm_sig = "dm-verity's kept signature"
        else:
            dm_sig = None
        fsv = {"inode": "inode verity info, also through overlayfs",
               "kfunc": "bpf_get_fsverity_digest kfunc; not through overlayfs (the kfunc needs the "
                        "real file, the hook gets the overlay's: such files have no digest)"}.get(self.fsverity or "")
        found = {
            "boot_verified": (True, "rootfs superblock"),
            "dmverity_roothash": (dm is not None, dm or "no dm-verity structs in BTF (dm_verity module?)"),
            "dmverity_signature": (dm_sig is not None, dm_sig or "kernel keeps no dm-verity signature state "
                                   "(no bdev_setintegrity hook, dm-verity without root_digest_sig)"),
            "fsverity_digest": (fsv is not None, fsv or "neither inode.i_verity_info nor the kfunc"),
            "fsverity_signature": ("inode_setintegrity" in hook and fsv is not None,
                                   "no fs-verity" if fsv is None else "inode_setintegrity hook"
                                   if "inode_setintegrity" in hook else "kernel keeps no record of a "
                                   "verified fs-verity signature (no inode_setintegrity hook)"),
        }
        return {name: PropertySupport(name, ok, how) for name, (ok, how) in found.items()}

    def as_evaluated(self, attrs: FileAttributes) -> FileAttributes:
        """The file's attributes as the program evaluates them on this kernel: what it cannot
        evaluate is FALSE (signatures) or absent (digests).  A state the kernel has but the
        program did not see for this one file (set up before `load`) is another matter: the
        program decides it fail-closed (policy.evaluate.evaluate_undecided)."""
        props = self.properties()
        gone: dict[str, object] = {}
        for key in ("dmverity_signature", "fsverity_signature"):
            if not props[key].supported:
                gone[key] = False
        for key in ("dmverity_roothash", "fsverity_digest"):
            if not props[key].supported:
                gone[key] = None
        return replace(attrs, **gone) if gone else attrs  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["properties"] = {k: asdict(v) for k, v in self.properties().items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> "KernelFeatures":
        fields = {k: d[k] for k in cls.__dataclass_fields__}  # type: ignore[attr-defined]
        fields["hooks"] = tuple(fields["hooks"])  # type: ignore[arg-type]
        return cls(**fields)  # type: ignore[arg-type]


def load_modules() -> None:
    """Load overlay and dm-verity (and so dm-mod) when they are modules: their BTF must be
    there for CO-RE to relocate overlayfs and device-mapper accesses."""
    if shutil.which("modprobe") is None:
        return
    for module in ("overlay", "dm-verity"):
        subprocess.run(["modprobe", "-q", module], check=False, capture_output=True)


def probe() -> KernelFeatures:
    """Ask the running kernel's BTF; KernelError if it has none."""
    lib = libbpf.lib()
    vmlinux = lib.btf__load_vmlinux_btf()
    if not vmlinux:
        raise KernelError("ENOENT", "the kernel has no BTF (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF)")
    modules: dict[str, int] = {}
    try:
        for name in MODULES:
            handle = lib.btf__load_module_btf(name.encode(), vmlinux)
            if handle:
                modules[name] = handle
        return _features(_Btf(vmlinux), {k: _Btf(v) for k, v in modules.items()})
    finally:
        for handle in modules.values():
            lib.btf__free(handle)
        lib.btf__free(vmlinux)


def _features(vmlinux: _Btf, modules: dict[str, _Btf]) -> KernelFeatures:
    def members(struct: str, *where: str) -> frozenset[str]:
        for btf in [vmlinux, *(modules[m] for m in where if m in modules)]:
            found = btf.members(struct)
            if found:
                return found
        return frozenset()

    hooks = tuple(h for h in HOOKS if vmlinux.has_func(f"bpf_lsm_{h}"))
    if "i_verity_info" in members("inode"):
        fsverity: str | None = "inode"
    elif vmlinux.has_func("bpf_get_fsverity_digest"):
        fsverity = "kfunc"
    else:
        fsverity = None
    ovl = members("ovl_inode", "overlay")
    overlay = "6.5+" if "oe" in ovl else "6.1" if "lowerpath" in ovl else None
    dm_verity = members("dm_verity", "dm_verity")
    dm_table = "map" in members("mapped_device", "dm_mod") and "root_digest" in dm_verity
    return KernelFeatures(
        hooks=hooks,
        fsverity=fsverity,
        overlay=overlay,
        dm_table=dm_table,
        dm_table_signature=dm_table and "root_digest_sig" in dm_verity,
        mount_walk="mnt_parent" in members("mount"),
        compressed_module_ids="READING_MODULE_COMPRESSED" in vmlinux.enum_values("kernel_read_file_id"),
    )


@lru_cache(maxsize=1)
def cached_probe() -> KernelFeatures:
    return probe()


def running_kernel(state_file: Path = LOADED_STATE,
                   lsm_list: Path = Path("/sys/kernel/security/lsm")) -> KernelFeatures | None:
    """What the loaded program found (its state file), else a probe of this kernel if it can
    run ipe-bpf at all (BPF LSM active); None otherwise (a machine that only prepares
    policies has no kernel to check them against)."""
    try:
        return KernelFeatures.from_dict(json.loads(state_file.read_text())["features"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        if "bpf" not in lsm_list.read_text().strip().split(","):
            return None
    except OSError:
        return None
    try:
        return cached_probe()
    except KernelError:
        return None


def policy_properties(policy: Policy) -> frozenset[str]:
    """The property keys any rule of the policy tests."""
    return property_keys(policy.rules)


def unevaluable(properties: frozenset[str], found: KernelFeatures) -> tuple[PropertySupport, ...]:
    """Those of a policy's `properties` (policy_properties) this kernel cannot evaluate."""
    support = found.properties()
    return tuple(support[p] for p in sorted(properties) if not support[p].supported)


def _effect(rule: Rule, prop: str) -> str:
    """What `prop` being FALSE for every file does to one rule that tests it."""
    tested = [p for p in rule.properties if p.key.value == prop]
    if all(isinstance(p, BoolProperty) and not p.value for p in tested):
        return f"{prop}=FALSE holds for every file (its {rule.action.name} applies to signed files too)"
    return f"never matches (its {rule.action.name} never applies)"


def unevaluable_effects(policy: Policy, support: PropertySupport) -> str:
    """The rules whose outcome hangs on a property this kernel cannot evaluate, by line, and what
    each does here: what `--allow-unevaluable` accepted."""
    return "; ".join(f"line {rule.line} `{rule}` {_effect(rule, support.property)}"
                     for rule in policy.rules
                     if any(p.key.value == support.property for p in rule.properties))
