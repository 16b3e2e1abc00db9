"""`ipe-bpf policy ...`: check, explain and format policies (no kernel, no root)."""

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..errors import IpeBpfError
from . import generate, lifecycle, sign
from .common import console, err_console, fail, print_json, read_bytes, reported_errors

if TYPE_CHECKING:
    from rich.table import Table

    from ..policy.model import Digest, FileAttributes, Policy

app = typer.Typer(help="Check, explain, format, sign and verify IPE policies.", no_args_is_help=True)


def policy_text(data: bytes) -> bytes:
    """The policy text of a file: the payload of an attached PKCS#7 (unchecked), else the bytes."""
    from ..policy.signing import policy_text as payload  # lazily: cryptography is slow to import

    return payload(data)


def load_policy(path: Path) -> "Policy":
    from ..policy.parser import parse_policy

    data = read_bytes(path)
    with reported_errors(str(path)):
        return parse_policy(policy_text(data))


def _summary(policy: "Policy") -> "Table":
    from rich.table import Table

    from ..policy.model import POLICY_OPS, text

    table = Table(title=f"{text(policy.name)} {policy.version_text}", show_lines=False)
    table.add_column("op")
    table.add_column("rules", justify="right")
    table.add_column("default")
    for op in POLICY_OPS:
        own = policy.op_default(op)  # Action.ALLOW is 0: compare with None, never by truth
        default, origin = (own, "op") if own is not None else (policy.global_default, "global")
        shown = f"{default.name} ({origin})" if default is not None else "-"
        table.add_row(op.name, str(len(policy.rules_for(op))), shown)
    return table


