"""`ipe-bpf auditd` and `ipe-bpf service status` through the CLI (this host has no ipe-bpf loaded)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from ipe_bpf.cli.service import _standalone, describe_daemon
from ipe_bpf.service.records import parse_line


def write_conf(tmp: Path, extra: str = "") -> Path:
    conf = tmp / "ipe-bpf.conf"
    conf.write_text(f"log_file = {tmp}/log/audit.log\njournal = no\nkernel_audit = no\n{extra}")
    return conf


def test_bad_config_is_one_line_and_status_1(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "log_keep = many\n")
    result = CliRunner().invoke(_standalone(), ["auditd", "--config", str(conf)])
    assert result.exit_code == 1
    assert result.output.strip() == (f"{conf}:4: EINVAL: log_keep: expected a number of files "
                                     f"from 1 to 1000, got 'many'")


def test_auditd_runs_until_sigterm_and_records_its_start_and_stop(tmp_path: Path) -> None:
    conf = write_conf(tmp_path)
    env = {**os.environ, "IPE_BPF_RUN_DIR": str(tmp_path / "run"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "ipe_bpf.cli.service", "auditd", "--config", str(conf)],
                            env=env, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log" / "audit.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.exists() and log.read_text()):
        time.sleep(0.1)
    status = CliRunner(env={"IPE_BPF_RUN_DIR": str(tmp_path / "run")}).invoke(
        _standalone(), ["service", "status", "--json", "--config", str(conf)])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    types = [parse_line(t).type for t in log.read_text().split("\n")[:-1]]  # type: ignore[union-attr]
    assert types == [1130, 1131]
    data = json.loads(status.output)
    assert data["daemon"]["running"] and data["daemon"]["pid"] == proc.pid
    text = describe_daemon(data["daemon"])
    assert text[0].startswith(f"audit daemon: pid {proc.pid}, waiting for `ipe-bpf load`, 0 records waiting")


def test_status_when_no_daemon_runs(tmp_path: Path) -> None:
    conf = write_conf(tmp_path)
    result = CliRunner(env={"IPE_BPF_RUN_DIR": str(tmp_path / "run")}).invoke(
        _standalone(), ["service", "status", "--json", "--config", str(conf)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["daemon"] == {"running": False, "pid": None, "log": f"{tmp_path}/log/audit.log"}
    assert describe_daemon(data["daemon"])[0].startswith("audit daemon: not running")


def test_audit_tail_reads_the_durable_log_while_the_daemon_runs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With a writer holding the log lock, `audit tail` prints from the log (the ring buffer is
    not touched); without one, from the ring buffer, numbered from the per-boot sequence."""
    import ipe_bpf.kernel.events as events
    from ipe_bpf.cli import app
    from ipe_bpf.service.durable import LogWriter

    conf = write_conf(tmp_path)
    monkeypatch.setenv("IPE_BPF_CONFIG", str(conf))
    ring_reads: list[dict] = []
    monkeypatch.setattr(events, "all_records", lambda *a, **kw: iter(ring_reads.append(kw) or ()))
    lines = [f"type=1404 audit(1700000000.000:{n}): enforcing=1 old_enforcing=1 auid=0 ses=1 "
             f"enabled=1 old-enabled=0 lsm=ipe res=1" for n in range(1, 6)]
    with LogWriter(tmp_path / "log" / "audit.log", 1 << 20, 5) as writer:
        writer.append(lines)
        result = CliRunner().invoke(app, ["audit", "tail", "-n", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == lines[-2:] and ring_reads == []
    result = CliRunner().invoke(app, ["audit", "tail"])  # no writer now: the ring buffer
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and len(ring_reads) == 1
