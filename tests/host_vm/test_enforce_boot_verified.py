"""boot_verified needs an initramfs boot: this host-side test boots the VM with --initramfs
(and --uefi-db, so that kernel IPE can be compared with ipe-bpf there too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_boot_verified_in_an_initramfs_boot(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ipe_bpf.cli.vm", "run", "--initramfs", "-q", "--project", str(ROOT),
         "--uefi-db", str(ROOT / "tests/vm/keys/uefi-db-test.pem"),
         "--results", str(tmp_path / "results"), "--",
         "python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/vm/initramfs_boot_verified.py"],
        capture_output=True, text=True, timeout=3600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
