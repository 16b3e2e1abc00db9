"""Kernel-side commands: load, unload, status, enforce, success-audit, doctor, audit tail.

`register(app)` adds them to the main `ipe-bpf` app.  Each command calls one library
function of ipe_bpf.kernel / ipe_bpf.audit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ..errors import IpeBpfError
from .common import console, emit_line, err_console, fail, print_json, reported_errors

if TYPE_CHECKING:
    from ..kernel.lifecycle import Outcome

audit_app = typer.Typer(help="Read audited decisions (IPE 1420 records).", no_args_is_help=True)


def _on_off(value: str) -> bool:
    v = value.strip().lower()
    if v in ("on", "1", "true", "yes", "y", "t"):
        return True
    if v in ("off", "0", "false", "no", "n", "f"):
        return False
    fail(f"EINVAL: expected on or off, got {value!r}")


def load_cmd(
    permissive: Annotated[bool, typer.Option("--permissive", help="Audit DENY decisions but do not enforce them.")] = False,
    rule_entries: Annotated[int, typer.Option(help="Capacity of the rules map (both slots).")] = 1 << 21,
    digest_entries: Annotated[int, typer.Option(help="Capacity of the digests map (both slots).")] = 1 << 19,
) -> None:
    """Compile and attach the BPF-LSM program; pin it so enforcement outlives this process."""
    from ..kernel import loader

    with reported_errors():
        r = loader.load(loader.LoadOptions(permissive=permissive, rule_entries=rule_entries,
                                           digest_entries=digest_entries))
    note = "" if r.fsverity else f" (fs-verity properties unavailable: {r.fsverity_missing})"
    console.print(
        f"loaded: {len(r.hooks)} hooks, {'permissive' if permissive else 'enforcing'}, "
        f"{r.seeded_devices} dm-verity devices seeded, compiled in {r.compile_seconds:.1f} s{note}",
        markup=False,
    )
    applied = _apply_stored_policy(permissive)
    if applied:
        console.print(f"active policy: {applied}", markup=False)


def _apply_stored_policy(permissive: bool) -> str | None:
    """Install the policy store's active policy and settings into the fresh maps.

    If that fails the program is unloaded again: a failed `load` leaves nothing loaded.
    """
    from ..kernel import loader
    from ..kernel.lifecycle import Lifecycle
    from ..kernel.maps import PinnedPolicyMaps
    from ..kernel.store import PolicyStore

    try:
        with PinnedPolicyMaps() as maps:
            info = Lifecycle(PolicyStore.default()).apply_active(maps, enforce=not permissive)
    except (IpeBpfError, OSError) as err:
        with reported_errors():
            loader.unload()
        fail(f"load: the stored active policy could not be applied (unloaded again): {err}")
    if info is None:
        return None
    return f"{info.name_text} {info.version_text} (generation {info.generation})"


def _store_rule_lookup() -> object:
    """Rule texts for audit from the policy store (None if it cannot be read)."""
    try:
        from ..kernel.lifecycle import Lifecycle
        from ..kernel.store import PolicyStore

        return Lifecycle(PolicyStore.default()).rule_text
    except Exception:
        return None


def unload_cmd() -> None:
    """Detach and unpin; waits until the kernel has released the programs."""
    from ..kernel import loader

    with reported_errors():
        waited = loader.unload()
    console.print(f"unloaded (detached after {waited * 1000:.0f} ms)", markup=False)


def status_data() -> dict[str, object]:
    """The kernel side (if loaded) and the policy store, as one JSON-able dict."""
    from ..kernel import pins
    from ..kernel.maps import PinnedPolicyMaps

    data: dict[str, object] = {"loaded": pins.is_loaded()}
    if data["loaded"]:
        with PinnedPolicyMaps() as maps:
            data.update(maps.state().as_dict())
            data["hooks"] = [p.name for p in pins.link_paths()]
            data["counters"] = maps.counters().as_dict()
            data["devices"] = [d.as_dict() for d in maps.devices()]
    data.update(_store_status())
    return data


def _store_status() -> dict[str, object]:
    """Deployed policies and the active one, from the store; an unreadable store is reported."""
    from ..kernel.lifecycle import Lifecycle
    from ..kernel.store import PolicyStore

    try:
        listing = Lifecycle(PolicyStore.default()).list()
    except (IpeBpfError, OSError) as err:
        return {"active_policy": None, "policies": [], "store_error": str(err)}
    active = listing.active.to_json() if listing.active else None
    return {"active_policy": active, "policies": [p.to_json() for p in listing.policies]}


def status_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Loaded or not, mode, the active policy, deployed policies, counters, drops, devices."""
    with reported_errors():
        data = status_data()
    if as_json:
        print_json(data)
        return
    _print_status(data)


