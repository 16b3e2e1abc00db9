"""ipe-bpf as a service across reboots: three boots of one kept root disk with systemd as PID 1
(`ipe-bpf vm run --systemd --state DIR`), each running one class of tests/vm/service_boots.py.

Why three boots: the early unit of boot 2 checks that the permissive mode set in boot 1 was kept
(a denied binary runs, audited as DENY with enforcing=0), and only a boot that starts enforcing
can show a denied binary failing before any login (boot 3, after boot 2's `enforce on`).
Why one kernel line (6.12, the default): the units, the audit daemon and its sinks are the same
code on every line, over the same pinned maps and ring buffer that tests/vm checks on 6.1, 6.12
and 7.x; a systemd boot costs about a minute under TCG, so the suite stays within CI's time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-state")


def _boot(state: Path, n: int, results: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ipe_bpf.cli.vm", "run", "--systemd", "--state", str(state), "-q",
         "--project", str(ROOT), "--results", str(results), "--timeout", "2400", "--",
         "python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/vm/service_boots.py::TestBoot{n}"],
        capture_output=True, text=True, timeout=2700,
    )
    console = (results / "vm-console.log").read_text(errors="replace")[-6000:] if (results / "vm-console.log").exists() else ""
    assert r.returncode == 0, f"boot {n}: {r.stdout[-4000:]}{r.stderr[-2000:]}\nconsole:\n{console}"


def test_boot_1_enable_deploy_permissive(state: Path, tmp_path: Path) -> None:
    _boot(state, 1, tmp_path / "results")


def test_boot_2_kept_settings_no_loss_in_any_sink(state: Path, tmp_path: Path) -> None:
    _boot(state, 2, tmp_path / "results")


def test_boot_3_enforced_before_logins_and_daemon_killed(state: Path, tmp_path: Path) -> None:
    _boot(state, 3, tmp_path / "results")
