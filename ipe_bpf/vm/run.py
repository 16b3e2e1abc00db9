"""Booting the test VM to run one command: ``run_vm`` / ``run_in_vm``.

One boot: QEMU (TCG) with the cached guest kernel, the root image as the only NVMe disk
(``snapshot=on``: every run starts from the same clean image) or, with ``initramfs=True``,
the same tree as an initramfs (``/`` is then the kernel's rootfs, which is what IPE's
``boot_verified`` means), plus three virtio-blk disks found by serial: ``ctl`` (a tar with
the command), ``work`` (the project as ext4 with 4 KiB blocks and the verity feature, mounted
at ``/work``) and ``results`` (the guest writes a tar of ``/results`` onto it).  The console
streams to the caller and to ``console.log``; the command's exit status comes back in a
marker line.

``systemd=True`` boots the same image with systemd as PID 1 instead (journald, auditd and the
units of the image run; two units of the image find the disks and run the command, see
``guest/systemd.sh``); ``state=DIR`` boots from ``DIR/root.img``, a copy of the image's root
disk made on first use, without ``snapshot=on``: what the guest writes stays for the next boot
with the same DIR (reboots, enabled units, /var/lib and /var/log).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import VmError
from . import host, uefi
from .config import VmConfig
from .console import ConsoleState, split_lines
from .disks import extract_results, make_control_disk, make_results_disk, make_work_image, stage_project
from .image import Image, build_image, find_image
from .inputs import SYSTEMD_UNITS
from .progress import Reporter, SilentReporter
from .qemu import BootSpec, Disk
from .state import state_root

NO_REPORT = 125  # the exit status when the guest never reported (like `git bisect run`)
KEEP_RUNS = 10
POWEROFF_GRACE = 30.0


@dataclass(frozen=True)
class RunRequest:
    command: tuple[str, ...]
    project: Path
    results: Path | None = None
    timeout: float = 3600.0
    initramfs: bool = False
    icount: bool = False
    env: tuple[tuple[str, str], ...] = ()
    uefi_db: Path | None = None  # boot UEFI with this certificate in db (kernel: .platform keyring)
    systemd: bool = False  # systemd as PID 1 (journald, auditd, the image's units)
    state: Path | None = None  # the root disk's changes kept here between boots


@dataclass
class RunOutcome:
    """How a boot ended: the command's status, or why there is none."""

    status: int
    console_log: Path
    seconds: float
    reason: str | None = None  # set when status is NO_REPORT
    warnings: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)

    @property
    def reported(self) -> bool:
        return self.reason is None


def command_script(request: RunRequest, terminal: bool, columns: int | None) -> str:
    """The shell script PID 1 runs in /work (pure: unit-tested)."""
    if not request.command:
        raise VmError("EINVAL", "no command to run in the VM")
    mode = "initramfs" if request.initramfs else "systemd" if request.systemd else "disk"
    lines = [
        "# written by `ipe-bpf vm run`",
        "IPE_BPF_IN_VM=1",
        f"IPE_BPF_VM_MODE={mode}",
        "PYTHONPATH=/work${PYTHONPATH:+:$PYTHONPATH}",
        f"TERM={'xterm-256color' if terminal else 'dumb'}",
        "export IPE_BPF_IN_VM IPE_BPF_VM_MODE PYTHONPATH TERM",
    ]
    if columns:
        lines.append(f"COLUMNS={int(columns)}; export COLUMNS")
    for name, value in request.env:
        if not name.isidentifier():
            raise VmError("EINVAL", f"bad environment variable name {name!r}")
        lines.append(f"{name}={shlex.quote(value)}; export {name}")
    lines += ["cd /work || exit 125", "exec " + shlex.join(request.command), ""]
    return "\n".join(lines)


def watchdog_seconds(request: RunRequest) -> int | None:
    """When the guest lists its processes (what each waits on) before the host's timeout.

    None without a timeout, with -icount (guest time is not wall time) or for short timeouts.
    """
    if request.timeout <= 0 or request.icount or request.timeout < 60 or request.systemd:
        return None
    return int(request.timeout - 30)


