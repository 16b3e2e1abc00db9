"""The systemd units, ``ipe-bpf service install|uninstall|status``, and sd_notify.

Two units, shipped as package data (``units/``) and written to /etc/systemd/system by
``install`` with the command that runs this ipe-bpf:

- ``ipe-bpf.service`` (oneshot) runs ``ipe-bpf load``: the stored active policy and settings.
  ``DefaultDependencies=no``, ``After=local-fs.target`` (the store in /var/lib, the Python
  code in /usr), ``Before=sysinit.target``: every unit with default dependencies (all ordinary
  services, ``systemd-user-sessions.service`` that opens logins, getty, sshd) is ordered after
  ``sysinit.target``, so none starts before enforcement is loaded.  bpffs is mounted by
  systemd itself before any unit.  ``WantedBy=sysinit.target``.
- ``ipe-bpf-auditd.service`` (notify) runs ``ipe-bpf auditd``, ordered like auditd.service
  (before sysinit.target) and after it, so that auditd is there for the first records;
  ``Restart=always``: a killed daemon is back in a second and resumes where it stopped.

When the load fails: ``boot_failure`` in ipe-bpf.conf, applied by ``install`` as the drop-in
``ipe-bpf.service.d/boot-failure.conf``:

- ``open`` (default): boot goes on without enforcement; the unit is failed (``systemctl
  status``, non-zero ``ExecMainStatus``) and the journal has ``ipe-bpf: NOT ENFORCING: ...``.
  A broken store never locks the administrator out of a remote machine.
- ``emergency``: ``OnFailure=emergency.target`` with ``OnFailureJobMode=replace-irreversibly``
  (as local-fs.target does): no ordinary service, no network login; a root shell on the
  console.  Note: where root has no password, systemd's emergency shell continues the boot
  after sulogin refuses, so this is closed only with a root password set.
- ``poweroff``: ``FailureAction=poweroff``: nothing runs unenforced.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path

from ..errors import ServiceError

UNIT_DIR = Path("/etc/systemd/system")
LOAD_UNIT = "ipe-bpf.service"
DAEMON_UNIT = "ipe-bpf-auditd.service"
UNITS = (LOAD_UNIT, DAEMON_UNIT)
DROPIN = Path(f"{LOAD_UNIT}.d") / "boot-failure.conf"

_DROPINS = {
    "open": None,
    "emergency": "[Unit]\nOnFailure=emergency.target\nOnFailureJobMode=replace-irreversibly\n",
    "poweroff": "[Unit]\nFailureAction=poweroff\n",
}

Systemctl = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_systemctl(args: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    try:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ServiceError("ENOENT", "systemctl not found: this machine does not run systemd") from None


def default_exec() -> tuple[str, str]:
    """(command, PYTHONPATH) that run this very ipe-bpf from a unit."""
    package_parent = Path(__file__).resolve().parents[2]
    return f"{sys.executable} -m ipe_bpf", str(package_parent)


def render_units(command: str, pythonpath: str | None) -> dict[str, str]:
    env = f"Environment=PYTHONPATH={pythonpath}" if pythonpath else ""
    out = {}
    for unit in UNITS:
        text = resources.files(__package__).joinpath("units", unit).read_text()
        out[unit] = text.replace("@EXEC@", command).replace("@ENVIRONMENT@", env)
    return out


def boot_failure_dropin(mode: str) -> str | None:
    if mode not in _DROPINS:
        raise ServiceError("EINVAL", f"boot_failure must be open, emergency or poweroff, not {mode!r}")
    return _DROPINS[mode]


def _checked(systemctl: Systemctl, args: Sequence[str]) -> None:
    done = systemctl(args)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ServiceError("EIO", f"systemctl {' '.join(args)} failed: {detail[-1] if detail else done.returncode}")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def install(boot_failure: str, *, unit_dir: Path = UNIT_DIR, command: str | None = None,
            pythonpath: str | None = None, now: bool = False,
            systemctl: Systemctl = run_systemctl) -> list[Path]:
    """Write the units (and the boot-failure drop-in), reload systemd, enable them; returns the
    files written."""
    if command is None:
        command, pythonpath = default_exec()
    dropin = boot_failure_dropin(boot_failure)
    written = []
    for unit, text in render_units(command, pythonpath).items():
        _write(unit_dir / unit, text)
        written.append(unit_dir / unit)
    if dropin is None:
        (unit_dir / DROPIN).unlink(missing_ok=True)
    else:
        _write(unit_dir / DROPIN, dropin)
        written.append(unit_dir / DROPIN)
    _checked(systemctl, ["daemon-reload"])
    _checked(systemctl, ["enable", *(["--now"] if now else []), *UNITS])
    return written


def uninstall(*, unit_dir: Path = UNIT_DIR, systemctl: Systemctl = run_systemctl) -> list[Path]:
    """Disable and remove the units (stops the audit daemon; enforcement stays loaded)."""
    _checked(systemctl, ["disable", "--now", DAEMON_UNIT])
    _checked(systemctl, ["disable", LOAD_UNIT])
    removed = []
    for path in (unit_dir / LOAD_UNIT, unit_dir / DAEMON_UNIT, unit_dir / DROPIN):
        if path.exists():
            path.unlink()
            removed.append(path)
    if (unit_dir / DROPIN.parent).is_dir() and not any((unit_dir / DROPIN.parent).iterdir()):
        (unit_dir / DROPIN.parent).rmdir()
    _checked(systemctl, ["daemon-reload"])
    return removed


def unit_states(systemctl: Systemctl = run_systemctl) -> dict[str, dict[str, str]]:
    """ActiveState, SubState, UnitFileState, Result and ExecMainStatus of both units."""
    out = {}
    for unit in UNITS:
        done = systemctl(["show", "--property=ActiveState,SubState,UnitFileState,Result,ExecMainStatus", unit])
        props = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        out[unit] = props
    return out


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """sd_notify(3): send ``message`` to $NOTIFY_SOCKET; False when not run by systemd."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), address)
    return True
