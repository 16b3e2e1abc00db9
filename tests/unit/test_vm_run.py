"""One boot, driven against a fake QEMU: exit status, results, and the 125 cases."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from ipe_bpf.vm.config import VmConfig
from ipe_bpf.vm.image import image_key
from ipe_bpf.vm.run import NO_REPORT, RunRequest, run_vm

FAKE_QEMU = """\
#!{python}
# Stands in for qemu-system-x86_64: reads the control disk like the guest's PID 1 would.
import io, re, sys, tarfile, time
args = sys.argv[1:]
drives = {{}}
for i, a in enumerate(args):
    if a == "-drive":
        fields = dict(f.split("=", 1) for f in args[i + 1].split(","))
        drives[fields["id"]] = fields["file"]
nonce = tarfile.open(drives["ctl"]).extractfile("nonce").read().decode()
script = tarfile.open(drives["ctl"]).extractfile("command.sh").read().decode()
behaviour = {behaviour!r}
print("booting", flush=True)
print("ARGV " + " ".join(args), flush=True)
if behaviour == "ok":
    status = int(re.search(r"exec .*exit (\\d+)", script).group(1))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("./out.txt"); data = b"from the guest"; info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with open(drives["results"], "r+b") as disk:
        disk.write(buf.getvalue())
    print("IPE-BPF-VM-STATUS deadbeef 0")          # another nonce: ignored
    print(f"IPE-BPF-VM-STATUS {{nonce}} {{status}}")
    print(f"IPE-BPF-VM-RESULTS {{nonce}} ok")
elif behaviour == "panic":
    print("[ 1.0] Kernel panic - not syncing: Attempted to kill init!")
elif behaviour == "hang":
    time.sleep(60)
elif behaviour == "broken":
    print("qemu-system-x86_64: -drive file=x: Could not open 'x'", file=sys.stderr)
    sys.exit(1)
"""


def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: str, kernel: str = "6.12") -> VmConfig:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text(FAKE_QEMU.format(python=sys.executable, behaviour=behaviour))
    qemu.chmod(0o755)
    for tool in ("mke2fs",):
        fake = bin_dir / tool
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    config = VmConfig(cache_dir=tmp_path / "cache", kernel=kernel)
    key = image_key(config)
    image = config.images_dir / key
    image.mkdir(parents=True)
    files = {"root.img": b"r", "vmlinuz": b"k", "rootfs.cpio": b"i"}
    for name, data in files.items():
        (image / name).write_bytes(data)
    (image / "manifest.json").write_text(
        json.dumps({"key": key, "kernel_release": "x", "files": {n: len(d) for n, d in files.items()}})
    )
    return config


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "a.txt").write_text("a")
    return project


def test_status_and_results_come_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _env(tmp_path, monkeypatch, "ok")
    results = tmp_path / "results"
    outcome = run_vm(RunRequest(("sh", "-c", "exit 3"), _project(tmp_path), results, timeout=60), config)
    assert outcome.reported and outcome.status == 3, outcome.reason
    assert (results / "out.txt").read_text() == "from the guest"
    assert "booting" in (results / "vm-console.log").read_text()
    assert outcome.console_log.is_file()
    assert not list(outcome.console_log.parent.glob("*.img"))  # disks are not kept


@pytest.mark.parametrize(
    "behaviour, words",
    [
        ("panic", "kernel panicked: Attempted to kill init!"),
        ("broken", "QEMU exited with status 1"),
        ("hang", "did not finish within 2 s"),
    ],
)
def test_no_report_is_125_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: str, words: str
) -> None:
    config = _env(tmp_path, monkeypatch, behaviour)
    outcome = run_vm(RunRequest(("true",), _project(tmp_path), None, timeout=2), config)
    assert outcome.status == NO_REPORT
    assert outcome.reason is not None and words in outcome.reason
    assert str(outcome.console_log) in outcome.reason


def test_watchdog_fires_before_the_timeout() -> None:
    from ipe_bpf.vm.run import watchdog_seconds

    assert watchdog_seconds(RunRequest(("true",), Path("."), timeout=600)) == 570
    assert watchdog_seconds(RunRequest(("true",), Path("."), timeout=0)) is None
    assert watchdog_seconds(RunRequest(("true",), Path("."), timeout=600, icount=True)) is None
    assert watchdog_seconds(RunRequest(("true",), Path("."), timeout=20)) is None


def test_streamed_console_drops_screen_control_but_keeps_colours() -> None:
    from ipe_bpf.vm.run import ScreenFilter

    ovmf = b"\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01Hboot\n"
    assert ScreenFilter().feed(ovmf) == b"boot\n"
    assert ScreenFilter().feed(b"\x1b[1m==> ok\x1b[0m\n") == b"\x1b[1m==> ok\x1b[0m\n"
    byte_by_byte = ScreenFilter()
    assert b"".join(byte_by_byte.feed(ovmf[i:i + 1]) for i in range(len(ovmf))) == b"boot\n"


def test_systemd_boot_from_a_kept_root_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--systemd: systemd is PID 1 with the image's two runner units wanted; --state: the first
    boot copies the image's root disk into DIR and every boot runs on it without snapshot=on."""
    from ipe_bpf.errors import VmError

    config = _env(tmp_path, monkeypatch, "ok")
    state = tmp_path / "state"
    for _ in range(2):
        request = RunRequest(("sh", "-c", "exit 0"), _project_once(tmp_path), None, timeout=60, systemd=True, state=state)
        outcome = run_vm(request, config)
        assert outcome.reported and outcome.status == 0, outcome.reason
        argv = next(line for line in outcome.console_log.read_text().splitlines() if line.startswith("ARGV "))
        assert "init=/lib/systemd/systemd " in argv and "systemd.wants=ipe-bpf-vm-run.service" in argv
        assert "systemd.mask=serial-getty@ttyS0.service" in argv
        assert f"file={state}/root.img,if=none,id=root,format=raw,cache=unsafe " in argv + " "  # no snapshot=on
    assert (state / "root.img").read_bytes() == b"r"
    (state / "image").write_text("another-image\n")
    with pytest.raises(VmError) as err:
        run_vm(RunRequest(("true",), _project_once(tmp_path), None, timeout=60, state=state), config)
    assert err.value.errno_name == "ESTALE" and "another-image" in str(err.value)
    with pytest.raises(VmError) as err:
        run_vm(RunRequest(("true",), _project_once(tmp_path), None, timeout=60, initramfs=True, systemd=True), config)
    assert err.value.errno_name == "EINVAL"