# Kernel IPE's records reach the console and dmesg (no auditd in the guest) with audit=1.
UEFI_KERNEL_ARGS = ("audit=1", "audit_backlog_limit=8192")


def _uefi_boot(request: RunRequest, run_dir: Path) -> dict[str, object]:
    """BootSpec fields for a UEFI boot with request.uefi_db enrolled in db (none without it)."""
    if request.uefi_db is None:
        return {}
    variables = uefi.prepare_vars(request.uefi_db, run_dir / "uefi-vars.fd")
    return {"firmware": (uefi.OVMF_CODE, variables), "kernel_args": UEFI_KERNEL_ARGS}


# systemd as PID 1: the default target plus the image's two units that run the command (only on
# these boots); no getty on the console (it would take the serial line the markers are read from).
SYSTEMD_INIT = "/lib/systemd/systemd"
SYSTEMD_KERNEL_ARGS = (
    "systemd.unit=multi-user.target",
    *(f"systemd.wants={unit}" for unit in SYSTEMD_UNITS),
    "systemd.mask=serial-getty@ttyS0.service",
    "systemd.mask=getty@tty1.service",
)
SYSTEMD_POWEROFF_GRACE = 120.0  # a clean systemd shutdown under TCG on a loaded host


def _systemd_boot(request: RunRequest) -> dict[str, object]:
    if not request.systemd:
        return {}
    return {"init": SYSTEMD_INIT}


