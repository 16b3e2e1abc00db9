"""The fs-verity file digest, computed in Python (Documentation/filesystems/fsverity.rst).

The digest the kernel reports (FS_IOC_MEASURE_VERITY, `fsverity digest`) is the hash of a
256-byte descriptor that holds the file size and the root of a Merkle tree over the file's
data blocks.  Computing it here lets a policy be written on a build machine, before the
files are deployed, for files that will get fs-verity with the default parameters
(`fsverity enable`: 4096-byte blocks, no salt).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import BinaryIO

from ..errors import IpeBpfError

BLOCK_SIZE = 4096
HASH_ALGORITHMS = {"sha256": 1, "sha512": 2}  # FS_VERITY_HASH_ALG_*
_READ_BLOCKS = 256  # blocks read per read() call


def _check_algorithm(alg: str) -> None:
    if alg not in HASH_ALGORITHMS:
        raise IpeBpfError("EINVAL", f"fs-verity hash algorithm {alg!r} is not sha256 or sha512")


def _hash_blocks(data: bytes, alg: str, block_size: int) -> bytes:
    """The concatenated hashes of `data` cut into blocks (the last one zero-padded)."""
    out = bytearray()
    for start in range(0, len(data), block_size):
        block = data[start:start + block_size]
        if len(block) < block_size:
            block = block + bytes(block_size - len(block))
        out += hashlib.new(alg, block).digest()
    return bytes(out)


def _pad(level: bytes, block_size: int) -> bytes:
    tail = len(level) % block_size
    return level if tail == 0 else level + bytes(block_size - tail)


def merkle_root(stream: BinaryIO, alg: str = "sha256", block_size: int = BLOCK_SIZE) -> tuple[bytes, int]:
    """(root hash, data size): hash the data blocks, then the blocks of hashes, until one hash is left."""
    _check_algorithm(alg)
    level = bytearray()
    size = 0
    while chunk := stream.read(block_size * _READ_BLOCKS):
        size += len(chunk)
        level += _hash_blocks(chunk, alg, block_size)
    digest_size = hashlib.new(alg).digest_size
    if size == 0:
        return bytes(digest_size), 0
    hashes = bytes(level)
    while len(hashes) > digest_size:  # one more tree level: hash the blocks of hashes
        hashes = _hash_blocks(_pad(hashes, block_size), alg, block_size)
    return hashes, size


def descriptor(root: bytes, size: int, alg: str = "sha256", block_size: int = BLOCK_SIZE) -> bytes:
    """struct fsverity_descriptor: version 1, no salt, no signature; 256 bytes."""
    _check_algorithm(alg)
    log_blocksize = block_size.bit_length() - 1
    head = struct.pack("<BBBBIQ", 1, HASH_ALGORITHMS[alg], log_blocksize, 0, 0, size)
    return head + root.ljust(64, b"\0") + bytes(32) + bytes(144)


def digest_stream(stream: BinaryIO, alg: str = "sha256", block_size: int = BLOCK_SIZE) -> bytes:
    root, size = merkle_root(stream, alg, block_size)
    return hashlib.new(alg, descriptor(root, size, alg, block_size)).digest()


def file_digest(path: Path, alg: str = "sha256") -> bytes:
    """The digest `fsverity digest --hash-alg=ALG PATH` prints, for a file on any filesystem."""
    with open(path, "rb") as stream:
        return digest_stream(stream, alg)
