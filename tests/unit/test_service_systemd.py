"""The systemd units (ordering, verified by systemd-analyze), install/uninstall, sd_notify."""

from __future__ import annotations

import configparser
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from ipe_bpf.errors import ServiceError
from ipe_bpf.service.systemd import (
    DAEMON_UNIT,
    DROPIN,
    LOAD_UNIT,
    default_exec,
    install,
    notify,
    render_units,
    uninstall,
    unit_states,
)


def parsed(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_load_unit_runs_before_ordinary_services_and_logins() -> None:
    units = render_units("/usr/bin/ipe-bpf", None)
    load = parsed(units[LOAD_UNIT])
    assert load["Unit"]["DefaultDependencies"] == "no"
    before = load["Unit"]["Before"].split()
    assert "sysinit.target" in before and "systemd-user-sessions.service" in before
    assert "local-fs.target" in load["Unit"]["After"].split()
    assert load["Service"]["Type"] == "oneshot" and load["Service"]["RemainAfterExit"] == "yes"
    assert load["Service"]["ExecStart"] == "/usr/bin/ipe-bpf load"
    assert "NOT ENFORCING" in load["Service"]["ExecStopPost"]
    assert load["Install"]["WantedBy"] == "sysinit.target"
    assert "@" not in units[LOAD_UNIT].replace("$$", "")


def test_daemon_unit_restarts_and_is_not_rate_limited() -> None:
    daemon = parsed(render_units("/usr/bin/python3 -m ipe_bpf", "/work")[DAEMON_UNIT])
    assert daemon["Service"]["ExecStart"] == "/usr/bin/python3 -m ipe_bpf auditd"
    assert daemon["Service"]["Environment"] == "PYTHONPATH=/work"
    assert daemon["Service"]["Type"] == "notify"
    assert daemon["Service"]["Restart"] == "always"
    assert daemon["Service"]["LogRateLimitIntervalSec"] == "0"
    assert {"ipe-bpf.service", "auditd.service"} <= set(daemon["Unit"]["After"].split())
    assert "sysinit.target" in daemon["Unit"]["Before"].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("boot_failure", ["open", "emergency", "poweroff"])
def test_systemd_analyze_accepts_the_units(tmp_path: Path, boot_failure: str) -> None:
    command, pythonpath = default_exec()
    install(boot_failure, unit_dir=tmp_path, command=command, pythonpath=pythonpath,
            systemctl=lambda args: subprocess.CompletedProcess(args, 0, "", ""))
    for unit in (LOAD_UNIT, DAEMON_UNIT):
        done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
                              capture_output=True, text=True, cwd=tmp_path)
        problems = [line for line in done.stderr.splitlines() if str(tmp_path) in line]
        assert done.returncode == 0 and problems == [], done.stderr


class FakeSystemctl:
    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, args: Sequence[str]) -> "subprocess.CompletedProcess[str]":
        self.calls.append(list(args))
        if self.fail_on and self.fail_on in args:
            return subprocess.CompletedProcess(args, 1, "", "Failed to connect to bus: No such file\n")
        if args and args[0] == "show":
            return subprocess.CompletedProcess(args, 0, "ActiveState=active\nSubState=exited\n"
                                               "UnitFileState=enabled\nResult=success\nExecMainStatus=0\n", "")
        return subprocess.CompletedProcess(args, 0, "", "")


def test_install_writes_enables_and_applies_boot_failure(tmp_path: Path) -> None:
    ctl = FakeSystemctl()
    written = install("emergency", unit_dir=tmp_path, command="/usr/bin/ipe-bpf", systemctl=ctl)
    assert set(written) == {tmp_path / LOAD_UNIT, tmp_path / DAEMON_UNIT, tmp_path / DROPIN}
    dropin = parsed((tmp_path / DROPIN).read_text())
    assert dropin["Unit"]["OnFailure"] == "emergency.target"
    assert dropin["Unit"]["OnFailureJobMode"] == "replace-irreversibly"
    assert ctl.calls == [["daemon-reload"], ["enable", LOAD_UNIT, DAEMON_UNIT]]
    install("open", unit_dir=tmp_path, command="/usr/bin/ipe-bpf", now=True, systemctl=ctl)
    assert not (tmp_path / DROPIN).exists()  # back to fail-open
    assert ctl.calls[-1] == ["enable", "--now", LOAD_UNIT, DAEMON_UNIT]
    install("poweroff", unit_dir=tmp_path, command="/usr/bin/ipe-bpf", systemctl=ctl)
    assert parsed((tmp_path / DROPIN).read_text())["Unit"]["FailureAction"] == "poweroff"
    removed = uninstall(unit_dir=tmp_path, systemctl=ctl)
    assert set(removed) == {tmp_path / LOAD_UNIT, tmp_path / DAEMON_UNIT, tmp_path / DROPIN}
    assert list(tmp_path.iterdir()) == []
    assert ["disable", "--now", DAEMON_UNIT] in ctl.calls
    assert unit_states(ctl)[LOAD_UNIT]["ActiveState"] == "active"


def test_systemctl_failure_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ServiceError) as caught:
        install("open", unit_dir=tmp_path, command="x", systemctl=FakeSystemctl(fail_on="daemon-reload"))
    assert str(caught.value) == "EIO: systemctl daemon-reload failed: Failed to connect to bus: No such file"
    with pytest.raises(ServiceError, match="boot_failure must be"):
        install("closed", unit_dir=tmp_path, command="x", systemctl=FakeSystemctl())


def test_notify(tmp_path: Path) -> None:
    assert notify("READY=1", environ={}) is False
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        assert notify("READY=1", environ={"NOTIFY_SOCKET": str(path)})
        assert server.recv(100) == b"READY=1"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0ipe-bpf-test-notify")
        assert notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@ipe-bpf-test-notify"})
        assert server.recv(100) == b"STOPPING=1"
