"""boot_verified needs an initramfs boot: this host-side test boots the VM with --initramfs
(and --uefi-db, so that kernel IPE can be compared with ipe-bpf there too).

It boots the default kernel line ($IPE_BPF_VM_KERNEL, else 6.12).  On a line without kernel
IPE the guest deselects the comparison (tests/vm/conftest.py's LACKS); what it deselected is
reported here as a warning, so it shows in this run's summary too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
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
    report = json.loads((tmp_path / "results" / "deselected.json").read_text())
    for entry in report["deselected"]:
        warnings.warn(f"deselected in the guest (line {report['line']}): {entry['test']}: "
                      + "; ".join(entry["reasons"]), stacklevel=1)
