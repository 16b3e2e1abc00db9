"""fsverity_signature: the built-in fs-verity signature flag captured on inode_setintegrity."""

from __future__ import annotations

from pathlib import Path

import pytest

from .kernel_fixtures import FSV, SCRATCH, Kernel, get_kernel, ipe, kernel, measure, policy, sh  # noqa: F401

EACCES = 13


def _signing_key() -> tuple[str, str]:
    key, cert = SCRATCH / "fsv-key.pem", SCRATCH / "fsv-cert.pem"
    if not cert.exists():
        sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
           "-days", "2", "-subj", "/CN=ipe-bpf fs-verity test")
        der = SCRATCH / "fsv-cert.der"
        sh("openssl", "x509", "-in", cert, "-out", der, "-outform", "der")
        # the kernel's .fs-verity keyring accepts root-added X.509 certificates
        with open(der, "rb") as f:
            import subprocess

            subprocess.run(["keyctl", "padd", "asymmetric", "", "%keyring:.fs-verity"], stdin=f,
                           check=True, capture_output=True)
    return str(key), str(cert)


def verity_pair(name: str, good: Path, marks: bytes) -> tuple[Path, Path, Path, Path]:
    """A scratch ext4 image with fs-verity, loop-mounted, holding a copy of `good` with a built-in
    signature and one without (told apart by one byte of `marks` each): (image, mount point,
    signed, unsigned)."""
    key, cert = _signing_key()
    disk, mnt, sig = SCRATCH / f"{name}.img", SCRATCH / name, SCRATCH / f"{name}.sig"
    sh("truncate", "-s", "16M", disk)
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "verity", disk)
    mnt.mkdir(exist_ok=True)
    sh("mount", "-o", "loop", disk, mnt)
    signed, unsigned = mnt / "signed", mnt / "unsigned"
    try:
        for path, mark in ((signed, marks[:1]), (unsigned, marks[1:2])):
            path.write_bytes(good.read_bytes() + mark)
            path.chmod(0o755)
        sh("fsverity", "sign", signed, sig, "--key", key, "--cert", cert)
        sh("fsverity", "enable", signed, f"--signature={sig}")
        sh("fsverity", "enable", unsigned)
    except BaseException:
        sh("umount", mnt, check=False)
        raise
    return disk, mnt, signed, unsigned


@pytest.mark.requires("setintegrity_hooks")
def test_fsverity_builtin_signature(ipe: Kernel) -> None:
    key, cert = _signing_key()
    signed, unsigned = FSV / "signed", FSV / "unsigned"
    for path, extra in ((signed, b"\1"), (unsigned, b"\2")):
        path.write_bytes(ipe.good.read_bytes() + extra)
        path.chmod(0o755)
    sig = SCRATCH / "signed.sig"
    sh("fsverity", "sign", signed, sig, "--key", key, "--cert", cert)
    sh("fsverity", "enable", signed, f"--signature={sig}")
    sh("fsverity", "enable", unsigned)
    assert measure(signed) != measure(unsigned)
    ipe.activate(policy("op=EXECUTE fsverity_signature=TRUE action=DENY"))
    assert ipe.exec_status(signed) == EACCES
    assert ipe.exec_status(unsigned) == 0
    ipe.activate(policy(f"op=EXECUTE fsverity_signature=FALSE fsverity_digest={measure(unsigned)} action=DENY"))
    assert ipe.exec_status(unsigned) == EACCES
    assert ipe.exec_status(signed) == 0


def test_fsverity_signature_as_this_kernel_keeps_it(ipe: Kernel) -> None:
    """Every line: a signed fs-verity file enabled after the load.  Where the kernel reports the
    verified signature (inode_setintegrity) it is TRUE; where it keeps no record of it (6.1) it
    is FALSE, as kernel IPE evaluates a file with no verified signature: never decided
    fail-closed (the `undecidable` count stays)."""
    from .conftest import FEATURES

    key, cert = _signing_key()
    signed = FSV / "signed-any-line"
    signed.write_bytes(ipe.good.read_bytes() + b"\5")
    signed.chmod(0o755)
    sig = SCRATCH / "signed-any-line.sig"
    sh("fsverity", "sign", signed, sig, "--key", key, "--cert", cert)
    sh("fsverity", "enable", signed, f"--signature={sig}")
    digest = measure(signed)
    kept = FEATURES["setintegrity_hooks"].present()
    with ipe.maps() as maps:
        before = maps.counters().undecidable
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={digest} fsverity_signature=TRUE action=DENY"))
    assert ipe.exec_status(signed) == (EACCES if kept else 0)
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={digest} fsverity_signature=FALSE action=ALLOW",
                        f"op=EXECUTE fsverity_digest={digest} action=DENY"))
    assert ipe.exec_status(signed) == (EACCES if kept else 0)
    with ipe.maps() as maps:
        assert maps.counters().undecidable == before


@pytest.mark.requires("setintegrity_hooks")
def test_signature_state_of_files_set_up_at_their_first_open_after_the_load(ipe: Kernel) -> None:
    """fs-verity files enabled earlier, whose inodes were evicted (here: the file system
    unmounted) and whose verity info is set up again at their first open while ipe-bpf is loaded:
    the program sees that open (file_open), so no signature report means FALSE, not unknown."""
    disk, mnt, signed, unsigned = verity_pair("reopen", ipe.good, b"\6\7")
    try:
        digests = {path: measure(path) for path in (signed, unsigned)}
        sh("umount", mnt)  # the inodes, their verity info and the program's records of them go
        sh("mount", "-o", "loop", disk, mnt)
        with ipe.maps() as maps:
            before = maps.counters().undecidable
        for path, signature, other in ((unsigned, "FALSE", signed), (signed, "TRUE", unsigned)):
            ipe.activate(policy(f"op=EXECUTE fsverity_digest={digests[path]} fsverity_signature={signature} action=ALLOW",
                                f"op=EXECUTE fsverity_digest={digests[path]} action=DENY",
                                f"op=EXECUTE fsverity_digest={digests[other]} action=DENY"))
            assert ipe.exec_status(path) == 0, path  # known: allowed by the first rule
            assert ipe.exec_status(other) == EACCES, other
        with ipe.maps() as maps:
            assert maps.counters().undecidable == before
    finally:
        sh("umount", mnt)
