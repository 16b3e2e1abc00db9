"""Host-side tests that boot the test VM (QEMU TCG, 10 to 20 s a boot).

They drive `ipe-bpf vm run` from this machine, so they live apart from tests/unit (any
machine, no QEMU) and tests/vm (inside the guest).  `scripts/dev test` runs them after the VM
suite; on their own: `python3 -m pytest tests/host_vm` (root, or an already built image).
Without QEMU or an image they fail with the reason, they never skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ipe_bpf.vm.run import NO_REPORT, RunOutcome, RunRequest, run_vm

ROOT_FS_TYPE = "awk '$2 == \"/\" {print $3}' /proc/mounts"


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    (path / "hello.txt").write_text("hello from the host\n")
    return path


def _boot(project: Path, results: Path | None, script: str, **kw: object) -> RunOutcome:
    request = RunRequest(("sh", "-c", script), project, results, **kw)  # type: ignore[arg-type]
    return run_vm(request)


def _diagnose(outcome: RunOutcome) -> str:
    return f"{outcome.reason or ''} console:\n" + outcome.console_log.read_text(errors="replace")[-3000:]


def test_initramfs_boot_runs_the_command_from_rootfs(project: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    outcome = _boot(
        project,
        results,
        f"{ROOT_FS_TYPE} > /results/root-fs; echo $IPE_BPF_VM_MODE > /results/mode; cat hello.txt > /results/hello; exit 7",
        initramfs=True,
        timeout=300,
    )
    assert outcome.status == 7, _diagnose(outcome)
    assert (results / "root-fs").read_text().strip() == "rootfs"
    assert (results / "mode").read_text().strip() == "initramfs"
    assert (results / "hello").read_text() == "hello from the host\n"


def test_disk_boot_status_results_and_fs_verity_capable_work_disk(project: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    script = (
        f"{ROOT_FS_TYPE} > /results/root-fs; mkdir -p /results/sub; "
        "fsverity enable hello.txt && fsverity measure hello.txt > /results/sub/measure; "
        "exit 42"
    )
    outcome = _boot(project, results, script, timeout=300)
    assert outcome.status == 42, _diagnose(outcome)
    assert (results / "root-fs").read_text().strip() == "ext4"
    assert (results / "sub" / "measure").read_text().startswith("sha256:")
    assert (results / "vm-console.log").is_file()
    assert (project / "hello.txt").read_text() == "hello from the host\n"  # the host copy is untouched


def test_a_silent_guest_is_killed_and_reported(project: Path) -> None:
    outcome = _boot(project, None, "sleep 600", timeout=25)
    assert outcome.status == NO_REPORT
    assert outcome.reason is not None and "within 25 s" in outcome.reason
    assert str(outcome.console_log) in outcome.reason
