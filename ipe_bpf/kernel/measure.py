"""What the kernel knows about a real file on this machine: the properties IPE decides on.

fs-verity through its ioctls (FS_IOC_MEASURE_VERITY, FS_IOC_READ_VERITY_METADATA,
FS_IOC_ENABLE_VERITY), the dm-verity table of the file's block device (`dmsetup table`, or
what the loaded ipe-bpf program recorded for it), and whether the file's superblock is the
initial rootfs (boot_verified, as bpf/ipe_bpf.bpf.c decides it).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import IpeBpfError
from ..policy.model import Digest, FileAttributes

FS_IOC_ENABLE_VERITY = 0x40806685  # _IOW('f', 133, struct fsverity_enable_arg)
FS_IOC_MEASURE_VERITY = 0xC0046686  # _IOWR('f', 134, struct fsverity_digest)
FS_IOC_READ_VERITY_METADATA = 0xC0286687  # _IOWR('f', 135, struct fsverity_read_metadata_arg)
FS_VERITY_METADATA_TYPE_SIGNATURE = 3
VERITY_HASH_ALGORITHMS = {1: "sha256", 2: "sha512"}
_MEASURE_ROOM = 64  # the longest fs-verity digest the ioctl may return (uapi FS_VERITY_MAX_DIGEST_SIZE)

# Why FS_IOC_ENABLE_VERITY refuses, in words a user can act on
ENABLE_REASONS = {
    "EOPNOTSUPP": "the filesystem was made without the verity feature (ext4: tune2fs -O verity)",
    "ENOTTY": "the filesystem does not support fs-verity",
    "EROFS": "the filesystem is mounted read-only",
    "ETXTBSY": "the file is open for writing",
    "EACCES": "fs-verity needs write permission on the file",
    "EPERM": "the file is immutable or append-only",
    "EFBIG": "the file is too large for fs-verity",
    "ENOPKG": "the kernel lacks the hash algorithm",
    "EINVAL": "the filesystem cannot use this block size",
}


class MeasureError(IpeBpfError):
    """A file could not be measured or given fs-verity."""


def _errno_name(err: OSError) -> str:
    return errno.errorcode.get(err.errno or 0, "EIO")


def fsverity_digest(path: Path) -> Digest | None:
    """The file's fs-verity digest as IPE sees it; None if fs-verity is not enabled on it."""
    buf = bytearray(struct.pack("=HH", 0, _MEASURE_ROOM) + bytes(_MEASURE_ROOM))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise MeasureError(_errno_name(err), f"cannot measure fs-verity: {err.strerror}", path=str(path)) from None
    finally:
        os.close(fd)
    alg, size = struct.unpack_from("=HH", buf)
    name = VERITY_HASH_ALGORITHMS.get(alg)
    if name is None:
        raise MeasureError("EINVAL", f"unknown fs-verity hash algorithm {alg}", path=str(path))
    return Digest(name.encode(), bytes(buf[4:4 + size]))


