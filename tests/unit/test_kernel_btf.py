"""The BTF reader, against a synthetic BTF blob (no kernel needed)."""

from __future__ import annotations

import struct

import pytest

from ipe_bpf.errors import KernelError
from ipe_bpf.kernel.btf import Btf, kernel_offsets


def _blob() -> bytes:
    strings = b"\0int\0inner\0a\0b\0outer\0x\0in\0ptr\0fsverity_hash_alg\0name\0digest_size\0"

    def s(name: str) -> int:
        return strings.index(b"\0" + name.encode() + b"\0") + 1

    types = b""
    # 1: int (4 bytes)
    types += struct.pack("<III", s("int"), 1 << 24, 4) + struct.pack("<I", 32)
    # 2: struct inner { int a; int b; }
    types += struct.pack("<III", s("inner"), (4 << 24) | 2, 8)
    types += struct.pack("<III", s("a"), 1, 0) + struct.pack("<III", s("b"), 1, 32)
    # 3: const inner
    types += struct.pack("<III", 0, 10 << 24, 2)
    # 4: struct outer { int x; union { const struct inner in; }; }  (anonymous union at 64 bits)
    types += struct.pack("<III", s("outer"), (4 << 24) | 2, 16)
    types += struct.pack("<III", s("x"), 1, 0) + struct.pack("<III", 0, 5, 64)
    # 5: anonymous union { const struct inner in; }
    types += struct.pack("<III", 0, (5 << 24) | 1, 8) + struct.pack("<III", s("in"), 3, 0)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_nested_and_anonymous_members() -> None:
    btf = Btf(_blob())
    assert btf.offset("outer", "x") == 0
    assert btf.offset("outer", "in") == 8
    assert btf.offset("outer", "in.b") == 12
    with pytest.raises(KernelError) as e:
        btf.offset("outer", "nope")
    assert e.value.errno_name == "ENOENT"


def test_missing_types_are_reported_not_guessed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ipe_bpf.kernel import btf as btf_mod

    btf_mod.MODULE_BTF, saved = tmp_path, btf_mod.MODULE_BTF  # no module BTF at all
    try:
        found = kernel_offsets(Btf(_blob()))
    finally:
        btf_mod.MODULE_BTF = saved
    assert found.defines() == []
    assert set(found.missing) == {"IPE_HAVE_INODE_VERITY", "IPE_HAVE_OVL", "IPE_HAVE_MOUNT",
                                  "IPE_HAVE_DM_TABLE", "IPE_HAVE_DM_SIG"}
    assert "inode" in found.missing["IPE_HAVE_INODE_VERITY"]
    assert "overlay" in found.missing["IPE_HAVE_OVL"]  # the module's BTF file is named
