"""`ipe-bpf policy deploy|activate|update|delete|list`: the policy lifecycle.

`register(policy_app)` adds the commands to the `policy` sub-app.  The store lives in
/var/lib/ipe-bpf (or $IPE_BPF_STATE_DIR).  The kernel is reached through the pinned maps only
if ipe-bpf is loaded; otherwise deploy/update/delete/list work on the store alone and activate
records the choice, which `ipe-bpf load` applies (Lifecycle.apply_active).
"""

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..errors import IpeBpfError

if TYPE_CHECKING:
    from rich.table import Table

    from ..kernel.lifecycle import Lifecycle, Listing, Outcome, PolicyTarget
    from ..kernel.submission import Compiled
from .common import console, err_console, fail, print_json, root_hint

DEFAULT_TRUST = Path("/etc/ipe-bpf/")
NOT_LOADED = "enforcement is not loaded"

TrustOption = Annotated[Path, typer.Option(
    "--trust", metavar="CERT_OR_DIR",
    help="Trusted certificate(s): a PEM/DER file, a bundle, or a directory of them.")]
UnsignedOption = Annotated[bool, typer.Option(
    "--unsigned", help="Also accept a plain-text (unsigned) policy. For test machines only.")]
UnevaluableOption = Annotated[bool, typer.Option(
    "--allow-unevaluable",
    help="Accept a policy using properties this kernel cannot evaluate (see `ipe-bpf doctor`): "
         "they are FALSE for every file here; a warning names the rules that changes.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
CompiledOption = Annotated[Optional[Path], typer.Option(
    "--compiled", metavar="FILE",
    help="This policy compiled on a build host (`ipe-bpf policy compile`, signed like the policy): "
         "its tables are installed, nothing is parsed or compiled here.")]


@contextlib.contextmanager
def kernel_target() -> "Iterator[PolicyTarget | None]":
    """The pinned maps of a loaded ipe-bpf, or None if the kernel side is absent or not loaded."""
    try:
        from ..kernel.maps import PinnedPolicyMaps
        from ..kernel.pins import is_loaded
    except ImportError:
        yield None
        return
    if not is_loaded():
        yield None
        return
    with PinnedPolicyMaps() as maps:
        yield maps


@contextlib.contextmanager
def open_lifecycle(command: str, attempt: str | None = None) -> "Iterator[Lifecycle]":
    """A Lifecycle over the default store and the kernel (if loaded); errors become one line.

    ``attempt`` names a change (e.g. ``policy activate``): refused with EPERM while sealed.
    """
    from ..kernel.features import running_kernel
    from ..kernel.lifecycle import Lifecycle
    from ..kernel.store import PolicyStore

    if attempt is not None:
        from .seal import refuse_if_sealed

        refuse_if_sealed(attempt)
    try:
        with kernel_target() as target:
            yield Lifecycle(PolicyStore.default(), target, kernel=running_kernel)
    except IpeBpfError as err:
        fail(f"{command}: {err}" + root_hint(err.errno_name))
    except OSError as err:
        name = errno.errorcode.get(err.errno or 0, "EIO")
        where = f"{err.filename}: " if err.filename else ""
        fail(f"{command}: {name}: {where}{err.strerror}" + root_hint(name))


def _read(command: str, path: Path) -> bytes:
    try:
        from ..policy.files import read_input

        return read_input(path)
    except IpeBpfError as err:
        fail(f"{command}: {err.errno_name}: {path}: {err.message}")


def _compiled(command: str, path: Path | None) -> "Compiled | None":
    if path is None:
        return None
    from ..kernel.submission import Compiled

    return Compiled(_read(command, path), str(path))


def _name(name: str) -> bytes:
    from ..kernel.lifecycle import policy_name

    return policy_name(name)


def _say(message: str) -> None:
    typer.echo(message)


def _warn_unsigned(unsigned: bool, outcome: "Outcome") -> None:
    if unsigned and outcome.policy is not None and not outcome.policy.signed:
        # click's own styling: importing rich for one line cost 0.1 s of a deploy in the VM
        typer.secho("WARNING: --unsigned: accepted a policy WITHOUT A SIGNATURE. Anyone who can write it "
                    "controls what runs. For test machines only.", err=True, fg="red", bold=True)


def print_warnings(outcome: "Outcome") -> None:
    for warning in outcome.warnings:
        typer.echo(f"warning: {warning}", err=True)


def _describe(outcome: "Outcome") -> str:
    assert outcome.policy is not None
    return f'policy "{outcome.policy.name_text}" {outcome.policy.version_text}'


def _outcome_json(outcome: "Outcome", loaded: bool) -> dict[str, object]:
    return {"policy": outcome.policy.to_json() if outcome.policy else None,
            "changed": outcome.changed, "applied": outcome.applied, "loaded": loaded,
            "records": list(outcome.records)}


def _kernel_note(outcome: "Outcome", loaded: bool) -> str:
    if outcome.applied:
        return "enforced now"
    return f"{NOT_LOADED}: recorded, applied at `ipe-bpf load`" if not loaded else ""


# ---------------------------------------------------------------------------- commands


def deploy(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Signed policy (.p7s), or text with --unsigned.")],
    trust: TrustOption = DEFAULT_TRUST,
    unsigned: UnsignedOption = False,
    allow_unevaluable: UnevaluableOption = False,
    activate_too: Annotated[bool, typer.Option(
        "--activate", help="Also make it the active policy, in the same change (both or neither).")] = False,
    compiled: CompiledOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deploy a signed policy (kernel IPE's new_policy). It is not activated unless --activate."""
    blob, tables = _read("deploy", file), _compiled("deploy", compiled)
    with open_lifecycle("deploy", attempt="policy deploy") as life:
        outcome = life.deploy(blob, trust, allow_unsigned=unsigned, source=str(file),
                              allow_unevaluable=allow_unevaluable, activate=activate_too, compiled=tables)
    _warn_unsigned(unsigned, outcome)
    print_warnings(outcome)
    if as_json:
        print_json(_outcome_json(outcome, life.loaded))
        return
    assert outcome.policy is not None
    digest = outcome.policy.digest.upper()
    what = f"{_describe(outcome)} (sha256:{digest[:16]}…, generation {outcome.policy.generation})"
    if activate_too:
        note = _kernel_note(outcome, life.loaded)
        _say(f"deployed and activated {what}" + (f" ({note})" if note else ""))
        return
    _say(f"deployed {what}; activate it with `ipe-bpf policy activate {outcome.policy.name_text}`")
    if not life.loaded:
        _say(f"note: {NOT_LOADED}")


def activate(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    as_json: JsonOption = False,
) -> None:
    """Make a deployed policy the active one."""
    with open_lifecycle("activate", attempt="policy activate") as life:
        outcome = life.activate(_name(name))
    print_warnings(outcome)
    if as_json:
        print_json(_outcome_json(outcome, life.loaded))
        return
    if not outcome.changed:
        _say(f"{_describe(outcome)} is already active")
        return
    note = _kernel_note(outcome, life.loaded)
    _say(f"activated {_describe(outcome)}" + (f" ({note})" if note else ""))


def update(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Signed replacement (.p7s), or text with --unsigned.")],
    trust: TrustOption = DEFAULT_TRUST,
    unsigned: UnsignedOption = False,
    allow_unevaluable: UnevaluableOption = False,
    compiled: CompiledOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replace a deployed policy with a higher version of itself (active stays active)."""
    blob, tables = _read("update", file), _compiled("update", compiled)
    with open_lifecycle("update", attempt="policy update") as life:
        outcome = life.update(_name(name), blob, trust, allow_unsigned=unsigned, source=str(file),
                              allow_unevaluable=allow_unevaluable, compiled=tables)
    _warn_unsigned(unsigned, outcome)
    print_warnings(outcome)
    if as_json:
        print_json(_outcome_json(outcome, life.loaded))
        return
    assert outcome.policy is not None
    active = outcome.policy.active
    note = _kernel_note(outcome, life.loaded) if active else ""
    _say(f"updated {_describe(outcome)} (generation {outcome.policy.generation})"
         + (", active" if active else "") + (f" ({note})" if note else ""))


def delete(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    as_json: JsonOption = False,
) -> None:
    """Delete a deployed policy that is not active."""
    with open_lifecycle("delete", attempt="policy delete") as life:
        outcome = life.delete(_name(name))
    if as_json:
        print_json(_outcome_json(outcome, life.loaded))
        return
    _say(f"deleted {_describe(outcome)}")


def _kernel_generation(target: "PolicyTarget | None") -> int | None:
    state = getattr(target, "state", None)
    if state is None:
        return None
    try:
        return state().generation
    except (IpeBpfError, OSError, AttributeError):
        return None


def _listing_table(listing: "Listing") -> "Table":
    from rich.table import Table

    table = Table(show_lines=False)
    for column in ("name", "version", "active", "signed", "generation", "digest", "deployed"):
        table.add_column(column)
    for p in listing.policies:
        table.add_row(p.name_text, p.version_text, "yes" if p.active else "",
                      "yes" if p.signed else "UNSIGNED", str(p.generation),
                      "sha256:" + p.digest.upper()[:16] + "…", p.deployed_at)
    return table


def list_command(as_json: JsonOption = False) -> None:
    """List deployed policies, the active one, and the enforce settings."""
    with open_lifecycle("list") as life:
        listing = life.list()
        kernel_generation = _kernel_generation(life.target)
    if as_json:
        print_json({**listing.to_json(), "loaded": life.loaded,
                    "kernel_generation": kernel_generation})
        return
    mode = "enforce" if listing.enforce else "permissive"
    audit = "on" if listing.success_audit else "off"
    loaded = "loaded" if life.loaded else NOT_LOADED
    _say(f"{loaded}; mode: {mode}; success_audit: {audit}")
    if not listing.policies:
        _say("no policy deployed")
        return
    console.print(_listing_table(listing))
    active = listing.active
    if life.loaded and active is not None and kernel_generation != active.generation:
        err_console.print(f"warning: the kernel runs generation {kernel_generation}, the store's "
                          f"active policy is generation {active.generation}", markup=False)


def register(policy_app: typer.Typer) -> None:
    """Add deploy, activate, update, delete and list to the `policy` sub-app."""
    policy_app.command("deploy")(deploy)
    policy_app.command("activate")(activate)
    policy_app.command("update")(update)
    policy_app.command("delete")(delete)
    policy_app.command("list")(list_command)