def fsverity_signed(path: Path) -> bool:
    """Whether the file carries a built-in fs-verity signature (the kernel checked it on open)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return signed_fd(fd)
    finally:
        os.close(fd)


def signed_fd(fd: int) -> bool:
    """fsverity_signed() of an open file."""
    buf = ctypes.create_string_buffer(16384)
    arg = bytearray(struct.pack("=QQQQQ", FS_VERITY_METADATA_TYPE_SIGNATURE, 0, len(buf), ctypes.addressof(buf), 0))
    try:
        return fcntl.ioctl(fd, FS_IOC_READ_VERITY_METADATA, arg) > 0  # bytes of signature read
    except OSError:
        return False  # ENODATA: no signature (or no fs-verity at all)


def verity_fd(fd: int) -> bool:
    """Whether fs-verity is enabled on an open file."""
    buf = bytearray(struct.pack("=HH", 0, _MEASURE_ROOM) + bytes(_MEASURE_ROOM))
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf)
    except OSError:
        return False
    return True


def enable_fsverity(path: Path, alg: str = "sha256") -> None:
    """FS_IOC_ENABLE_VERITY with 4096-byte blocks and no salt: the file becomes read-only for good."""
    number = {v: k for k, v in VERITY_HASH_ALGORITHMS.items()}.get(alg)
    if number is None:
        raise MeasureError("EINVAL", f"fs-verity hash algorithm {alg!r} is not sha256 or sha512", path=str(path))
    arg = struct.pack("=IIIIQIIQ88x", 1, number, 4096, 0, 0, 0, 0, 0)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
    except OSError as err:
        name = _errno_name(err)
        if name == "EEXIST":
            return
        reason = ENABLE_REASONS.get(name, err.strerror or "refused")
        raise MeasureError(name, f"cannot enable fs-verity: {reason}", path=str(path)) from None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class VerityVolume:
    """The dm-verity device a file lives on."""

    name: str  # /dev/mapper/<name>
    major: int
    minor: int
    roothash: Digest
    signed: bool  # opened with a root hash signature the kernel checked
    source: str  # "dmsetup" or "ipe-bpf" (the loaded program's record of the device)


def parse_verity_line(name: str, line: str) -> tuple[bytes, bytes] | None:
    """(alg, root digest) of a dm table line `start len verity v data hash dbs hbs nd nh alg root salt ...`."""
    parts = line.split()
    if len(parts) < 12 or parts[2] != "verity":
        return None
    try:
        return parts[10].encode(), bytes.fromhex(parts[11])
    except ValueError:
        return None


def _dm_name(major: int, minor: int) -> str | None:
    try:
        return Path(f"/sys/dev/block/{major}:{minor}/dm/name").read_text().strip()
    except OSError:
        return None


def _dm_table(name: str) -> str:
    try:
        return subprocess.run(["dmsetup", "table", "--", name], capture_output=True, text=True,
                              timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _from_ipe_bpf(major: int, minor: int) -> tuple[Digest, bool] | None:
    """The root hash and signature state the loaded ipe-bpf program holds for a device."""
    from . import pins

    if not pins.is_loaded():
        return None
    from .maps import PinnedPolicyMaps, kernel_dev

    try:
        with PinnedPolicyMaps() as maps:
            devices = maps.devices()
    except (IpeBpfError, OSError):
        return None
    for d in devices:
        if d.dev == kernel_dev(major, minor) and d.has_roothash:
            return Digest(d.alg.encode(), bytes.fromhex(d.roothash)), d.signature_valid
    return None


def verity_volume(st_dev: int) -> VerityVolume | None:
    """The dm-verity device behind a file's st_dev, None if it is not one."""
    major, minor = os.major(st_dev), os.minor(st_dev)
    name = _dm_name(major, minor)
    if name is None:
        return None
    for line in _dm_table(name).splitlines():
        parsed = parse_verity_line(name, line)
        if parsed is None:
            continue
        signed = "root_hash_sig_key_desc" in line.split()
        loaded = _from_ipe_bpf(major, minor)
        if loaded is not None:
            return VerityVolume(name, major, minor, loaded[0], loaded[1], "ipe-bpf")
        return VerityVolume(name, major, minor, Digest(*parsed), signed, "dmsetup")
    return None


def filesystem_type(st_dev: int) -> str | None:
    """The type of the mounted filesystem whose superblock has this st_dev (/proc/self/mountinfo)."""
    want = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[2] == want and " - " in line:
            return line.split(" - ", 1)[1].split()[0]
    return None


def device_id(st_dev: int) -> str:
    """The superblock's s_id, as IPE's audit prints it in dev=: the block device's name, else the fs type."""
    block = Path(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}")
    if block.exists():
        return os.path.basename(os.path.realpath(block))
    return filesystem_type(st_dev) or "?"


@dataclass(frozen=True)
class Measurement:
    """A real file and the IPE properties it has on this machine now."""

    path: str  # real path, as the kernel's audit names it
    dev: str
    ino: int
    fsverity: Digest | None
    fsverity_signed: bool
    volume: VerityVolume | None
    boot_verified: bool

    def attributes(self) -> FileAttributes:
        return FileAttributes(
            boot_verified=self.boot_verified,
            dmverity_roothash=self.volume.roothash if self.volume else None,
            dmverity_signature=self.volume.signed if self.volume else False,
            fsverity_digest=self.fsverity,
            fsverity_signature=self.fsverity_signed,
        )


def measure(path: Path) -> Measurement:
    """Measure a real file; MeasureError (ENOENT, EACCES, ...) if it cannot be read."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError as err:
        raise MeasureError(_errno_name(err), err.strerror or "cannot stat", path=str(path)) from None
    if not os.path.isfile(real):
        raise MeasureError("EINVAL", "not a regular file", path=str(path))
    digest = fsverity_digest(Path(real))
    return Measurement(
        path=real,
        dev=device_id(st.st_dev),
        ino=st.st_ino,
        fsverity=digest,
        fsverity_signed=digest is not None and fsverity_signed(Path(real)),
        volume=verity_volume(st.st_dev),
        boot_verified=filesystem_type(st.st_dev) == "rootfs",
    )
