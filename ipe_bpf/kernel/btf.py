"""Struct member offsets from the running kernel's BTF, for the BCC loader only.

BCC has no CO-RE: the private structs the program reads (fs-verity's, overlayfs', struct
mount, device-mapper's and dm-verity's) are reached at offsets passed as -D constants at
compile time, under the names bpf/libbpf_compat.h gives its CO-RE relocations (IPE_OFF_*),
with IPE_HAVE_* saying which groups were found.  Those offsets come from here, never from a
table in the source.  The CO-RE loader never parses BTF in Python (libbpf does).

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


# -D name -> (BTF object, struct, member path); grouped by the IPE_HAVE_* flag they enable.
_GROUPS: dict[str, dict[str, tuple[str, str, str]]] = {
    "IPE_HAVE_INODE_VERITY": {
        "IPE_OFF_INODE_VERITY": ("vmlinux", "inode", "i_verity_info"),
        "IPE_OFF_FSVERITY_INFO_HASH_ALG": ("vmlinux", "fsverity_info", "tree_params.hash_alg"),
        "IPE_OFF_FSVERITY_INFO_DIGEST": ("vmlinux", "fsverity_info", "file_digest"),
        "IPE_OFF_HASH_ALG_NAME": ("vmlinux", "fsverity_hash_alg", "name"),
        "IPE_OFF_HASH_ALG_SIZE": ("vmlinux", "fsverity_hash_alg", "digest_size"),
    },
    "IPE_HAVE_OVL": {
        "IPE_OFF_OVL_INODE_VFS_INODE": ("overlay", "ovl_inode", "vfs_inode"),
        "IPE_OFF_OVL_INODE_UPPER": ("overlay", "ovl_inode", "__upperdentry"),
        "IPE_OFF_OVL_INODE_OE": ("overlay", "ovl_inode", "oe"),
        "IPE_OFF_OVL_ENTRY_NUMLOWER": ("overlay", "ovl_entry", "__numlower"),
        "IPE_OFF_OVL_ENTRY_LOWERSTACK": ("overlay", "ovl_entry", "__lowerstack"),
        "IPE_OFF_OVL_PATH_DENTRY": ("overlay", "ovl_path", "dentry"),
    },
    "IPE_HAVE_MOUNT": {
        "IPE_OFF_MOUNT_MNT": ("vmlinux", "mount", "mnt"),
        "IPE_OFF_MOUNT_PARENT": ("vmlinux", "mount", "mnt_parent"),
        "IPE_OFF_MOUNT_MOUNTPOINT": ("vmlinux", "mount", "mnt_mountpoint"),
    },
    "IPE_HAVE_DM_TABLE": {
        "IPE_OFF_MAPPED_DEVICE_MAP": ("dm_mod", "mapped_device", "map"),
        "IPE_OFF_DM_TABLE_NUM_TARGETS": ("dm_mod", "dm_table", "num_targets"),
        "IPE_OFF_DM_TABLE_TARGETS": ("dm_mod", "dm_table", "targets"),
        "IPE_OFF_DM_TARGET_TYPE": ("dm_mod", "dm_target", "type"),
        "IPE_OFF_DM_TARGET_PRIVATE": ("dm_mod", "dm_target", "private"),
        "IPE_OFF_TARGET_TYPE_NAME": ("dm_mod", "target_type", "name"),
        "IPE_OFF_DM_VERITY_ALG_NAME": ("dm_verity", "dm_verity", "alg_name"),
        "IPE_OFF_DM_VERITY_ROOT_DIGEST": ("dm_verity", "dm_verity", "root_digest"),
        "IPE_OFF_DM_VERITY_DIGEST_SIZE": ("dm_verity", "dm_verity", "digest_size"),
    },
    "IPE_HAVE_DM_SIG": {
        "IPE_OFF_DM_VERITY_ROOT_DIGEST_SIG": ("dm_verity", "dm_verity", "root_digest_sig"),
    },
}
_SIZES = {"IPE_SIZEOF_OVL_PATH": ("overlay", "ovl_path")}
MODULE_BTF = Path("/sys/kernel/btf")


@dataclass(frozen=True)
class KernelOffsets:
    """The -D defines found, and per IPE_HAVE_* group why it is missing (if it is)."""

    values: dict[str, int]
    missing: dict[str, str]

    def defines(self) -> list[str]:
        return [f"-D{k}={v}" for k, v in sorted(self.values.items())]


def _btf_of(name: str, vmlinux: Btf, loaded: dict[str, Btf]) -> Btf:
    if name == "vmlinux":
        return vmlinux
    if name not in loaded:
        path = MODULE_BTF / name
        try:
            loaded[name] = Btf(path.read_bytes(), base=vmlinux)
        except OSError:
            raise KernelError("ENOENT", f"{path} missing (module {name} not loaded)") from None
    return loaded[name]


def kernel_offsets(vmlinux: Btf | None = None) -> KernelOffsets:
    vmlinux = load_vmlinux() if vmlinux is None else vmlinux
    loaded: dict[str, Btf] = {}
    values: dict[str, int] = {}
    missing: dict[str, str] = {}
    for flag, members in _GROUPS.items():
        try:
            found = {d: _btf_of(where, vmlinux, loaded).offset(s, m) for d, (where, s, m) in members.items()}
            if flag == "IPE_HAVE_OVL":
                found.update({d: _btf_of(w, vmlinux, loaded).size(s) for d, (w, s) in _SIZES.items()})
        except KernelError as exc:
            missing[flag] = exc.message
            continue
        values.update(found)
        values[flag] = 1
    return KernelOffsets(values, missing)


def kernel_defines() -> list[str]:
    """-D defines for the BCC build on the running kernel."""
    return kernel_offsets().defines()
