"""ipe-bpf as a service, in three boots of one kept root disk with systemd as PID 1.

Not collected by `pytest tests/vm` (no test_ prefix): tests/host_vm/test_service_boots.py runs
    ipe-bpf vm run --systemd --state DIR -- python3 -m pytest tests/vm/service_boots.py::TestBootN
for N = 1, 2, 3 with the same DIR, so each class sees what the boots before it left on disk.

- Boot 1: `ipe-bpf service install --now`, a policy that denies one binary, success audit on,
  permissive; a unit of our own (``ipe-bpf-test-early.service``) ordered right after
  ipe-bpf.service and before sysinit.target notes, at every later boot, what was in force
  before any ordinary service or login.
- Boot 2: permissive and success audit were restored at boot, the policy decided (DENY,
  enforcing=0) before logins; boot 1's records are still in the durable log; the stress workload
  loses nothing (durable log, journald, ausearch); two `audit tail --follow` readers each see
  every record; serials are unique; above the daemon's capacity (daemon stopped) a lost record
  carries the kernel's drop count.  Ends with `enforce on`.
- Boot 3: the denied binary fails before any login; SIGKILL of the daemon: enforcement goes on,
  systemd restarts it, nothing written meanwhile is lost or duplicated; daemon stop/start,
  unload and load are recorded.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from ipe_bpf.service.durable import rotation_lock
from ipe_bpf.service.records import LogRecord, group, parse_line

WORK = Path("/work")
TEST_DIR = Path("/var/lib/ipe-test")
DENIED = TEST_DIR / "denied"
LOG = Path("/var/log/ipe-bpf/audit.log")
STATUS = Path("/run/ipe-bpf/auditd.status")
EARLY_UNIT = Path("/etc/systemd/system/ipe-bpf-test-early.service")
EARLY_SCRIPT = TEST_DIR / "early.sh"
STRESS = Path("/tmp/ipe-stress")
ENV = {**os.environ, "PYTHONPATH": str(WORK)}

EARLY_UNIT_TEXT = f"""\
# test only: what is in force right after ipe-bpf.service, before sysinit.target (so before
# every ordinary service, systemd-user-sessions and getty)
[Unit]
Description=ipe-bpf test: enforcement before logins
DefaultDependencies=no
After=ipe-bpf.service
Before=sysinit.target

[Service]
Type=oneshot
ExecStart=/bin/sh {EARLY_SCRIPT}

