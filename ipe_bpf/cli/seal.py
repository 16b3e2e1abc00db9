"""`ipe-bpf seal`, and the guard every command that would change enforcement passes first.

While sealed (docs/seal.md) the kernel refuses those changes itself; the guard turns them into
one clear line (EPERM, sealed since when) before anything is tried, and records the refused
attempt (1121 ``op=seal_refused``) in the control log, which the audit daemon forwards.
"""

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from ..errors import IpeBpfError
from .common import console, err_console, fail, print_json, reported_errors


def _comm() -> str:
    try:
        return Path("/proc/self/comm").read_text().strip()
    except OSError:
        return "?"


def _control_record(body: str) -> tuple[str, ...]:
    """Stamp and append one 1121 record to the control log; returns warnings."""
    from ..audit.control_log import ControlLog
    from ..audit.policy_records import AUDIT_TRUSTED_APP, Record
    from ..kernel.store import PolicyStore

    try:
        store_log = PolicyStore.default().audit_log_path
        store_log.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # as the store makes it
        log = ControlLog.default(store_log)
        _lines, warnings = log.emit([Record(AUDIT_TRUSTED_APP, body)], time.time_ns())
    except (IpeBpfError, OSError) as err:
        return (f"audit record not written: {err}",)
    return warnings


def refuse_if_sealed(attempt: str) -> None:
    """Exit 1 with one EPERM line (and an audit record) if ipe-bpf is sealed."""
    from ..audit.policy_records import AuditIdentity, seal_refused
    from ..kernel import seal

    try:
        seal.refuse_if_sealed(attempt)
    except seal.SealedError as err:
        for warning in _control_record(seal_refused(attempt, os.getpid(), _comm(), AuditIdentity.from_proc())):
            err_console.print(f"warning: {warning}", markup=False)
        fail(str(err))
    except (IpeBpfError, OSError):
        return  # cannot tell (not root, nothing loaded...): the command reports its own error


def seal_cmd(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Seal even while permissive or without an active policy.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Freeze the active policy, the mode and the programs until reboot (docs/seal.md)."""
    from ..audit.policy_records import AuditIdentity, sealed
    from ..kernel import seal

    if not yes and not typer.confirm(
            "Seal ipe-bpf until reboot? Nobody, root included, can then unload it, switch enforcement "
            "off or change the policy", default=False):
        fail("seal: ECANCELED: not sealed")
    with reported_errors():
        outcome = seal.seal(force=force)
    if outcome.changed:
        for warning in _control_record(sealed(int(outcome.state.sealed_at * 1e9), os.getpid(), _comm(),
                                              AuditIdentity.from_proc())):
            err_console.print(f"warning: {warning}", markup=False)
    if as_json:
        print_json({"sealed": True, "sealed_at": outcome.state.sealed_at, "since": outcome.state.since,
                    "changed": outcome.changed, "maps": outcome.maps, "programs": outcome.programs})
        return
    if outcome.changed:
        console.print(f"sealed until reboot, since {outcome.state.since} (guarding {outcome.maps} maps and "
                      f"{outcome.programs} programs)", markup=False)
    else:
        console.print(f"already sealed since {outcome.state.since} (until reboot)", markup=False)


def register(app: typer.Typer) -> None:
    app.command("seal")(seal_cmd)
