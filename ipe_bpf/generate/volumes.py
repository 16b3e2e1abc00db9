"""dm-verity volumes for IPE: pack a directory into a read-only image with a hash tree, open it.

`pack` makes an ext4 image of a directory (mke2fs -d, no journal), its dm-verity hash tree
(veritysetup format) and, with a key, the root hash signature the kernel checks for
dmverity_signature (PKCS#7, detached, DER, no certificates: what
`openssl smime -sign -nocerts -noattr -binary -outform der` makes).  Beside IMAGE it writes
IMAGE.verity (the hash tree), IMAGE.roothash (hex) and IMAGE.roothash.p7s (when signed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import IpeBpfError
from ..policy import signing
from ..policy.model import Action, Digest, DigestKey, DigestProperty, Op, Rule

_MIN_IMAGE = 8 << 20


@dataclass(frozen=True)
class PackedVolume:
    image: Path
    hash_tree: Path
    roothash: str  # hex, as veritysetup prints it
    signature: Path | None

    @property
    def rule(self) -> Rule:
        digest = Digest(b"sha256", bytes.fromhex(self.roothash))
        return Rule(Op.EXECUTE, (DigestProperty(DigestKey.DMVERITY_ROOTHASH, digest),), Action.ALLOW)


def sidecars(image: Path) -> tuple[Path, Path, Path]:
    """(hash tree, root hash, root hash signature) files of an image."""
    return (image.with_name(image.name + ".verity"), image.with_name(image.name + ".roothash"),
            image.with_name(image.name + ".roothash.p7s"))


def _run(tool: str, *args: str | Path, package: str) -> str:
    if shutil.which(tool) is None:
        raise IpeBpfError("ENOENT", f"{tool} not found (install {package})")
    proc = subprocess.run([tool, *map(str, args)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise IpeBpfError("EIO", f"{tool} failed: {said[-1] if said else f'exit status {proc.returncode}'}")
    return proc.stdout


def _tree_size(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def sign_roothash(roothash: str, key_pem: bytes, cert_pem: bytes) -> bytes:
    """The detached PKCS#7 over the root hash text that dm-verity's --root-hash-signature takes."""
    return signing.sign_policy(roothash.encode(), key_pem, cert_pem, detached=True)


def pack(directory: Path, image: Path, signer: tuple[bytes, bytes] | None = None) -> PackedVolume:
    if not directory.is_dir():
        raise IpeBpfError("ENOTDIR", "not a directory", path=str(directory))
    hash_tree, roothash_file, signature = sidecars(image)
    size = max(_MIN_IMAGE, (_tree_size(directory) * 5 // 4 + (4 << 20)) // 4096 * 4096)
    for stale in (image, hash_tree, roothash_file, signature):
        stale.unlink(missing_ok=True)
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-O", "^has_journal",
         "-d", directory, image, f"{size // 1024}k", package="e2fsprogs")
    out = _run("veritysetup", "format", image, hash_tree, package="cryptsetup-bin")
    roothash = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Root hash")), "")
    if not roothash:
        raise IpeBpfError("EIO", "veritysetup format printed no root hash")
    roothash_file.write_text(roothash + "\n")
    signed = None
    if signer is not None:
        signature.write_bytes(sign_roothash(roothash, *signer))
        signed = signature
    return PackedVolume(image, hash_tree, roothash, signed)


def open_volume(image: Path, name: str, mount: Path | None = None) -> PackedVolume:
    """Attach IMAGE and its hash tree read-only, open them as /dev/mapper/NAME (signed if a
    signature is beside it), and mount it read-only at `mount`."""
    hash_tree, roothash_file, signature = sidecars(image)
    for needed in (image, hash_tree, roothash_file):
        if not needed.exists():
            raise IpeBpfError("ENOENT", "missing (made by `ipe-bpf verity pack`)", path=str(needed))
    roothash = roothash_file.read_text().strip()
    data_loop = _run("losetup", "--show", "-f", "-r", image, package="mount").strip()
    hash_loop = _run("losetup", "--show", "-f", "-r", hash_tree, package="mount").strip()
    extra = [f"--root-hash-signature={signature}"] if signature.exists() else []
    try:
        _run("veritysetup", "open", data_loop, name, hash_loop, roothash, *extra, package="cryptsetup-bin")
    except IpeBpfError:
        for loop in (data_loop, hash_loop):
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        raise
    if mount is not None:
        mount.mkdir(parents=True, exist_ok=True)
        _run("mount", "-o", "ro", "-t", "ext4", f"/dev/mapper/{name}", mount, package="mount")
    return PackedVolume(image, hash_tree, roothash, signature if signature.exists() else None)


def close_volume(name: str) -> None:
    """Unmount /dev/mapper/NAME wherever it is mounted, close it and detach its loop devices."""
    dm = Path(f"/dev/mapper/{name}")
    if not dm.exists():
        raise IpeBpfError("ENOENT", "no such dm-verity device", path=str(dm))
    block = Path("/sys/block") / os.path.basename(os.path.realpath(dm))
    loops = sorted(p.name for p in (block / "slaves").iterdir()) if (block / "slaves").is_dir() else []
    real = os.path.realpath(dm)
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, target = line.split()[:2]
        if source in (str(dm), real):
            _run("umount", target.replace("\\040", " "), package="mount")
    _run("veritysetup", "close", name, package="cryptsetup-bin")
    for loop in loops:
        if loop.startswith("loop"):
            subprocess.run(["losetup", "-d", f"/dev/{loop}"], capture_output=True)
