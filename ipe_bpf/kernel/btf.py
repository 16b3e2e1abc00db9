"""Struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).

BCC cannot call kfuncs (bpf_get_fsverity_digest), so the BPF program reads fs-verity's
private structs with bpf_probe_read_kernel at offsets passed in as -D constants at load
time.  Those offsets come from here, never from a table in the source: a kernel whose
layout differs simply yields different numbers, and a kernel without the types yields
none (fs-verity properties then never match, and `doctor` says so).

Only the parts of the BTF format needed for struct/union member offsets are decoded
(see the kernel's Documentation/bpf/btf.rst, "Type encoding").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import KernelError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

_MAGIC = 0xEB9F
_KIND_STRUCT, _KIND_UNION = 4, 5
_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_TYPE_TAG = 8, 9, 10, 11, 18

# Bytes after the 12-byte btf_type header, per kind: (fixed, per vlen item).
_TRAILER = {
    1: (4, 0),  # INT
    2: (0, 0),  # PTR
    3: (12, 0),  # ARRAY
    4: (0, 12),  # STRUCT
    5: (0, 12),  # UNION
    6: (0, 8),  # ENUM
    7: (0, 0),  # FWD
    8: (0, 0),  # TYPEDEF
    9: (0, 0),  # VOLATILE
    10: (0, 0),  # CONST
    11: (0, 0),  # RESTRICT
    12: (0, 0),  # FUNC
    13: (0, 8),  # FUNC_PROTO
    14: (4, 0),  # VAR
    15: (0, 12),  # DATASEC
    16: (0, 0),  # FLOAT
    17: (4, 0),  # DECL_TAG
    18: (0, 0),  # TYPE_TAG
    19: (0, 12),  # ENUM64
}


@dataclass(frozen=True)
class _Member:
    name: str
    type_id: int
    bit_offset: int


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    ref: int  # size for struct/union, referenced type for modifiers
    members: tuple[_Member, ...] = ()


class Btf:
    """A parsed BTF blob: named structs/unions and the modifiers needed to resolve them."""

    def __init__(self, data: bytes, base: "Btf | None" = None) -> None:
        """Parse a BTF blob; a module's split BTF continues `base` (vmlinux) ids and strings."""
        if len(data) < 24:
            raise KernelError("EINVAL", "BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != _MAGIC:
            raise KernelError("EINVAL", "not a BTF blob (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        types = data[hdr_len + type_off : hdr_len + type_off + type_len]
        own_strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self._types: list[_Type | None] = [None] if base is None else list(base._types)  # id 0: void
        self._strings = own_strings if base is None else base._strings + own_strings
        self._by_name: dict[str, list[int]] = (
            {} if base is None else {k: list(v) for k, v in base._by_name.items()}
        )
        at = 0
        while at < len(types):
            name_off, info, size_or_type = struct.unpack_from("<III", types, at)
            at += 12
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kind_flag = info >> 31
            fixed, per_item = _TRAILER.get(kind, (None, None))  # type: ignore[arg-type]
            if fixed is None:
                raise KernelError("EINVAL", f"BTF kind {kind} not understood")
            members: tuple[_Member, ...] = ()
            if kind in (_KIND_STRUCT, _KIND_UNION):
                out = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", types, at + 12 * i)
                    bit_offset = m_off & 0xFFFFFF if kind_flag else m_off
                    out.append(_Member(self._str(m_name), m_type, bit_offset))
                members = tuple(out)
            at += fixed + per_item * vlen
            name = self._str(name_off)
            self._types.append(_Type(kind, name, size_or_type, members))
            if name and kind in (_KIND_STRUCT, _KIND_UNION):
                self._by_name.setdefault(name, []).append(len(self._types) - 1)

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode("ascii", "replace")

    def _resolve(self, type_id: int) -> _Type | None:
        for _ in range(32):
            t = self._types[type_id] if 0 < type_id < len(self._types) else None
            if t is None or t.kind not in (_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_TYPE_TAG):
                return t
            type_id = t.ref
        return None

    def has_struct(self, name: str) -> bool:
        return name in self._by_name

    def size(self, struct_name: str) -> int:
        """sizeof(struct struct_name)."""
        candidates = self._by_name.get(struct_name)
        if not candidates:
            raise KernelError("ENOENT", f"BTF has no struct {struct_name}")
        t = self._types[candidates[-1]]
        assert t is not None
        return t.ref

    def _find_member(self, t: _Type, name: str) -> tuple[int, _Type | None] | None:
        """(bit offset, resolved type) of `name` in t, looking through anonymous members."""
        for m in t.members:
            if m.name == name:
                return m.bit_offset, self._resolve(m.type_id)
            if not m.name:
                inner = self._resolve(m.type_id)
                if inner is not None and inner.kind in (_KIND_STRUCT, _KIND_UNION):
                    found = self._find_member(inner, name)
                    if found is not None:
                        return m.bit_offset + found[0], found[1]
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of `path` ("a.b.c", through nested and anonymous members) in the struct."""
        candidates = self._by_name.get(struct_name)
        if not candidates:
            raise KernelError("ENOENT", f"kernel BTF has no struct {struct_name}")
        errors = []
        for type_id in candidates:
            t: _Type | None = self._types[type_id]
            bits = 0
            try:
                for part in path.split("."):
                    if t is None or t.kind not in (_KIND_STRUCT, _KIND_UNION):
                        raise LookupError(part)
                    found = self._find_member(t, part)
                    if found is None:
                        raise LookupError(part)
                    bits += found[0]
                    t = found[1]
            except LookupError as exc:
                errors.append(str(exc))
                continue
            if bits % 8:
                raise KernelError("EINVAL", f"{struct_name}.{path} is a bitfield")
            return bits // 8
        raise KernelError("ENOENT", f"kernel BTF: struct {struct_name} has no member {path}")


def load_vmlinux(path: Path = VMLINUX_BTF) -> Btf:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KernelError("ENOENT", f"{path} missing: the kernel has no BTF (CONFIG_DEBUG_INFO_BTF)") from None
    except OSError as exc:
        raise KernelError("EIO", f"cannot read {path}: {exc.strerror}") from None
    return Btf(data)


# name of the -D define -> (struct, member path)
FSVERITY_OFFSETS: dict[str, tuple[str, str]] = {
    "IPE_OFF_INODE_VERITY": ("inode", "i_verity_info"),
    "IPE_OFF_VI_HASH_ALG": ("fsverity_info", "tree_params.hash_alg"),
    "IPE_OFF_VI_DIGEST": ("fsverity_info", "file_digest"),
    "IPE_OFF_ALG_NAME": ("fsverity_hash_alg", "name"),
    "IPE_OFF_ALG_SIZE": ("fsverity_hash_alg", "digest_size"),
}


@dataclass(frozen=True)
class FsverityOffsets:
    """The offsets the BPF program needs for fs-verity, or why they are missing."""

    values: dict[str, int]
    missing: str | None = None

    def defines(self) -> list[str]:
        if self.missing is not None:
            return []
        return [f"-D{k}={v}" for k, v in sorted(self.values.items())] + ["-DIPE_HAVE_FSVERITY=1"]


def fsverity_offsets(btf: Btf | None = None) -> FsverityOffsets:
    btf = load_vmlinux() if btf is None else btf
    values: dict[str, int] = {}
    for define, (struct_name, member) in FSVERITY_OFFSETS.items():
        try:
            values[define] = btf.offset(struct_name, member)
        except KernelError as exc:
            return FsverityOffsets(values, missing=exc.message)
    return FsverityOffsets(values)


# overlayfs (a module: its types live in /sys/kernel/btf/overlay while it is loaded).
OVERLAY_OFFSETS: dict[str, tuple[str, str]] = {
    "IPE_OFF_OVL_VFS_INODE": ("ovl_inode", "vfs_inode"),
    "IPE_OFF_OVL_UPPER": ("ovl_inode", "__upperdentry"),
    "IPE_OFF_OVL_OE": ("ovl_inode", "oe"),
    "IPE_OFF_OE_NUMLOWER": ("ovl_entry", "__numlower"),
    "IPE_OFF_OE_LOWERSTACK": ("ovl_entry", "__lowerstack"),
    "IPE_OFF_OVLPATH_DENTRY": ("ovl_path", "dentry"),
}


@dataclass(frozen=True)
class OverlayOffsets:
    """What the BPF program needs to find an overlayfs file's real inode (d_real_inode)."""

    values: dict[str, int]
    missing: str | None = None

    def defines(self) -> list[str]:
        if self.missing is not None:
            return []
        return [f"-D{k}={v}" for k, v in sorted(self.values.items())] + ["-DIPE_HAVE_OVL=1"]


def overlay_offsets(vmlinux: Btf | None = None, module: Path = Path("/sys/kernel/btf/overlay")) -> OverlayOffsets:
    vmlinux = load_vmlinux() if vmlinux is None else vmlinux
    if not vmlinux.has_struct("ovl_inode") and not module.exists():
        return OverlayOffsets({}, missing=f"{module} missing (overlay module not loaded)")
    try:
        btf = vmlinux if vmlinux.has_struct("ovl_inode") else Btf(module.read_bytes(), base=vmlinux)
        values = {d: btf.offset(s, m) for d, (s, m) in OVERLAY_OFFSETS.items()}
        values["IPE_SIZEOF_OVL_PATH"] = btf.size("ovl_path")
    except (KernelError, OSError) as exc:
        return OverlayOffsets({}, missing=str(exc))
    return OverlayOffsets(values)


# struct mount (fs/mount.h, private): file_mprotect rebuilds paths by crossing mounts.
MOUNT_OFFSETS: dict[str, tuple[str, str]] = {
    "IPE_OFF_MOUNT_MNT": ("mount", "mnt"),
    "IPE_OFF_MOUNT_PARENT": ("mount", "mnt_parent"),
    "IPE_OFF_MOUNT_MOUNTPOINT": ("mount", "mnt_mountpoint"),
}


def mount_defines(vmlinux: Btf | None = None) -> list[str]:
    """-D defines for struct mount's layout, with IPE_HAVE_MOUNT; none if BTF lacks it."""
    vmlinux = load_vmlinux() if vmlinux is None else vmlinux
    try:
        values = {d: vmlinux.offset(s, m) for d, (s, m) in MOUNT_OFFSETS.items()}
    except KernelError:
        return []  # MPROTECT records then carry the file's name only
    return [f"-D{k}={v}" for k, v in sorted(values.items())] + ["-DIPE_HAVE_MOUNT=1"]
