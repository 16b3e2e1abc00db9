"""The kernel test suite: runs inside the test VM (`ipe-bpf vm run -- python3 -m pytest tests/vm`).

Every test here needs the guest kernel (Linux 6.12 with BPF LSM and IPE active).  Outside the
VM (no IPE_BPF_IN_VM=1 from the VM's PID 1 or the Vagrant box, not root, or BPF LSM not
active) they FAIL rather than skip, so a kernel test can never pass silently on a machine without
that kernel.  Expensive per-boot set-up (the BCC compile of the BPF program, 40 to 60 s under
TCG) belongs in session-scoped fixtures here, so that it happens once per boot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

LSM_LIST = Path("/sys/kernel/security/lsm")
RESULTS = Path("/results")


def in_vm() -> bool:
    """The test VM's PID 1 exports IPE_BPF_IN_VM=1 (the Vagrant box's provisioning too)."""
    return os.environ.get("IPE_BPF_IN_VM") == "1"


def active_lsms() -> list[str]:
    try:
        return LSM_LIST.read_text().strip().split(",")
    except OSError:
        return []


def vm_problem() -> str | None:
    """Why this is not the test VM (None when it is)."""
    if in_vm() and os.geteuid() == 0 and "bpf" in active_lsms():
        return None
    return (
        "tests/vm needs the test VM's kernel and root: run `ipe-bpf vm run -- python3 -m pytest tests/vm` "
        f"(here IPE_BPF_IN_VM={os.environ.get('IPE_BPF_IN_VM', 'unset')}, euid={os.geteuid()}, "
        f"LSMs={','.join(active_lsms()) or 'unknown'})"
    )


@pytest.fixture(scope="session", autouse=True)
def _require_vm() -> None:
    """Runs before every other fixture of the session (the BCC compile included): outside
    the VM every test here errors out with the reason, none passes or skips."""
    problem = vm_problem()
    if problem:
        pytest.fail(problem, pytrace=False)


def run(*argv: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a program, capture text output, fail the test with its stderr when it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


@pytest.fixture(scope="session")
def results_dir() -> Path:
    """/results in the guest: what is written here is copied to the host's --results."""
    RESULTS.mkdir(exist_ok=True)
    return RESULTS


@pytest.fixture(scope="session")
def guest_kernel() -> dict[str, str]:
    """Facts about the running guest kernel (checked once per boot)."""
    return {"release": os.uname().release, "lsms": ",".join(active_lsms())}


@pytest.fixture()
def work_tmp() -> Iterator[Path]:
    """A scratch directory under /work: the ext4 disk with 4 KiB blocks and verity enabled."""
    base = Path("/work/.vm-scratch")
    base.mkdir(exist_ok=True)
    path = Path(subprocess.run(["mktemp", "-d", "-p", str(base)], capture_output=True, text=True, check=True).stdout.strip())
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def loop_modules() -> None:
    """loop and dm-verity are modules in the guest kernel: load them (no udev here)."""
    run("modprobe", "loop")
    run("modprobe", "dm-verity")