def _in_use(run_dir: Path) -> bool:
    """Whether the `vm run` that made run_dir (its pid is in the name) still runs: another
    run's pruning must never take a running guest's disks and results away."""
    try:
        pid = int(run_dir.name.split("-")[2])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _new_run_dir(config: VmConfig) -> Path:
    config.runs_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in config.runs_dir.iterdir() if p.is_dir() and not _in_use(p))
    for stale in old[: max(0, len(old) - KEEP_RUNS + 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir = config.runs_dir / f"{stamp}-{os.getpid()}-{secrets.token_hex(2)}"
    run_dir.mkdir()
    return run_dir


def ensure_image(config: VmConfig, reporter: Reporter) -> Image:
    """The cached image, built first if there is none (a corrupt one is an error)."""
    image = find_image(config)
    if image is None:
        reporter.note(f"no VM image of kernel line {config.choice.line.name} for the current inputs yet: building it")
        image = build_image(config, reporter=reporter)
    return image


@contextlib.contextmanager
def _terminate_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, as Ctrl-C does: QEMU is stopped and the run's
    disks go, instead of a guest left running when `vm run` is killed."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can take signals
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _why(state: ConsoleState, exit_code: int | None, timed_out: float | None, log: Path) -> str:
    if state.failure is not None:
        what = f"the guest's init could not run the command: {state.failure}"
    elif state.panic is not None:
        what = f"the guest kernel panicked: {state.panic}"
    elif any("terminating on signal" in line for line in state.tail):
        killed = next(line for line in state.tail if "terminating on signal" in line)
        what = f"QEMU was stopped from outside ({killed.strip()})"
    elif timed_out is not None:
        what = f"the guest did not finish within {timed_out:g} s (hang or too slow) and was killed"
        if state.watchdog:
            what += " (what each guest process waited on is listed near the end of the console log)"
    elif exit_code not in (None, 0):
        last = next((line for line in reversed(state.tail) if line.strip()), "no output")
        what = f"QEMU exited with status {exit_code} before the guest reported ({last.strip()})"
    else:
        what = "the guest powered off without reporting the command's exit status"
    return f"{what}; console log: {log}"


# Cursor moves, screen clears and mode switches (OVMF clears the screen on the serial line);
# colours (SGR, `m`) pass.
_SCREEN_CONTROL = re.compile(rb"\x1b\[[0-9;=?]*[ABCDEFGHJKSTfhlsu]")
_UNFINISHED = re.compile(rb"\x1b(\[[0-9;=?]*)?\Z")


class ScreenFilter:
    """What the user's terminal may show of the guest console: no clear-screen, no cursor jumps.

    Serial output arrives a few bytes at a time, so a sequence cut at the end of a chunk is held
    back until the next one completes it.
    """

    def __init__(self) -> None:
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk
        cut = _UNFINISHED.search(data)
        self._held = data[cut.start():] if cut else b""
        return _SCREEN_CONTROL.sub(b"", data[:cut.start()] if cut else data)


def _stream(
    proc: subprocess.Popen[bytes], state: ConsoleState, log: BinaryIO, sink: BinaryIO | None, deadline: float | None,
    grace: float = POWEROFF_GRACE,
) -> bool:
    """Copy QEMU's output until it exits; False if the deadline passed first."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    pending = b""
    screen = ScreenFilter()
    finished_at: float | None = None
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        if finished_at is not None and now - finished_at > grace:
            return True  # reported, but did not power off: stop it, the answer is in
        wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - now))
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            if proc.poll() is not None:
                return True
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            proc.wait()
            return True
        log.write(chunk)
        log.flush()  # the log must tell what happened even if this process is killed
        if sink is not None:
            sink.write(screen.feed(chunk))
            sink.flush()
        lines, pending = split_lines(pending + chunk)
        for line in lines:
            state.feed(line)
        if state.finished and finished_at is None:
            finished_at = time.monotonic()


def run_vm(
    request: RunRequest,
    config: VmConfig | None = None,
    reporter: Reporter | None = None,
    console: BinaryIO | None = None,
) -> RunOutcome:
    """Boot once and run REQUEST.command; raise VmError if the VM cannot even start."""
    config = config or VmConfig.from_env()
    reporter = reporter or SilentReporter()
    project = request.project.resolve()
    if not project.is_dir():
        raise VmError("ENOENT", f"project directory {project} does not exist")
    host.require_tools(host.RUN_TOOLS)
    if request.initramfs and (request.systemd or request.state is not None):
        raise VmError("EINVAL", "--initramfs boots the PID-1 script from a rootfs that is never kept: "
                                "it goes with neither --systemd nor --state")
    if request.uefi_db is not None:  # a bad certificate fails before any work
        uefi.require_firmware()
        uefi.load_certificate(request.uefi_db)
    image = ensure_image(config, reporter)
    root = state_root(request.state, image) if request.state is not None else image.root
    run_dir = _new_run_dir(config)
    host.require_space(run_dir, 1 * host.GIB, "booting the VM")
    log_path = run_dir / "console.log"
    build_log = run_dir / "disks.log"
    build_log.touch()
    nonce = secrets.token_hex(8)
    terminal = console is not None and console.isatty()
    columns = shutil.get_terminal_size((0, 0)).columns if terminal else None
    script = command_script(request, terminal, columns)
    started = time.monotonic()
    try:
        with reporter.step(f"copying {project} to the VM's /work disk"):
            stage = run_dir / "work"
            skip = (config.cache_dir,) + ((request.results,) if request.results else ())
            stage_project(project, stage, skip)
            make_work_image(stage, run_dir / "work.img", build_log)
            shutil.rmtree(stage)
        control = {"nonce": nonce.encode(), "command.sh": script.encode()}
        watchdog = watchdog_seconds(request)
        if watchdog is not None:
            control["watchdog"] = str(watchdog).encode()
        make_control_disk(run_dir / "ctl.img", control)
        make_results_disk(run_dir / "results.img")
        spec = BootSpec(
            kernel=image.kernel,
            root=None if request.initramfs else root,
            initramfs=image.initramfs if request.initramfs else None,
            disks=(
                Disk("ctl", run_dir / "ctl.img", readonly=True),
                Disk("work", run_dir / "work.img"),
                Disk("results", run_dir / "results.img"),
            ),
            memory_mib=config.initramfs_memory_mib if request.initramfs else config.memory_mib,
            # under -icount, two CPUs: 6.1 never brings the second up, and 6.12 twice died in SLUB's
            # cmpxchg16b fast path (double fault, garbage EFLAGS) during the benchmark, never one.
            cpus=1 if request.icount else config.cpus,
            icount=request.icount,
            snapshot=request.state is None,
            **_systemd_boot(request),
            **_merge_args(_uefi_boot(request, run_dir), request),
        )
        state = ConsoleState(nonce)
        reporter.note(
            f"booting Linux {image.manifest.get('kernel_release')} (line {image.manifest.get('line')}, "
            f"Debian {image.manifest.get('suite')}) under QEMU TCG"
            + (" from an initramfs" if request.initramfs else "")
            + (" with systemd as PID 1" if request.systemd else "")
            + (f" from the kept root disk of {request.state}" if request.state is not None else "")
            + (" with -icount" if request.icount else "")
            + (f" under UEFI, {request.uefi_db.name} in db" if request.uefi_db else "")
            + f" (console log: {log_path})"
        )
        deadline = None if request.timeout <= 0 else time.monotonic() + request.timeout
        with log_path.open("wb") as log, _terminate_interrupts():
            try:
                proc = subprocess.Popen(
                    spec.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
            except OSError as err:
                raise VmError("ENOENT", f"cannot start QEMU: {err.strerror}") from None
            try:
                grace = SYSTEMD_POWEROFF_GRACE if request.systemd else POWEROFF_GRACE
                in_time = _stream(proc, state, log, console, deadline, grace)
            finally:
                _stop(proc)
        seconds = time.monotonic() - started
        if state.status is None:
            reason = _why(state, proc.returncode, None if in_time else request.timeout, log_path)
            return RunOutcome(NO_REPORT, log_path, seconds, reason=reason)
        outcome = RunOutcome(state.status, log_path, seconds)
        if request.results is not None:
            if state.results == "ok":
                outcome.results = extract_results(run_dir / "results.img", request.results)
            else:
                outcome.warnings.append(
                    f"the guest did not write /results ({state.results or 'no report'}); console log: {log_path}"
                )
            try:
                shutil.copyfile(log_path, request.results / "vm-console.log")
            except OSError:
                pass
        return outcome
    finally:
        for name in ("work.img", "ctl.img", "results.img", "uefi-vars.fd"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "work", ignore_errors=True)


def _merge_args(uefi: dict[str, object], request: RunRequest) -> dict[str, object]:
    """The UEFI fields with the systemd kernel arguments added (both may apply)."""
    if not request.systemd:
        return uefi
    return {**uefi, "kernel_args": (*uefi.get("kernel_args", ()), *SYSTEMD_KERNEL_ARGS)}  # type: ignore[misc]


def run_in_vm(
    command: list[str],
    project: Path,
    results: Path | None = None,
    timeout: float = 3600.0,
    initramfs: bool = False,
    icount: bool = False,
    uefi_db: Path | None = None,
    kernel: str | None = None,
) -> int:
    """Run COMMAND as root in /work of a fresh test VM and return its exit status.

    KERNEL is a line (6.1, 6.12, 7.x) or an exact release; default $IPE_BPF_VM_KERNEL, else 6.12.

    The console streams to stdout.  Returns 125 (and says why on stderr) when the guest
    never reported a status: kernel panic, hang past TIMEOUT seconds, QEMU failure.  Raises
    VmError when the VM cannot be started at all (no QEMU, no image and no root to build
    one, no disk space, corrupt cache).
    """
    outcome = run_vm(
        RunRequest(tuple(command), project, results, timeout, initramfs, icount, uefi_db=uefi_db),
        VmConfig.from_env(kernel=kernel),
        console=sys.stdout.buffer,
    )
    for warning in outcome.warnings:
        print(f"ipe-bpf vm: warning: {warning}", file=sys.stderr)
    if outcome.reason is not None:
        print(f"ipe-bpf vm: {outcome.reason}", file=sys.stderr)
    return outcome.status
