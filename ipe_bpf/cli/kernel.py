"""Kernel-side commands: load, unload, status, enforce, success-audit, doctor, audit tail.

`register(app)` adds them to the main `ipe-bpf` app.  Each command calls one library
function of ipe_bpf.kernel / ipe_bpf.audit.
"""

import os
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .common import console, emit_line, err_console, fail, print_json, reported_errors

if TYPE_CHECKING:
    from ..service.config import Config
    from ..kernel.control import Status
    from ..kernel.lifecycle import Outcome
    from ..kernel.maps import Counters, DeviceState

audit_app = typer.Typer(help="Read audited decisions (IPE 1420 records).", no_args_is_help=True)


def _on_off(value: str) -> bool:
    v = value.strip().lower()
    if v in ("on", "1", "true", "yes", "y", "t"):
        return True
    if v in ("off", "0", "false", "no", "n", "f"):
        return False
    fail(f"EINVAL: expected on or off, got {value!r}")


def load_cmd(
    enforce: Annotated[Optional[bool], typer.Option(
        "--enforce/--permissive",
        help="Enforce DENY decisions, or only audit them (permissive); the choice is stored. "
             "Default: the stored mode (`ipe-bpf enforce on|off`).", show_default=False)] = None,
    loader: Annotated[Optional[str], typer.Option(
        help="core: the prebuilt CO-RE object through libbpf (default, or $IPE_BPF_LOADER); "
             "bcc: compile with BCC (development).")] = None,
) -> None:
    """Load and attach the BPF-LSM program, pin it, install the stored active policy and settings.

    The ring buffer's size is `ring_buffer_size` of /etc/ipe-bpf/ipe-bpf.conf.
    """
    from ..kernel import loader as loader_mod
    from ..kernel.control import ApplyError, load_and_apply

    settings = _settings()
    options = loader_mod.LoadOptions(ringbuf_pages=settings.ringbuf_pages, loader=loader)
    with reported_errors():
        try:
            report = load_and_apply(options, enforce=enforce)
        except ApplyError as err:
            fail(f"load: {err.message}")
    r = report.loaded
    unsupported = [p.property for p in r.features.properties().values() if not p.supported]
    note = (f"; this kernel cannot evaluate {', '.join(unsupported)}: always FALSE here (see `ipe-bpf doctor`)"
            if unsupported else "")
    mode = "enforcing" if report.enforcing else "permissive"
    console.print(
        f"loaded ({r.loader}): {len(r.hooks)} hooks, {mode}{' (stored)' if enforce is None else ''}, "
        f"in {r.seconds:.1f} s{note}",
        markup=False,
    )
    info = report.active
    if info is None:
        console.print("active policy: none (everything is allowed until one is activated)", markup=False)
    else:
        console.print(f"active policy: {info.name_text} {info.version_text} (generation {info.generation})",
                      markup=False)
    _print_records(report.records, report.warnings)
    if settings.seal:
        _seal_after_load(settings)


def _settings() -> "Config":
    """The service settings: the ring buffer's size, and `seal = yes` (seal right after load,
    as the boot unit's `load` does).  A broken settings file costs the defaults and a warning,
    never the load (enforcement matters more)."""
    from ..errors import IpeBpfError
    from ..service.config import Config, load_config

    try:
        return load_config()
    except IpeBpfError as err:
        err_console.print(f"warning: {err}; loading with the default settings (not sealed)", markup=False)
        return Config()


def _seal_after_load(settings: "Config") -> None:
    from ..service.config import config_path
    from .seal import seal_cmd

    console.print(f"seal = yes ({config_path()}): sealing until reboot", markup=False)
    try:
        seal_cmd(yes=True, force=False, as_json=False)
    except typer.Exit as done:
        if done.exit_code:
            fail("load: loaded and enforcing, but NOT SEALED (see the line above)")
        raise


def _print_records(records: "tuple[str, ...]", warnings: "tuple[str, ...]") -> None:
    for line in records:
        console.print(line, markup=False)
    for warning in warnings:
        err_console.print(f"warning: {warning}", markup=False)


def _store_rule_lookup() -> object:
    """Rule texts for audit from the policy store (None if it cannot be read)."""
    try:
        from ..kernel.lifecycle import Lifecycle
        from ..kernel.store import PolicyStore

        return Lifecycle(PolicyStore.default()).rule_text
    except Exception:
        return None