@app.command()
def check(
    file: Path,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Parse a policy (text or signed .p7s; use `verify` for the signature)."""
    from ..policy.files import read_input
    from ..policy.lint import lint
    from ..policy.model import policy_to_dict
    from ..policy.parser import parse_policy

    try:
        text = policy_text(read_input(file))
        policy = parse_policy(text)
    except IpeBpfError as err:
        err.located(str(file))
        if as_json:
            print_json({"valid": False, "errno": err.errno_name, "line": err.line, "message": err.message,
                        "policy": None, "warnings": []})
            raise typer.Exit(1)
        fail(str(err))
    warnings = lint(text, policy)
    if as_json:
        print_json({"valid": True, "errno": None, "line": None, "message": "valid", "policy": policy_to_dict(policy),
                    "warnings": [{"line": w.line, "message": w.message} for w in warnings]})
        return
    for warning in warnings:
        err_console.print(f"warning: {file}:{warning.line}: {warning.message}", markup=False)
    console.print(_summary(policy))
    console.print(f"[green]valid[/]: {len(policy.rules)} rules")


def _digest_option(value: Optional[str], option: str) -> "Optional[Digest]":
    from ..policy.model import Digest

    if value is None:
        return None
    alg, colon, hex_text = value.partition(":")
    try:
        if not colon or not hex_text:
            raise ValueError
        return Digest(alg.encode(), bytes.fromhex(hex_text))
    except ValueError:
        fail(f"{option}: EINVAL: expected ALG:HEX, got {value!r}", code=2)


@app.command()
def explain(
    file: Path,
    op: Annotated[Optional[str], typer.Option(help="EXECUTE, FIRMWARE, KMODULE, KEXEC_IMAGE, KEXEC_INITRAMFS, POLICY, X509_CERT or UNKNOWN (with --file: EXECUTE by default).")] = None,
    target: Annotated[Optional[Path], typer.Option("--file", help="Measure this real file for the attributes.")] = None,
    exit_status: Annotated[bool, typer.Option("--exit-status", help="Exit 0 if allowed, 1 if denied.")] = False,
    no_file: Annotated[bool, typer.Option("--no-file", help="An event with no file (anonymous memory, kernel_load_data).")] = False,
    boot_verified: Annotated[bool, typer.Option("--boot-verified")] = False,
    dmverity_roothash: Annotated[Optional[str], typer.Option("--dmverity-roothash", metavar="ALG:HEX")] = None,
    dmverity_signature: Annotated[bool, typer.Option("--dmverity-signature")] = False,
    fsverity_digest: Annotated[Optional[str], typer.Option("--fsverity-digest", metavar="ALG:HEX")] = None,
    fsverity_signature: Annotated[bool, typer.Option("--fsverity-signature")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show what the policy decides for an event, and why each earlier rule did not match."""
    from rich.markup import escape

    from ..policy.evaluate import evaluate, first_failing_property
    from ..policy.model import FileAttributes, Op

    if op is None and target is None:
        fail("--op: EINVAL: missing (name the op, or give --file)", code=2)
    op = op or "EXECUTE"
    if op.upper() not in Op.__members__ or op != op.upper():
        fail(f"--op: EINVAL: unknown op {op!r}", code=2)
    attrs = FileAttributes(
        has_file=not no_file,
        boot_verified=boot_verified,
        dmverity_roothash=_digest_option(dmverity_roothash, "--dmverity-roothash"),
        dmverity_signature=dmverity_signature,
        fsverity_digest=_digest_option(fsverity_digest, "--fsverity-digest"),
        fsverity_signature=fsverity_signature,
    )
    measured = None
    if target is not None:
        if attrs != FileAttributes():
            fail("--file: EINVAL: the file's measured attributes cannot be combined with attribute options", code=2)
        measured = generate.measure_file(target)
        attrs = measured.attributes()
    policy = load_policy(file)
    here = _evaluated_here(attrs) if measured is not None else attrs
    always_false = _lost(attrs, here)
    attrs = here
    decision = evaluate(policy, Op[op], attrs)
    rules = policy.rules_for(Op[op])
    earlier = rules[: rules.index(decision.rule)] if decision.rule is not None else rules
    misses = [(rule, first_failing_property(rule, attrs)) for rule in earlier]
    if as_json:
        print_json({
            "action": decision.action.name,
            "source": decision.source.value,
            "rule": decision.rule_text,
            "line": decision.rule.line if decision.rule else None,
            "skipped": [{"line": r.line, "rule": str(r), "failed": str(p)} for r, p in misses],
            "always_false_here": always_false,
            **({"file": generate.measurement_json(measured), "audit": generate.audit_fields(measured, decision)}
               if measured else {}),
        })
        generate.exit_with_decision(exit_status, decision)
        return
    for rule, prop in misses:
        console.print(f"  line {rule.line}: {escape(str(rule))}  [dim](no: {escape(str(prop))})[/]",
                      markup=True, highlight=False)
    if always_false:
        console.print(f"  this kernel cannot evaluate the file's {' and '.join(always_false)}: FALSE here "
                      f"(see `ipe-bpf doctor`)", markup=False)
    colour = "green" if decision.action.name == "ALLOW" else "red"
    where = f" (line {decision.rule.line})" if decision.rule else ""
    console.print(f"[{colour}]{decision.action.name}[/] by {decision.source.value}: "
                  f"{escape(decision.rule_text)}{where}", highlight=False)
    if measured is not None:
        generate.print_measurement(measured, decision)
    generate.exit_with_decision(exit_status, decision)


def _evaluated_here(attrs: "FileAttributes") -> "FileAttributes":
    """The measured file as the loaded program (or this kernel) evaluates it: what the kernel
    cannot evaluate is FALSE."""
    from ..kernel.features import running_kernel

    found = running_kernel()
    return found.as_evaluated(attrs) if found is not None else attrs


def _lost(measured: "FileAttributes", here: "FileAttributes") -> list[str]:
    """The properties the file has that this kernel does not see."""
    return [name for name in ("dmverity_roothash", "dmverity_signature", "fsverity_digest", "fsverity_signature")
            if getattr(measured, name) != getattr(here, name)]


@app.command("format")
def format_command(file: Path) -> None:
    """Print a policy with each line in canonical form (comments and order kept)."""
    from ..policy.parser import format_text

    data = read_bytes(file)
    with reported_errors(str(file)):
        formatted = format_text(policy_text(data))
    sys.stdout.buffer.write(formatted)


lifecycle.register(app)
sign.register(app)
