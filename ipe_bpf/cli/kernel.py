"""Kernel-side commands: load, unload, status, enforce, success-audit, doctor, audit tail.

`register(app)` adds them to the main `ipe-bpf` app.  Each command calls one library
function of ipe_bpf.kernel / ipe_bpf.audit.
"""

from __future__ import annotations

import sys
from typing import Annotated, Callable, Optional

import typer
from rich.table import Table

from ..errors import KernelError
from .common import console, fail, print_json, reported_errors

audit_app = typer.Typer(help="Read audited decisions (IPE 1420 records).", no_args_is_help=True)

RuleSource = Callable[[], object]
_rule_lookup_factory: list[Callable[[], object]] = []


def set_rule_lookup_factory(factory: Callable[[], object]) -> None:
    """Let the lifecycle layer supply rule texts for audit (a RuleLookup factory)."""
    _rule_lookup_factory[:] = [factory]


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
    """Install the policy store's active policy and settings into the fresh maps."""
    from ..kernel.lifecycle import Lifecycle
    from ..kernel.maps import PinnedPolicyMaps
    from ..kernel.store import PolicyStore

    try:
        with PinnedPolicyMaps() as maps:
            info = Lifecycle(PolicyStore.default()).apply_active(maps, enforce=not permissive)
    except Exception as err:  # the program stays loaded (no policy: everything allowed)
        fail(f"loaded, but the stored active policy could not be applied: {err}")
    if info is None:
        return None
    name = info.name.decode("utf-8", "backslashreplace")
    return f"{name} {'.'.join(map(str, info.version))} (generation {info.generation})"


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
    from ..kernel import pins
    from ..kernel.maps import PinnedPolicyMaps

    if not pins.is_loaded():
        return {"loaded": False}
    with PinnedPolicyMaps() as maps:
        state = maps.state()
        return {
            **state.as_dict(),
            "hooks": [p.name for p in pins.link_paths()],
            "counters": maps.counters().as_dict(),
            "devices": [d.as_dict() for d in maps.devices()],
        }


def status_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Whether enforcement is loaded, its mode, the active policy generation, counters, drops."""
    with reported_errors():
        data = status_data()
    if as_json:
        print_json(data)
        return
    if not data["loaded"]:
        console.print("not loaded", markup=False)
        return
    console.print(
        f"loaded: {'enforcing' if data['enforcing'] else 'permissive'}, success_audit "
        f"{'on' if data['success_audit'] else 'off'}, active slot {data['active_slot']}, "
        f"generation {data['generation']}",
        markup=False,
    )
    counters = data["counters"]
    assert isinstance(counters, dict)
    table = Table(title="decisions")
    table.add_column("op")
    table.add_column("allow", justify="right")
    table.add_column("deny", justify="right")
    for op, n in counters["allow"].items():
        table.add_row(op, str(n), str(counters["deny"][op]))
    console.print(table)
    console.print(f"audited {counters['audited']}, ring buffer drops {counters['dropped']}", markup=False)
    for d in data["devices"]:  # type: ignore[union-attr]
        console.print(
            f"dm-verity {d['device']}: {d['alg']}:{d['roothash']} signed={d['signature_valid']} "
            f"{'(seeded)' if d['seeded'] else ''}",
            markup=False,
        )


def enforce_cmd(value: Annotated[str, typer.Argument(help="on | off")]) -> None:
    """Enforce DENY decisions (on) or only audit them (off, permissive)."""
    from ..kernel.maps import PinnedPolicyMaps

    on = _on_off(value)
    with reported_errors(), PinnedPolicyMaps() as maps:
        maps.set_enforce(on)


def success_audit_cmd(value: Annotated[str, typer.Argument(help="on | off")]) -> None:
    """Audit ALLOW decisions too (on) or only DENY decisions (off)."""
    from ..kernel.maps import PinnedPolicyMaps

    on = _on_off(value)
    with reported_errors(), PinnedPolicyMaps() as maps:
        maps.set_success_audit(on)


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
    from ..audit.tail import tail

    rules = _rule_lookup_factory[0]() if _rule_lookup_factory else _store_rule_lookup()

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        with reported_errors():
            tail(emit, follow=follow, as_json=as_json, rules=rules)  # type: ignore[arg-type]
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
