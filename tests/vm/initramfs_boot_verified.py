"""boot_verified in an initramfs boot (not collected by default: the name has no test_ prefix).

Run by tests/host_vm/test_enforce_boot_verified.py as
    ipe-bpf vm run --initramfs --uefi-db tests/vm/keys/uefi-db-test.pem -- \
        python3 -m pytest tests/vm/initramfs_boot_verified.py
where / is the kernel's initial rootfs: everything on it is boot_verified=TRUE, so a strict
policy (EXECUTE denied unless boot_verified) leaves the system itself working.  With the test
key in UEFI db, kernel IPE runs too and must agree.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .kernel_fixtures import Kernel, get_kernel, ipe, kernel, policy  # noqa: F401
from .test_enforce_uefi_peer import (  # noqa: F401
    Kmsg,
    _activate_in_both,
    _decisions,
    _signed_policy,
    kernel_ipe_peer,
    platform_key,
)

EACCES = 13


def _root_fstype() -> str:
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype, *_ = line.split()
        if mnt == "/":
            return fstype
    return "?"


def test_boot_verified_is_the_initramfs_superblock(ipe: Kernel) -> None:
    assert _root_fstype() == "rootfs", "boot the VM with --initramfs"
    on_rootfs = Path("/usr/local/bin/ipe-boot-verified")
    shutil.copy(ipe.attack, on_rootfs)  # written after boot: still the rootfs superblock
    on_rootfs.chmod(0o755)
    elsewhere = ipe.plain  # an ext4 loop mount
    ipe.activate(policy("op=EXECUTE boot_verified=TRUE action=ALLOW",
                        extra_defaults="DEFAULT op=EXECUTE action=DENY"))
    try:
        ok = subprocess.run([str(on_rootfs), "true"]).returncode
        refused = subprocess.run([str(on_rootfs), "exec", str(elsewhere), "true"]).returncode
    finally:
        ipe.activate(policy())
    assert (ok, refused) == (0, EACCES)
    recs = [r for r in ipe.drain() if r.hook == "BPRM_CHECK" and r.path == str(elsewhere).encode()]
    assert recs and recs[0].action == "DENY" and recs[0].source == "op_default"


@pytest.mark.requires("kernel_ipe")
def test_boot_verified_agrees_with_kernel_ipe(ipe: Kernel, kernel_ipe_peer: None) -> None:
    """Kernel IPE marks the rootfs superblock when the initramfs is unpacked; ipe-bpf judges
    by the superblock's type: both must say the same about a file on / and one elsewhere."""
    on_rootfs, elsewhere = Path("/usr/local/bin/ipe-boot-verified-peer"), ipe.plain
    shutil.copy(ipe.attack, on_rootfs)
    on_rootfs.chmod(0o755)
    _activate_in_both(ipe, *_signed_policy(
        "DEFAULT action=ALLOW\nop=EXECUTE boot_verified=TRUE action=DENY\n"))

    def run() -> None:
        assert subprocess.run([str(on_rootfs), "exec", str(elsewhere), "true"]).returncode == 0

    kmsg = Kmsg()
    try:
        ours, theirs = _decisions(ipe, kmsg, run, lambda b: "ipe_hook=BPRM_CHECK" in b and (
            f' path="{on_rootfs}"' in b or f' path="{elsewhere}"' in b))
    finally:
        kmsg.close()
    rules = sorted(b.rsplit(" rule=", 1)[1] for b in theirs)
    assert rules == ['"DEFAULT action=ALLOW"', '"op=EXECUTE boot_verified=TRUE action=DENY"'], theirs
    assert ours == theirs