def unload_cmd() -> None:
    """Detach and unpin; waits until the kernel has released the programs.

    Records written and not read yet go with the ring buffer: with the audit daemon running it
    reads them to the end first; without it a `lost` record counts them.
    """
    from ..kernel.control import unload_and_record
    from .seal import refuse_if_sealed

    refuse_if_sealed("unload")
    with reported_errors():
        report = unload_and_record(count_unread=not _daemon_runs())
    console.print(f"unloaded (detached after {report.seconds * 1000:.0f} ms)", markup=False)
    _print_records(report.records, report.warnings)


def status_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Loaded or not, mode, the active policy, deployed policies, counters, drops, devices, and
    the audit daemon (records waiting in the ring buffer, how far each sink is behind).

    Exits 1 when the policy store is damaged (the kernel keeps enforcing what it holds).
    """
    from ..kernel.control import status

    with reported_errors():
        found = status()
    daemon = _daemon_status()
    if as_json:
        print_json({**found.to_json(), "audit_daemon": daemon})
    else:
        _print_status(found)
        if daemon is not None:
            from .service import describe_daemon

            for line in describe_daemon(daemon):
                typer.echo(line)
    if found.store_problem is not None:
        raise typer.Exit(1)


def _daemon_runs() -> bool:
    from ..errors import IpeBpfError
    from ..service.config import load_config
    from ..service.tail import daemon_pid

    try:
        return daemon_pid(load_config()) is not None
    except IpeBpfError:
        return False


def _daemon_status() -> "dict[str, object] | None":
    """The audit daemon's state and lag (ipe_bpf.service.status); None, with a warning, when the
    service settings cannot be read."""
    from ..errors import IpeBpfError
    from ..service.config import load_config
    from ..service.status import daemon_status

    try:
        return daemon_status(load_config())
    except IpeBpfError as err:
        err_console.print(f"warning: audit daemon: {err}", markup=False)
        return None


def _kernel_line(found: "Status") -> str:
    k = found.kernel
    assert k is not None
    mode = f"{'enforcing' if k.enforcing else 'permissive'}, success_audit {'on' if k.success_audit else 'off'}"
    what = (f"kernel policy generation {k.generation}" if k.generation is not None
            else "no policy in the kernel (everything is allowed)")
    return f"loaded: {mode}, {len(found.hooks)} hooks, {what}"


def _seal_line(found: "Status") -> str | None:
    k = found.kernel
    if k is None or k.sealed_at is None:
        return None
    from ..kernel.seal import SealState

    refused = found.counters.seal_refused if found.counters is not None else 0
    return (f"sealed since {SealState(k.sealed_at).since} until reboot: policy, mode and programs "
            f"cannot change ({refused} attempts refused)")


def _print_status(found: "Status") -> None:
    typer.echo(_kernel_line(found) if found.kernel is not None else "not loaded: nothing is enforced")
    if found.memory:
        from ..kernel.memory import describe

        typer.echo(describe(found.memory))
    sealed = _seal_line(found)
    if sealed is not None:
        typer.echo(sealed)
    if found.store_problem is not None:
        enforced = (f"the kernel still enforces generation {found.kernel_generation}"
                    if found.kernel_generation is not None else
                    "the kernel enforces no policy" if found.loaded else "nothing is loaded")
        err_console.print(f"error: {found.store_problem}; {enforced}", markup=False)
    active = found.active
    if active is None and found.listing is not None:
        typer.echo("active policy: none (everything is allowed)")
    elif active is not None:
        when = "" if found.loaded else ", installed by `ipe-bpf load`"
        typer.echo(f"active policy: \"{active.name_text}\" {active.version_text} sha256:{active.digest.upper()} "
                   f"(generation {active.generation}{when})")
        if found.loaded and active.generation != found.kernel_generation:
            err_console.print("warning: the kernel's policy is not the store's active policy", markup=False)
    for prop in found.always_false:
        typer.echo(f"property {prop.property}: {prop.detail}")
    others = [p for p in (found.listing.policies if found.listing else ()) if not p.active]
    if others:
        typer.echo("also deployed: " + ", ".join(f'"{p.name_text}" {p.version_text}' for p in others))
    if found.counters is not None:
        _print_counters(found.counters, found.devices)


def _print_counters(counters: "Counters", devices: "tuple[DeviceState, ...]") -> None:
    from rich.table import Table

    table = Table(title="decisions")
    table.add_column("op")
    table.add_column("allow", justify="right")
    table.add_column("deny", justify="right")
    for op, n in counters.allow.items():
        table.add_row(op, str(n), str(counters.deny[op]))
    console.print(table)
    console.print(f"audited {counters.audited}, ring buffer drops {counters.dropped}", markup=False)
    if counters.undecidable:
        console.print(f"denied because a signature state was unknown (checked before load): "
                      f"{counters.undecidable}", markup=False)
    for d in devices:
        console.print(
            f"dm-verity {d.major}:{d.minor}: {d.alg}:{d.roothash} signed={d.signature_valid} "
            f"(captured at set-up)",
            markup=False,
        )


def enforce_cmd(value: Annotated[str, typer.Argument(help="on | off")]) -> None:
    """Enforce DENY decisions (on) or only audit them (off, permissive); logs a 1404 record."""
    from .lifecycle import NOT_LOADED, open_lifecycle

    on = _on_off(value)
    with open_lifecycle("enforce", attempt=f"enforce {'on' if on else 'off'}") as life:
        if life.target is None:  # `load` sets the mode itself (like ipe.enforce= at boot)
            fail(f"enforce: ENOENT: {NOT_LOADED} (use `ipe-bpf load --permissive` to start permissive)")
        outcome = life.set_enforce(on)
    _print_setting("enforce", on, outcome)


def success_audit_cmd(value: Annotated[str, typer.Argument(help="on | off")]) -> None:
    """Audit ALLOW decisions too (on) or only DENY decisions (off); kept across `load`."""
    from .lifecycle import open_lifecycle

    on = _on_off(value)
    with open_lifecycle("success-audit", attempt=f"success-audit {'on' if on else 'off'}") as life:
        outcome = life.set_success_audit(on)
    _print_setting("success_audit", on, outcome)


def _print_setting(name: str, on: bool, outcome: "Outcome") -> None:
    from .lifecycle import print_warnings

    state = "on" if on else "off"
    where = "now" if outcome.applied else "at the next `ipe-bpf load` (not loaded)"
    console.print(f"{name} {state}{'' if outcome.changed else ' (unchanged)'}, in effect {where}",
                  markup=False)
    for line in outcome.records:
        console.print(line, markup=False)
    print_warnings(outcome)


def doctor_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """What this machine has and lacks for enforcement."""
    from ..kernel.doctor import run_checks

    checks = run_checks()
    fatal = [c.name for c in checks if c.fatal and not c.ok]
    if as_json:
        print_json([c.as_dict() for c in checks])
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.fatal else "warn")
            console.print(f"{mark} {c.name}: {c.detail}", markup=False)
        console.print(doctor_verdict(fatal, root=os.geteuid() == 0), markup=False)
    if fatal:
        raise typer.Exit(1)


def doctor_verdict(fatal: list[str], *, root: bool) -> str:
    """The last line of `doctor`: can this machine enforce, and if not, where to go instead."""
    if not fatal:
        return "verdict: this machine can enforce IPE policies (`ipe-bpf load` as root)"
    failed = ", ".join(fatal)
    if not root:
        return (f"verdict: not ready ({failed}); run `ipe-bpf doctor` as root to see what the kernel "
                f"lacks, or try ipe-bpf in the test VM: `ipe-bpf vm run -- ipe-bpf doctor`")
    return (f"verdict: enforcement is impossible on this machine ({failed}); try ipe-bpf in the test VM, "
            f"whose kernel has BPF LSM: `ipe-bpf vm run -- ipe-bpf doctor`")


def audit_tail_cmd(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new records.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of IPE 1420 text.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help=(
        "With the audit daemon running: start this many records back in the durable log."))] = 10,
) -> None:
    """Print audited decisions.

    With the audit daemon running (`ipe-bpf auditd`): from its durable log, like `tail -n N
    -F`, so any number of readers see every record, with the serials every sink shows.
    Without it: from the ring buffer, which gives each record to one reader only (consumed).
    """
    from ..service.config import load_config
    from ..service.tail import daemon_pid, tail_log

    with reported_errors():
        cfg = load_config()
    try:
        with reported_errors():
            if daemon_pid(cfg) is not None:
                tail_log(emit_line, cfg, follow=follow, as_json=as_json, lines=lines)
                return
            from ..kernel.events import tail

            tail(emit_line, follow=follow, as_json=as_json, rules=_store_rule_lookup())  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    """Add the kernel commands to the main app."""
    app.command("load")(load_cmd)
    app.command("unload")(unload_cmd)
    app.command("status")(status_cmd)
    app.command("enforce")(enforce_cmd)
    app.command("success-audit")(success_audit_cmd)
    app.command("doctor")(doctor_cmd)
    audit_app.command("tail")(audit_tail_cmd)
    app.add_typer(audit_app, name="audit")


def _standalone() -> typer.Typer:
    app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
    register(app)
    return app


if __name__ == "__main__":  # python3 -m ipe_bpf.cli.kernel ... (before the main app registers us)
    _standalone()()
