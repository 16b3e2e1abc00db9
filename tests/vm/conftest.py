"""The kernel test suite: runs inside the test VM (`ipe-bpf vm run -- python3 -m pytest tests/vm`).

Every test here needs a guest kernel with BPF LSM.  Outside the VM (no IPE_BPF_IN_VM=1 from
the VM's PID 1 or the Vagrant box, not root, or BPF LSM not active) they FAIL rather than
skip, so a kernel test can never pass silently on a machine without that kernel.  Expensive
per-boot set-up (loading the BPF program) belongs in session-scoped fixtures here, so that it
happens once per boot.

Kernel lines (`ipe-bpf vm run --kernel 6.1|6.12|7.x`): a test that needs what a line lacks
says so with ``@pytest.mark.requires("FEATURE", ...)`` (features: ``FEATURES`` below).  On a
line whose entry in ``LACKS`` names one of them, the test is DESELECTED with that reason,
printed in the run's summary and written to /results/deselected.json; never skipped silently.
With IPE_BPF_LOADER=bcc every test that loads the program (the ``kernel`` fixture) also
requires ``bcc``.  The table is checked against the running kernel at the start of the
session: a line that claims a feature the kernel lacks, or lacks one it has, fails every test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipe_bpf.vm.lines import line_of_release

LSM_LIST = Path("/sys/kernel/security/lsm")
RESULTS = Path("/results")
IMAGE_FACTS = Path("/etc/ipe-bpf-vm")  # written by `ipe-bpf vm build`: key=, line=, kernel=, ...


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


# ------------------------------------------------------------------ kernel lines and features


def _kallsyms(*names: str) -> bool:
    try:
        symbols = {line.split()[2] for line in Path("/proc/kallsyms").read_text().splitlines()}
    except (OSError, IndexError):
        return False
    return all(name in symbols for name in names)


def _kernel_config(option: str) -> bool:
    try:
        text = Path(f"/boot/config-{os.uname().release}").read_text()
    except OSError:
        return False
    return f"\n{option}=y\n" in f"\n{text}"


def _headers() -> bool:
    return Path(f"/lib/modules/{os.uname().release}/build/include").is_dir()


def _fsverity_source() -> str | None:
    from ipe_bpf.kernel.features import probe

    return probe().fsverity


@dataclass(frozen=True)
class Feature:
    """Something a test may need that not every kernel line has, and how to see it."""

    meaning: str
    present: Callable[[], bool]


FEATURES: dict[str, Feature] = {
    "kernel_ipe": Feature("the kernel's own IPE LSM is active", lambda: "ipe" in active_lsms()),
    "setintegrity_hooks": Feature(
        "the LSM hooks bdev_setintegrity and inode_setintegrity (dm-verity root hashes of volumes "
        "opened after the load, fs-verity builtin signatures)",
        lambda: _kallsyms("bpf_lsm_bdev_setintegrity", "bpf_lsm_inode_setintegrity")),
    "dmverity_platform_keyring": Feature(
        "dm-verity checks root hash signatures against the .platform keyring, where --uefi-db puts "
        "the test certificate", lambda: _kernel_config("CONFIG_DM_VERITY_VERIFY_ROOTHASH_SIG_PLATFORM_KEYRING")),
    "kernel_headers": Feature("the running kernel's headers (/lib/modules/RELEASE/build)", _headers),
    "bcc": Feature("BCC (python3-bpfcc) and the kernel headers it compiles the program against",
                   lambda: importlib.util.find_spec("bcc") is not None and _headers()),
    "overlay_verity": Feature("fs-verity digests of files reached through overlayfs (inode.i_verity_info "
                              "of the real inode is readable)", lambda: _fsverity_source() == "inode"),
    "seal_hooks": Feature("the loaded program has the seal's hooks (the CO-RE object)", lambda: loader() != "bcc"),
    "rebuilt_paths": Feature("the loaded program rebuilds full paths where bpf_d_path() is refused "
                             "(MPROTECT records, the subject's exe)", lambda: loader() != "bcc"),
}

# What each kernel line lacks, and why (measured on Debian's cloud kernels, 2026-12-01).
LACKS: dict[str, dict[str, str]] = {
    "6.1": {
        "kernel_ipe": "IPE came with Linux 6.12: Debian's 6.1 has no CONFIG_SECURITY_IPE",
        "setintegrity_hooks": "the bdev_setintegrity/inode_setintegrity hooks came with IPE in 6.12",
        "dmverity_platform_keyring": "6.1's dm-verity trusts the builtin and secondary keyrings only "
                                     "(no CONFIG_DM_VERITY_VERIFY_ROOTHASH_SIG_PLATFORM_KEYRING): a root hash "
                                     "signed with the UEFI db certificate fails with ENOKEY",
        "kernel_headers": "only the 6.12 image carries kernel headers (for the BCC development loader)",
        "bcc": "bookworm's BCC 0.26 cannot compile the program (lsm_integrity_type, dm_verity_digest "
               "unknown): the 6.1 image carries no BCC",
    },
    "6.12": {},
    "7.x": {
        "overlay_verity": "7.x has no inode.i_verity_info; its bpf_get_fsverity_digest kfunc takes the "
                          "file the hook got, the overlay's, which has no verity",
        "kernel_headers": "only the 6.12 image carries kernel headers (for the BCC development loader)",
        "bcc": "trixie's BCC 0.31 cannot compile against 7.x's headers (BPF_F_CPU, BPF_TRACE_FSESSION "
               "unknown): the 7.x image carries no BCC",
    },
}


# What a loader lacks, whatever the line.
LOADER_LACKS: dict[str, dict[str, str]] = {
    "core": {},
    "bcc": {
        "seal_hooks": "the seal's hooks and its decision-cache checks are in the CO-RE object only: "
                      "`ipe-bpf seal` refuses a BCC load (EOPNOTSUPP)",
        "rebuilt_paths": "BCC cannot link the bpf_loop callback that walks a path, and an unrolled walk "
                         "beside the fail-closed decision is more than 6.12's verifier explores (E2BIG): "
                         "BCC builds record MPROTECT paths and the exe by name only",
    },
}


def lacks_here(line: str | None) -> dict[str, str]:
    """What this line, with this loader, lacks: feature -> why."""
    return {**LACKS.get(line or "", {}), **LOADER_LACKS.get(loader(), {})}


def image_facts() -> dict[str, str]:
    try:
        lines = IMAGE_FACTS.read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


def kernel_line() -> str | None:
    """The line of the running guest: the image says so (else, e.g. Vagrant, by uname -r)."""
    line = image_facts().get("line")
    if line is None:
        found = line_of_release(os.uname().release)
        line = found.name if found is not None else None
    return line


def loader() -> str:
    return os.environ.get("IPE_BPF_LOADER", "") or "core"


def line_table_problems(line: str | None) -> list[str]:
    """Where LACKS[line] disagrees with the running kernel (empty when it is right)."""
    if line not in LACKS:
        return [f"kernel {os.uname().release} is on no known line (LACKS has {', '.join(LACKS)})"]
    problems = []
    lacks = lacks_here(line)
    for name, feature in FEATURES.items():
        has, claimed = feature.present(), name not in lacks
        if has != claimed:
            problems.append(
                f"line {line} {'claims' if claimed else 'lacks'} {name} ({feature.meaning}) but the running "
                f"kernel {os.uname().release} {'lacks' if claimed else 'has'} it: correct LACKS in tests/vm/conftest.py"
            )
    return problems


def required_features(item: pytest.Item) -> list[str]:
    needs = [name for mark in item.iter_markers("requires") for name in mark.args]
    if loader() == "bcc" and "kernel" in getattr(item, "fixturenames", ()):
        needs.append("bcc")
    return list(dict.fromkeys(needs))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(*features): needs these kernel-line features "
                            f"({', '.join(FEATURES)}); deselected with the reason on a line that lacks one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect, with the reason, every test that needs what this kernel line lacks."""
    for item in items:
        unknown = [name for name in required_features(item) if name not in FEATURES]
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: unknown feature {', '.join(unknown)} (known: {', '.join(FEATURES)})")
    if vm_problem() is not None:
        return  # outside the VM every test fails with the reason (_require_vm)
    line = kernel_line()
    lacks = lacks_here(line)
    keep, dropped = [], []
    for item in items:
        missing = [name for name in required_features(item) if name in lacks]
        if missing:
            dropped.append({"test": item.nodeid, "features": missing, "reasons": [lacks[m] for m in missing]})
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
    config.stash[_DESELECTED] = dropped
    report = {"line": line, "release": os.uname().release, "loader": loader(), "lacks": lacks, "deselected": dropped}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "deselected.json").write_text(json.dumps(report, indent=2) + "\n")


_DESELECTED = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    dropped = config.stash.get(_DESELECTED, None)
    if not dropped:
        return
    terminalreporter.section(
        f"deselected on kernel line {kernel_line()} ({os.uname().release}, loader {loader()}): "
        f"{len(dropped)} tests need what it lacks")
    for entry in dropped:
        terminalreporter.write_line(f"{entry['test']}: {'; '.join(f'{f}: {r}' for f, r in zip(entry['features'], entry['reasons']))}")


@pytest.fixture(scope="session", autouse=True)
def _require_vm() -> None:
    """Runs before every other fixture of the session (the program's load included): outside
    the VM every test here errors out with the reason, none passes or skips; in it, a line
    table that disagrees with the running kernel fails every test."""
    problem = vm_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    problems = line_table_problems(kernel_line())
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


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
