"""The Python fs-verity digest equals `fsverity digest` (fsverity-utils) byte for byte."""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from ipe_bpf.errors import IpeBpfError
from ipe_bpf.generate.fsverity import digest_stream, file_digest, merkle_root

BLOCK = 4096
SIZES = {
    "empty": 0,
    "one-byte": 1,
    "one-block": BLOCK,
    "block-plus-one": BLOCK + 1,
    "two-levels-sha256": 129 * BLOCK + 7,  # 129 data-block hashes: more than one sha256 hash block
    "two-levels-sha512": 65 * BLOCK,  # 65 sha512 hashes: more than one hash block
    "over-16MiB": 16 * 1024 * 1024 + 3,  # three levels for sha512, two full ones for sha256
}


def fsverity_tool_digest(path: Path, alg: str) -> str:
    tool = shutil.which("fsverity")
    assert tool, "the `fsverity` program (Debian package fsverity) is missing: scripts/dev installs it"
    out = subprocess.run([tool, "digest", f"--hash-alg={alg}", "--block-size=4096", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fsv")
    rng = random.Random(1420)
    made = {}
    for name, size in SIZES.items():
        path = base / name
        path.write_bytes(rng.randbytes(size))
        made[name] = path
    return made


@pytest.mark.parametrize("alg", ["sha256", "sha512"])
@pytest.mark.parametrize("name", list(SIZES))
def test_digest_equals_fsverity_digest(files: dict[str, Path], name: str, alg: str) -> None:
    assert f"{alg}:{file_digest(files[name], alg).hex()}" == fsverity_tool_digest(files[name], alg)


def test_tree_depth_is_what_the_sizes_claim() -> None:
    """The multi-level cases really have more than one level of hash blocks."""
    def levels(size: int, digest_size: int) -> int:
        hashes, n = (size + BLOCK - 1) // BLOCK, 0
        while hashes > 1:
            hashes, n = (hashes * digest_size + BLOCK - 1) // BLOCK, n + 1
        return n

    assert levels(SIZES["two-levels-sha256"], 32) == 2
    assert levels(SIZES["two-levels-sha512"], 64) == 2
    assert levels(SIZES["over-16MiB"], 64) == 3


def test_empty_file_root_is_zero() -> None:
    assert merkle_root(io.BytesIO(b""), "sha256") == (bytes(32), 0)


def test_unknown_algorithm_is_einval() -> None:
    with pytest.raises(IpeBpfError) as err:
        digest_stream(io.BytesIO(b"x"), "md5")
    assert err.value.errno_name == "EINVAL"