def _print_status(data: dict[str, Any]) -> None:
    active = data["active_policy"]
    if not data["loaded"]:
        typer.echo("not loaded: nothing is enforced")
    else:
        typer.echo(f"loaded: {'enforcing' if data['enforcing'] else 'permissive'}, success_audit "
                   f"{'on' if data['success_audit'] else 'off'}, {len(data['hooks'])} hooks, "
                   f"kernel policy generation {data['generation']}")
    if active is None:
        typer.echo("active policy: none (everything is allowed)")
    else:
        when = "" if data["loaded"] else ", installed by `ipe-bpf load`"
        typer.echo(f"active policy: \"{active['name']}\" {active['version']} {active['digest']} "
                   f"(generation {active['generation']}{when})")
        if data["loaded"] and active["generation"] != data["generation"]:
            err_console.print("warning: the kernel's policy is not the store's active policy",
                              markup=False)
    if data.get("store_error"):
        err_console.print(f"warning: policy store unreadable: {data['store_error']}", markup=False)
    others = [p for p in data["policies"] if not p["active"]]
    if others:
        typer.echo("also deployed: " + ", ".join(f'"{p["name"]}" {p["version"]}' for p in others))
    if data["loaded"]:
        _print_counters(data["counters"], data["devices"])


def _print_counters(counters: dict[str, Any], devices: list[dict[str, Any]]) -> None:
    table = Table(title="decisions")
    table.add_column("op")
    table.add_column("allow", justify="right")
    table.add_column("deny", justify="right")
    for op, n in counters["allow"].items():
        table.add_row(op, str(n), str(counters["deny"][op]))
    console.print(table)
    console.print(f"audited {counters['audited']}, ring buffer drops {counters['dropped']}", markup=False)
    for d in devices:
        console.print(
            f"dm-verity {d['device']}: {d['alg']}:{d['roothash']} signed={d['signature_valid']} "
            f"{'(seeded)' if d['seeded'] else ''}",
            markup=False,
        )


def enforce_cmd(value: Annotated[str, typer.Argument(help="on | off")]) -> None:
    """Enforce DENY decisions (on) or only audit them (off, permissive); logs a 1404 record."""
    from .lifecycle import NOT_LOADED, open_lifecycle

    on = _on_off(value)
    with open_lifecycle("enforce") as life:
        if life.target is None:  # `load` sets the mode itself (like ipe.enforce= at boot)
            fail(f"enforce: ENOENT: {NOT_LOADED} (use `ipe-bpf load --permissive` to start permissive)")
        outcome = life.set_enforce(on)
    _print_setting("enforce", on, outcome)


def success_audit_cmd(value: Annotated[str, typer.Argument(help="on | off")]) -> None:
    """Audit ALLOW decisions too (on) or only DENY decisions (off); kept across `load`."""
    from .lifecycle import open_lifecycle

    on = _on_off(value)
    with open_lifecycle("success-audit") as life:
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
    if as_json:
        print_json([c.as_dict() for c in checks])
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.fatal else "warn")
            console.print(f"{mark} {c.name}: {c.detail}", markup=False)
    if any(c.fatal and not c.ok for c in checks):
        raise typer.Exit(1)


def audit_tail_cmd(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new records.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of IPE 1420 text.")] = False,
) -> None:
    """Print audited decisions from the ring buffer (consumes them)."""
    from ..kernel.events import tail

    rules = _store_rule_lookup()
    try:
        with reported_errors():
            tail(emit_line, follow=follow, as_json=as_json, rules=rules)  # type: ignore[arg-type]
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
