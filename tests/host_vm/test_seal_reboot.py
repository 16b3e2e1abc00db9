"""A reboot clears the seal: two boots of the test VM sharing one state directory (host side).

Boot 1 loads with `seal = yes` (what the boot unit does) and cannot switch enforcement off or
unload.  Boot 2 is a fresh kernel: nothing is loaded, nothing is sealed; `load` applies the
policy the state directory kept, and enforcement can be switched off and unloaded again.  The
guest side is seal_reboot_guest.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ipe_bpf.vm.run import RunRequest, run_vm

ROOT = Path(__file__).resolve().parents[2]
EACCES = 13


def _project(tmp: Path, state: Path | None) -> Path:
    """What the guest needs at /work: the package, the BPF object and the guest script."""
    project = tmp / "project"
    for part in ("ipe_bpf", "bpf"):
        shutil.copytree(ROOT / part, project / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("seal_reboot_guest.py"), project / "seal_reboot_guest.py")
    if state is not None:
        shutil.copytree(state, project / "state")
    return project


def _boot(tmp: Path, n: int, state: Path | None) -> dict[str, object]:
    results = tmp / f"results{n}"
    outcome = run_vm(RunRequest(("python3", "seal_reboot_guest.py", str(n)), _project(tmp / f"boot{n}", state),
                                results, timeout=1800))
    assert outcome.status == 0, (outcome.reason, outcome.console_log.read_text(errors="replace")[-4000:])
    return json.loads((results / f"boot{n}.json").read_text())


def test_the_next_boot_starts_unsealed(tmp_path: Path) -> None:
    first = _boot(tmp_path, 1, None)
    assert first["load"]["rc"] == 0 and "sealed until reboot" in first["load"]["out"], first["load"]
    assert first["status"]["sealed"] and first["status"]["active_policy"]["name"] == "reboot"
    assert first["denied"] == EACCES
    assert first["enforce off"]["rc"] == 1 and first["enforce off"]["err"].startswith("EPERM: enforce off: ")
    assert first["denied after enforce off"] == EACCES
    assert first["unload"]["rc"] == 1 and "sealed since" in first["unload"]["err"]

    second = _boot(tmp_path, 2, tmp_path / "results1" / "state")
    assert second["bpffs"] == [] and second["before"]["loaded"] is False  # a fresh kernel
    assert second["load"]["rc"] == 0, second["load"]
    assert "sealed" not in second["load"]["out"]
    assert second["status"]["sealed"] is False and second["status"]["active_policy"]["name"] == "reboot"
    assert second["denied"] == EACCES  # the policy the state directory kept is enforced
    assert second["enforce off"]["rc"] == 0 and second["denied after enforce off"] == 0
    assert second["unload"]["rc"] == 0
