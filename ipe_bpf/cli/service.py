"""`ipe-bpf auditd` and `ipe-bpf service install|uninstall|status`: the boot unit and the audit daemon.

`register(app)` adds them to the main app.  Each command calls one function of ipe_bpf.service.
"""

import signal
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import print_json, reported_errors

service_app = typer.Typer(help="The systemd units: enforcement from boot, the audit daemon.",
                          no_args_is_help=True)

ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", metavar="FILE", help="Settings file (default /etc/ipe-bpf/ipe-bpf.conf).")]


def _config(path: Path | None) -> Any:
    from ..service.config import load_config

    with reported_errors():
        return load_config(path)


def auditd_cmd(config: ConfigOption = None) -> None:
    """Run the audit daemon in the foreground (what ipe-bpf-auditd.service runs)."""
    from ..service.daemon import Daemon
    from ..service.journal import JournalSink
    from ..service.netlink import KernelAuditSink
    from ..service.source import open_source, pinned_identity
    from ..service.systemd import notify

    cfg = _config(config)
    sinks: list[Any] = []
    if cfg.journal:
        sinks.append(JournalSink())
    if cfg.kernel_audit != "no":
        sinks.append(KernelAuditSink(cfg.kernel_audit))
    stop = {"now": False}

    def on_signal(_sig: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon = Daemon(cfg, sinks, open_source=open_source, current_identity=pinned_identity)
    with reported_errors():
        daemon.run(stopping=lambda: stop["now"], notify=notify)


def install_cmd(
    config: ConfigOption = None,
    now: Annotated[bool, typer.Option("--now", help="Also start them (loads enforcement now).")] = False,
    exec_command: Annotated[Optional[str], typer.Option(
        "--exec", metavar="COMMAND", help="How the units run ipe-bpf (default: this Python, -m ipe_bpf).")] = None,
    unit_dir: Annotated[Path, typer.Option(help="Where unit files go.")] = Path("/etc/systemd/system"),
) -> None:
    """Install and enable ipe-bpf.service (load at boot) and ipe-bpf-auditd.service."""
    from ..service.systemd import install

    cfg = _config(config)
    with reported_errors():
        written = install(cfg.boot_failure, unit_dir=unit_dir, command=exec_command, now=now)
    for path in written:
        typer.echo(f"wrote {path}")
    typer.echo(f"enabled ipe-bpf.service and ipe-bpf-auditd.service (boot_failure={cfg.boot_failure})"
               + ("; started" if now else "; they start at the next boot (or use --now)"))


def uninstall_cmd(
    unit_dir: Annotated[Path, typer.Option(help="Where unit files are.")] = Path("/etc/systemd/system"),
) -> None:
    """Disable and remove the units; stops the audit daemon (enforcement stays loaded)."""
    from ..service.systemd import uninstall

    with reported_errors():
        removed = uninstall(unit_dir=unit_dir)
    for path in removed:
        typer.echo(f"removed {path}")


def status_cmd(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The units' states and the audit daemon's: records waiting, sinks behind, losses."""
    from ..service.status import daemon_status
    from ..service.systemd import unit_states

    cfg = _config(config)
    with reported_errors():
        data = {"units": unit_states(), "daemon": daemon_status(cfg)}
    if as_json:
        print_json(data)
        return
    for unit, props in data["units"].items():
        typer.echo(f"{unit}: {props.get('UnitFileState', '?')}, {props.get('ActiveState', '?')} "
                   f"({props.get('SubState', '?')}, result {props.get('Result', '?')})")
    for line in describe_daemon(data["daemon"]):
        typer.echo(line)


def describe_daemon(status: dict[str, Any]) -> list[str]:
    """`status` lines about the audit daemon (for `ipe-bpf status` too)."""
    if not status["running"]:
        return [f"audit daemon: not running (records stay in the ring buffer; {status['log']})"]
    report = status.get("report") or {}
    lines = [f"audit daemon: pid {status['pid']}, {report.get('state', '?')}, "
             f"{report.get('ring_pending', '?')} records waiting in the ring buffer, "
             f"{report.get('decisions_written', '?')} decisions written, lost {report.get('lost', '?')}"
             + (f" (+{report['lost_unknown']} unknown)" if report.get("lost_unknown") else "")
             + f" -> {status['log']}"]
    for name, sink in (report.get("sinks") or {}).items():
        lag = sink.get("lag_bytes")
        behind = "up to date" if lag == 0 else (f"{lag} bytes behind" if lag is not None else "a file behind")
        lines.append(f"  {name}: {behind}, delivered {sink['delivered']}, skipped {sink['skipped']}, "
                     f"lost {sink['lost']}" + (f", error: {sink['error']}" if sink.get("error") else ""))
    if status.get("stale"):
        lines.append("  (the report is stale)")
    return lines


def register(app: typer.Typer) -> None:
    """Add `auditd` and `service install|uninstall|status` to the main app."""
    app.command("auditd")(auditd_cmd)
    service_app.command("install")(install_cmd)
    service_app.command("uninstall")(uninstall_cmd)
    service_app.command("status")(status_cmd)
    app.add_typer(service_app, name="service")


def _standalone() -> typer.Typer:
    app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
    register(app)
    return app


if __name__ == "__main__":  # python3 -m ipe_bpf.cli.service ... (before the main app registers us)
    _standalone()()