[Install]
WantedBy=sysinit.target
"""

EARLY_SCRIPT_TEXT = f"""\
out={TEST_DIR}/early-$(cat /proc/sys/kernel/random/boot_id)
mkdir -p "$out"
systemctl is-active systemd-user-sessions.service > "$out/sessions"
systemctl is-active ipe-bpf.service > "$out/ipe-bpf"
{DENIED}; echo $? > "$out/denied-status"
PYTHONPATH={WORK} python3 -m ipe_bpf status --json > "$out/status.json" 2> "$out/status.err"
"""


# ---------------------------------------------------------------------------- helpers


def sh(*argv: str | Path, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=ENV, **kw)  # type: ignore[call-overload]
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def ipe(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("python3", "-m", "ipe_bpf", *args, check=check)


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise AssertionError("no btime in /proc/stat")


def wait_until(what: str, ready: Callable[[], object], timeout: float = 300) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def unit_prop(unit: str, prop: str) -> str:
    return sh("systemctl", "show", f"--property={prop}", "--value", unit).stdout.strip()


def daemon_pid() -> int:
    return int(unit_prop("ipe-bpf-auditd.service", "MainPID"))


def log_records(since: float | None = None) -> list[LogRecord]:
    """Every record of the durable log and its rotated files, oldest first (this boot's only
    with ``since``: serials start again at 1 on every boot)."""
    with rotation_lock(LOG, exclusive=False):  # the daemon rotates meanwhile: open the files it names now
        rotated = [p for p in LOG.parent.glob("audit.log.*") if p.suffix[1:].isdigit()]
        files = [(p, p.open("rb")) for p in sorted(rotated, key=lambda p: -int(p.suffix[1:])) + [LOG]]
    out = []
    for path, f in files:
        with f:
            data = f.read()
        for text in data.decode("utf-8", "surrogateescape").split("\n")[:-1]:
            rec = parse_line(text)
            assert rec is not None, f"{path}: not a record: {text[:200]!r}"
            if since is None or rec.time >= since:
                out.append(rec)
    return out


def next_serial() -> int:
    return int(Path("/run/ipe-bpf/serial").read_text().split()[1])


def drained(after_ns: int) -> bool:
    """The daemon reported, after ``after_ns``, an empty ring buffer and no sink behind."""
    try:
        report = json.loads(STATUS.read_text())
    except (OSError, ValueError):
        return False
    sinks = report.get("sinks") or {}
    return (report.get("updated_ns", 0) > after_ns and report.get("ring_pending") == 0
            and all(s.get("lag_bytes") == 0 and not s.get("error") for s in sinks.values()))


def wait_drained(timeout: float = 600) -> None:
    mark = time.time_ns()
    time.sleep(1.5)
    wait_until("the audit daemon to write every record to every sink", lambda: drained(mark), timeout)


def stress(workers: int, execs: int, tag: str) -> list[str]:
    """``workers`` shells, each copying a binary to a fresh file and running it ``execs`` times
    (a new inode every time: no cached decision); the paths that ran."""
    base = STRESS / tag
    sh("mkdir", "-p", base)
    script = ("i=0; while [ $i -lt {n} ]; do i=$((i+1)); cp /usr/bin/true {d}/b$i && {d}/b$i && "
              "echo {d}/b$i >> {d}.done; done")
    procs = []
    for w in range(workers):
        d = base / f"w{w}"
        d.mkdir()
        procs.append(subprocess.Popen(["sh", "-c", script.format(n=execs, d=d)]))
    for p in procs:
        assert p.wait(900) == 0
    return [line for w in range(workers) for line in (base / f"w{w}.done").read_text().split()]


def bprm_paths(records: Iterable[LogRecord], prefix: str) -> list[str]:
    out = []
    for rec in records:
        if rec.type == 1420 and " ipe_hook=BPRM_CHECK " in rec.body:
            path = rec.body.split(' path="', 1)[1].split('"', 1)[0] if ' path="' in rec.body else ""
            if path.startswith(prefix):
                out.append(path)
    return out


def journal_paths(prefix: str) -> list[tuple[str, int]]:
    done = sh("journalctl", "-b", "-t", "ipe-bpf", "IPE_OP=EXECUTE", "IPE_HOOK=BPRM_CHECK", "-o", "json",
              "--output-fields=IPE_PATH,IPE_SERIAL", "--no-pager")
    out = []
    for line in done.stdout.splitlines():
        entry = json.loads(line)
        path = entry.get("IPE_PATH")
        if isinstance(path, list):
            path = bytes(path).decode("utf-8", "replace")
        if path and path.startswith(prefix):
            out.append((path, int(entry["IPE_SERIAL"])))
    return out


def settled(fetch: Callable[[], list[tuple[str, int]]], want: int, timeout: float = 120) -> list[tuple[str, int]]:
    """``fetch()`` once it holds ``want`` entries (or at ``timeout``).  A sink at lag 0 has handed
    every record to journald or auditd; they write it to disk a moment later."""
    sh("journalctl", "--sync", check=False)
    deadline = time.monotonic() + timeout
    while len(found := fetch()) < want and time.monotonic() < deadline:
        time.sleep(2)
    return found


def ausearch_paths(prefix: str) -> list[tuple[str, int]]:
    done = sh("ausearch", "-m", "MAC_CHECK", "--raw", check=False)
    assert done.returncode in (0, 1), done.stderr  # 1: nothing found
    out = []
    for line in done.stdout.splitlines():
        if "ipe_hook=BPRM_CHECK" in line and f'path="{prefix}' in line:
            path = line.split(' path="', 1)[1].split('"', 1)[0]
            out.append((path, int(line.split("ipe_serial=", 1)[1].split()[0].rstrip("'"))))
    return out


def lost_counts(records: Iterable[LogRecord]) -> list[str]:
    return [rec.body.split()[1].removeprefix("lost=") for rec in records
            if rec.type == 1121 and rec.body.startswith("op=lost ") and " sink=" not in rec.body]


def early_facts() -> dict[str, str]:
    out = TEST_DIR / f"early-{boot_id()}"
    assert out.is_dir(), f"ipe-bpf-test-early.service left nothing in {out} this boot"
    return {p.name: p.read_text().strip() for p in out.iterdir()}


def run_denied() -> int:
    """The exit status of the denied binary run by a shell: 0 when it ran, 126 when exec failed."""
    return subprocess.run(["sh", "-c", f"exec {DENIED}"], capture_output=True).returncode


def denied_digest() -> str:
    return sh("fsverity", "measure", DENIED).stdout.split()[0]


def mmap_records(count: int) -> None:
    """``count`` PROT_EXEC mappings of one file: one MMAP decision (audited: success audit) each."""
    with open("/usr/bin/true", "rb") as f:
        for _ in range(count):
            mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC, flags=mmap.MAP_PRIVATE).close()


# ---------------------------------------------------------------------------- boot 1


class TestBoot1:
    def test_install_enable_deploy_activate_permissive(self) -> None:
        assert Path("/proc/1/comm").read_text().strip() == "systemd"
        installed = ipe("service", "install", "--now")
        assert "enabled ipe-bpf.service and ipe-bpf-auditd.service" in installed.stdout
        for unit in ("ipe-bpf.service", "ipe-bpf-auditd.service"):
            assert unit_prop(unit, "UnitFileState") == "enabled"
            assert unit_prop(unit, "ActiveState") == "active", sh("systemctl", "status", unit, check=False).stdout
        TEST_DIR.mkdir(parents=True, exist_ok=True)
        DENIED.write_bytes(Path("/usr/bin/true").read_bytes() + b"\0")  # another digest than true's
        DENIED.chmod(0o755)
        sh("fsverity", "enable", DENIED)
        pol = TEST_DIR / "svc.pol"
        pol.write_text("policy_name=svc_test policy_version=0.0.1\nDEFAULT action=ALLOW\n"
                       f"op=EXECUTE fsverity_digest={denied_digest()} action=DENY\n")
        ipe("policy", "deploy", "--unsigned", str(pol))
        ipe("policy", "activate", "svc_test")
        assert run_denied() == 126  # enforcing: refused
        ipe("success-audit", "on")
        ipe("enforce", "off")
        assert run_denied() == 0  # permissive: runs, audited
        EARLY_SCRIPT.write_text(EARLY_SCRIPT_TEXT)
        EARLY_UNIT.write_text(EARLY_UNIT_TEXT)
        sh("systemctl", "daemon-reload")
        sh("systemctl", "enable", EARLY_UNIT.name)

    def test_records_of_boot_1_are_in_the_durable_log(self) -> None:
        wait_drained()
        records = log_records(since=boot_time())
        denials = [r for r in records if r.type == 1420 and f'path="{DENIED}"' in r.body]
        modes = [r.body.split(" enforcing=")[1][0] for r in denials]
        assert modes[0] == "1" and set(modes[1:]) == {"0"}, modes  # refused; then ran (exec, mmap) audited
        types = {r.type for r in records}
        assert {1130, 1404, 1422, 1421, 1420} <= types  # daemon start, load + enforce off, deploy, activate
        assert any(r.type == 1404 and r.body.endswith("enabled=1 old-enabled=0 lsm=ipe res=1") for r in records)
        (TEST_DIR / "boot1-records").write_text("".join(r.text + "\n" for r in denials))
        status = json.loads(ipe("status", "--json").stdout)
        assert status["audit_daemon"]["running"] and status["audit_daemon"]["pid"] == daemon_pid()


# ---------------------------------------------------------------------------- boot 2


class TestBoot2:
    def test_settings_restored_at_boot_and_decided_before_logins(self) -> None:
        facts = early_facts()
        assert facts["sessions"] == "inactive" and facts["ipe-bpf"] == "active", facts
        status = json.loads(facts["status.json"])
        assert status["loaded"] and status["enforcing"] is False and status["success_audit"] is True, status
        assert status["active_policy"]["name"] == "svc_test"
        assert facts["denied-status"] == "0"  # permissive: it ran ...
        wait_drained()
        mine = [r for r in log_records(since=boot_time()) if r.type == 1420 and f'path="{DENIED}"' in r.body]
        assert mine and all(" enforcing=0 " in r.body and r.body.endswith('action=DENY"') for r in mine)  # ... audited

    def test_boot_1_records_are_still_there(self) -> None:
        before = (TEST_DIR / "boot1-records").read_text().splitlines()
        assert len(before) >= 2
        texts = {r.text for r in log_records()}
        assert set(before) <= texts

    def test_stress_loses_nothing_in_any_sink_and_two_followers_see_everything(self) -> None:
        readers = [subprocess.Popen(["python3", "-m", "ipe_bpf", "audit", "tail", "--follow", "--json", "-n", "0"],
                                    env=ENV, stdout=open(f"/tmp/reader{i}.json", "w"), stderr=subprocess.DEVNULL)
                   for i in range(2)]
        time.sleep(10)  # the readers are at the end of the log
        assert os.getpriority(os.PRIO_PROCESS, daemon_pid()) == -10  # the unit's Nice=: ahead of the workload
        drops = json.loads(ipe("status", "--json").stdout)["counters"]["dropped"]
        start = next_serial()
        ran = stress(10, 30, "boot2")
        wait_drained()
        end = next_serial()
        assert len(ran) == 300
        window = [r for r in log_records(since=boot_time()) if start <= r.serial < end]
        logged = bprm_paths(window, str(STRESS / "boot2"))
        assert sorted(logged) == sorted(ran)  # every exec once, nothing twice
        assert [r.body for r in window if r.type == 1121 and r.body.startswith("op=lost ")] == []
        assert json.loads(ipe("status", "--json").stdout)["counters"]["dropped"] == drops
        journal = settled(lambda: journal_paths(str(STRESS / "boot2")), len(ran))
        assert sorted(p for p, _ in journal) == sorted(ran)
        audited = settled(lambda: ausearch_paths(str(STRESS / "boot2")), len(ran))
        assert sorted(p for p, _ in audited) == sorted(ran)
        by_serial = {r.serial: r for r in window if r.type == 1420}
        for path, serial in journal + audited:  # the same serial in every sink
            assert f'path="{path}"' in by_serial[serial].body
        time.sleep(3)
        for reader in readers:
            reader.send_signal(signal.SIGINT)
            reader.wait(60)
        for i in range(2):
            events = [json.loads(line) for line in Path(f"/tmp/reader{i}.json").read_text().splitlines()]
            seen = [e["path"] for e in events if e["type"] == 1420 and e["ipe_hook"] == "BPRM_CHECK"
                    and str(e.get("path", "")).startswith(str(STRESS / "boot2"))]
            assert sorted(seen) == sorted(ran), f"reader {i}"
            assert all(e["uid"] == 0 and e["exe"] for e in events if e["type"] == 1420)

    def test_serials_are_unique_in_this_boot(self) -> None:
        # the journal first: success audit is on, so running journalctl makes records of its own,
        # which reach the log before the journal (the daemon writes the log first)
        journal = sh("journalctl", "-b", "-t", "ipe-bpf", "-o", "json", "--output-fields=IPE_SERIAL", "--no-pager")
        js = [int(json.loads(line)["IPE_SERIAL"]) for line in journal.stdout.splitlines()]
        events = list(group(log_records(since=boot_time())))
        serials = [e.record.serial for e in events]
        assert len(serials) == len(set(serials)), sorted(s for s in set(serials) if serials.count(s) > 1)[:20]
        assert len(js) == len(set(js)) and set(js) <= set(serials), sorted(set(js) - set(serials))[:20]

    def test_above_capacity_the_lost_record_has_the_kernels_count(self) -> None:
        wait_drained()
        before = json.loads(ipe("status", "--json").stdout)["counters"]["dropped"]
        start = next_serial()
        pid = daemon_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            mmap_records(10000)  # the default 4 MiB ring buffer holds about 6900
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_drained()
        dropped = json.loads(ipe("status", "--json").stdout)["counters"]["dropped"] - before
        assert dropped > 1000
        window = [r for r in log_records(since=boot_time()) if r.serial >= start]
        lost = lost_counts(window)
        assert lost and sum(int(n) for n in lost) == dropped, (lost, dropped)
        assert any("reason=ring_buffer_full" in r.body for r in window if r.type == 1121)

    def test_enforce_on_for_the_next_boot(self) -> None:
        ipe("enforce", "on")
        assert run_denied() == 126


# ---------------------------------------------------------------------------- boot 3


class TestBoot3:
    def test_denied_before_any_login(self) -> None:
        facts = early_facts()
        assert facts["sessions"] == "inactive" and facts["ipe-bpf"] == "active", facts
        assert facts["denied-status"] == "126", facts  # sh: Permission denied
        status = json.loads(facts["status.json"])
        assert status["enforcing"] is True and status["success_audit"] is True

    def test_sigkill_of_the_daemon(self) -> None:
        wait_drained()
        pid, restarts = daemon_pid(), int(unit_prop("ipe-bpf-auditd.service", "NRestarts"))
        start = next_serial()
        os.kill(pid, signal.SIGKILL)
        ran = stress(2, 10, "boot3")  # while it is down (or just back)
        assert run_denied() == 126  # enforcement goes on
        wait_until("systemd to restart the audit daemon",
                   lambda: daemon_pid() not in (0, pid)
                   and int(unit_prop("ipe-bpf-auditd.service", "NRestarts")) > restarts, 60)
        wait_drained()
        window = [r for r in log_records(since=boot_time()) if r.serial >= start]
        logged = bprm_paths(window, str(STRESS / "boot3"))
        lost = sum(int(n) for n in lost_counts(window) if n.isdigit())
        assert len(logged) == len(set(logged)), "nothing twice"
        assert set(logged) <= set(ran) and len(logged) + lost >= len(ran), (len(logged), lost, len(ran))
        assert any(r.type == 1130 and f" pid={daemon_pid()} " in f" {r.body} " for r in window)  # restarted

    def test_stop_start_unload_load_are_recorded(self) -> None:
        start = next_serial()
        sh("systemctl", "stop", "ipe-bpf-auditd.service")
        ipe("unload")
        assert run_denied() == 0  # nothing enforced
        ipe("load")
        assert run_denied() == 126  # the stored mode again: enforcing
        sh("systemctl", "start", "ipe-bpf-auditd.service")
        wait_drained()
        window = sorted((r for r in log_records(since=boot_time()) if r.serial >= start), key=lambda r: r.serial)
        kinds = [(r.type, r.body.split(" lsm=")[0].split()[-1] if r.type == 1404 else r.body.split()[0])
                 for r in window if r.type in (1130, 1131, 1404)]
        # by serial: the daemon's stop, unload, load (handed over through the spool while it was
        # stopped), the daemon's start
        assert kinds[:4] == [(1131, "op=stop"), (1404, "old-enabled=1"), (1404, "old-enabled=0"), (1130, "op=start")], kinds

    def test_a_failed_load_is_a_failed_unit_with_one_clear_journal_line(self) -> None:
        """boot_failure = open (the default): the unit fails, says NOT ENFORCING, boot goes on."""
        state = Path("/var/lib/ipe-bpf/state.json")
        saved = state.read_bytes()
        ipe("unload")
        try:
            state.write_text("{ damaged")
            assert sh("systemctl", "restart", "ipe-bpf.service", check=False).returncode != 0
            assert unit_prop("ipe-bpf.service", "ActiveState") == "failed"
            assert unit_prop("ipe-bpf.service", "ExecMainStatus") not in ("", "0")
            journal = sh("journalctl", "-b", "-u", "ipe-bpf.service", "--no-pager", "-o", "cat").stdout
            assert "ipe-bpf: NOT ENFORCING: loading at boot failed" in journal, journal[-2000:]
            assert "state.json" in journal
        finally:
            state.write_bytes(saved)
        sh("systemctl", "restart", "ipe-bpf.service")
        assert run_denied() == 126