def _project_once(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    return project if project.is_dir() else _project(tmp_path)


def test_pruning_old_runs_never_takes_a_running_ones_directory(tmp_path: Path) -> None:
    import os
    import subprocess

    from ipe_bpf.vm import run as run_mod

    config = VmConfig(cache_dir=tmp_path / "cache")
    config.runs_dir.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    running = config.runs_dir / f"20000101-000000-{os.getpid()}-aaaa"  # the oldest, still running
    running.mkdir()
    finished = [config.runs_dir / f"20000101-0000{n:02d}-{gone.pid}-bbbb" for n in range(1, 15)]
    for d in finished:
        d.mkdir()
    new = run_mod._new_run_dir(config)
    assert running.is_dir()
    left = sorted(p for p in config.runs_dir.iterdir() if p != new and p != running)
    assert left == finished[-(run_mod.KEEP_RUNS - 1):]


def test_sigterm_stops_qemu_and_removes_the_disks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed `vm run` (SIGTERM) leaves no guest running and no disks behind."""
    config = _env(tmp_path, monkeypatch, "hang")
    fake = str(tmp_path / "bin" / "qemu-system-x86_64")

    def running() -> list[str]:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if fake.encode() in (proc / "cmdline").read_bytes():
                    found.append(proc.name)
            except OSError:
                pass
        return found

    def kill_when_booted() -> None:
        deadline = time.monotonic() + 30
        while not running() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_when_booted, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_vm(RunRequest(("true",), _project(tmp_path), None, timeout=0), config)
    assert running() == []
    assert not list(config.cache_dir.rglob("work.img"))


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
@pytest.mark.parametrize("icount, cpus", [(True, "1"), (False, "2")])
def test_icount_boots_one_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str, icount: bool,
                              cpus: str) -> None:
    config = _env(tmp_path, monkeypatch, "ok", kernel)
    results = tmp_path / "results"
    outcome = run_vm(RunRequest(("sh", "-c", "exit 0"), _project(tmp_path), results, timeout=0, icount=icount), config)
    argv = next(line for line in (results / "vm-console.log").read_text().splitlines() if line.startswith("ARGV "))
    assert outcome.reported and f" -smp {cpus} " in argv and (" -icount shift=0,sleep=on" in argv) == icount
