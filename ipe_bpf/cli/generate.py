"""`ipe-bpf policy generate`, `policy learn` and `ipe-bpf verity pack|open|close`."""

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from ..kernel import measure
    from ..policy.evaluate import Decision
    from ..policy.model import Digest
from .common import console, err_console, fail, print_json, read_bytes, reported_errors

READ_ONLY_WARNING = ("--enable-verity: files that get fs-verity become read-only for good (only deleting "
                     "and recreating them undoes it)")

KeyOption = Annotated[Optional[Path], typer.Option("--key", help="Private key to sign with (PEM or DER).")]
CertOption = Annotated[Optional[Path], typer.Option("--cert", help="The key's certificate.")]
OutputOption = Annotated[Optional[Path], typer.Option("-o", "--output", help="Write here instead of standard output.")]


def _signer(key: Optional[Path], cert: Optional[Path]) -> tuple[bytes, bytes] | None:
    if (key is None) != (cert is None):
        fail("--key and --cert go together", code=2)
    return (read_bytes(key), read_bytes(cert)) if key is not None and cert is not None else None


def _write(text: bytes, output: Optional[Path], sign: bool, key: Optional[Path], cert: Optional[Path]) -> None:
    """The policy text to stdout or -o; with --sign, the attached PKCS#7 to -o."""
    if sign:
        signer = _signer(key, cert)
        if signer is None or output is None:
            fail("--sign needs --key, --cert and -o (the signed policy is DER, not for a terminal)", code=2)
        with reported_errors():
            from ..policy import signing

            text = signing.sign_policy(text, *signer)
    if output is None:
        sys.stdout.buffer.write(text)
        return
    with reported_errors(str(output)):
        output.write_bytes(text)


def _say(lines: list[str]) -> None:
    for line in lines:
        err_console.print(f"ipe-bpf: {line}", markup=False)


def generate_command(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Files and directories to allow.", show_default=False)] = None,
    package: Annotated[Optional[list[str]], typer.Option("--package", "-p", help="An installed Debian package "
                                                         "(its executables and libraries); repeatable.")] = None,
    output: OutputOption = None,
    name: Annotated[str, typer.Option("--name", help="policy_name of the result.")] = "generated",
    version: Annotated[str, typer.Option("--version", help="policy_version of the result.")] = "0.0.1",
    no_closure: Annotated[bool, typer.Option("--no-closure", help="Only the files named, not their "
                                             "interpreters and libraries.")] = False,
    enable_verity: Annotated[bool, typer.Option("--enable-verity", help="Enable fs-verity on files that "
                                                "lack it (they become read-only).")] = False,
    prefer_volume: Annotated[bool, typer.Option("--prefer-volume/--no-prefer-volume", help="One "
                             "dmverity_roothash rule for files on a dm-verity volume.")] = True,
    hash_alg: Annotated[str, typer.Option("--hash-alg", help="fs-verity hash: sha256 or sha512.")] = "sha256",
    sign: Annotated[bool, typer.Option("--sign", help="Write a signed policy (PKCS#7) to -o.")] = False,
    key: KeyOption = None,
    cert: CertOption = None,
) -> None:
    """Write a policy that allows exactly these files (and what they need) to execute."""
    from ..generate.plan import Options, generate  # pyelftools and friends: only when generating
    if not paths and not package:
        fail("nothing to allow: name files, directories or --package", code=2)
    if hash_alg not in ("sha256", "sha512"):
        fail(f"--hash-alg: EINVAL: {hash_alg!r} is not sha256 or sha512", code=2)
    if enable_verity:
        _say([READ_ONLY_WARNING])
    options = Options(enable_verity=enable_verity, prefer_volume=prefer_volume, hash_alg=hash_alg)
    with reported_errors():
        made = generate([str(p) for p in paths or []], list(package or []), options,
                        with_closure=not no_closure, name=name, version=version)
    _write(made.text, output, sign, key, cert)
    volumes_count = len({g.prop for g in made.plan.grants if g.prop.key.value == "dmverity_roothash"})
    _say([f"{len(made.selection.files)} files, {len(set(g.prop for g in made.plan.grants))} rules "
          f"({volumes_count} dm-verity volumes); fs-verity enabled on {len(made.plan.enabled)}", *made.notes])


def learn_command(
    records: Annotated[Optional[Path], typer.Argument(help="1420 records (audit tail [--json], the kernel's "
                                                      "audit log); default: standard input.")] = None,
    policy: Annotated[Optional[Path], typer.Option("--policy", help="Merge into this policy (text or "
                                                  ".p7s), its version bumped.")] = None,
    output: OutputOption = None,
    name: Annotated[str, typer.Option("--name", help="policy_name when there is no --policy.")] = "learned",
    enable_verity: Annotated[bool, typer.Option("--enable-verity", help="Enable fs-verity on denied files "
                                                "that lack it (they become read-only).")] = False,
    prefer_volume: Annotated[bool, typer.Option("--prefer-volume/--no-prefer-volume")] = True,
    sign: Annotated[bool, typer.Option("--sign", help="Write a signed policy (PKCS#7) to -o.")] = False,
    key: KeyOption = None,
    cert: CertOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was learned as JSON (not the policy).")] = False,
) -> None:
    """Propose the rules that would have allowed what a permissive run denied."""
    from ..generate import learn as learning
    from ..generate.plan import Options
    from ..policy.parser import format_rule
    from ..policy.signing import policy_text

    if enable_verity:
        _say([READ_ONLY_WARNING])
    base = policy_text(read_bytes(policy)) if policy is not None else None
    with reported_errors(str(records) if records else "<stdin>"):
        denials = learning.parse_records(learning.read_lines(records, sys.stdin))
    with reported_errors(str(policy) if policy else None):
        learned = learning.learn(denials, Options(enable_verity, prefer_volume), base, name=name)
    if as_json:
        print_json({"denials": len(denials), "rules": [format_rule(g.rule).decode("utf-8", "backslashreplace") for g in learned.grants],
                    "files": sorted(p for g in learned.grants for p in g.paths),
                    "unlearnable": learned.unlearnable, "already_allowed": learned.already})
    if output is not None or not as_json:
        _write(learned.text, output, sign, key, cert)
    if not as_json:
        _say([f"{len(denials)} denied accesses, {len(learned.grants)} new rule(s)",
              *(f"already allowed: {what}" for what in learned.already),
              *(f"cannot learn: {what}" for what in learned.unlearnable)])


def measure_file(path: Path) -> "measure.Measurement":
    """`policy explain --file`: the real file's attributes on this machine."""
    from ..kernel import measure

    with reported_errors(str(path)):
        return measure.measure(path)


def audit_fields(m: "measure.Measurement", decision: "Decision") -> str:
    """The decision as a 1420 record would show it (without the event's hook, pid and comm)."""
    from ..policy.model import untrusted

    return (f"ipe_op={decision.op.name} path={untrusted(os.fsencode(m.path))} dev={untrusted(m.dev.encode())} "
            f"ino={m.ino} rule=\"{decision.rule_text}\"")


def _digest_text(digest: "Digest | None") -> str | None:
    """As a policy writes it (`sha256:<hex>`), or None."""
    return None if digest is None else f"{digest.alg.decode('latin-1')}:{digest.value.hex()}"


def measurement_json(m: "measure.Measurement") -> dict[str, object]:
    a = m.attributes()
    return {"path": m.path, "dev": m.dev, "ino": m.ino, "boot_verified": a.boot_verified,
            "dmverity_roothash": _digest_text(a.dmverity_roothash),
            "dmverity_device": f"/dev/mapper/{m.volume.name}" if m.volume else None,
            "dmverity_signature": a.dmverity_signature,
            "fsverity_digest": _digest_text(a.fsverity_digest),
            "fsverity_signature": a.fsverity_signature}


def print_measurement(m: "measure.Measurement", decision: "Decision") -> None:
    for key, value in measurement_json(m).items():
        if key not in ("path", "dev", "ino"):
            console.print(f"  {key}: {value}", markup=False, highlight=False)
    console.print(audit_fields(m, decision), markup=False, highlight=False, soft_wrap=True)


def exit_with_decision(wanted: bool, decision: "Decision") -> None:
    from ..policy.model import Action

    if wanted and decision.action is Action.DENY:
        raise typer.Exit(1)


verity_app = typer.Typer(help="dm-verity volumes for IPE: pack a directory, open and close images.",
                         no_args_is_help=True)


@verity_app.command("pack")
def pack_command(
    directory: Annotated[Path, typer.Argument(help="The directory to pack.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The image (IMAGE.verity, IMAGE.roothash "
                                         "and IMAGE.roothash.p7s are written beside it).")],
    key: KeyOption = None,
    cert: CertOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A read-only ext4 image of DIR with a dm-verity hash tree; prints its root hash and rule."""
    from ..generate import volumes
    from ..policy.parser import format_rule

    signer = _signer(key, cert)
    with reported_errors(str(output)):
        packed = volumes.pack(directory, output, signer)
    rule = format_rule(packed.rule).decode()  # as a policy spells it, ready to paste
    if as_json:
        print_json({"image": str(packed.image), "hash_tree": str(packed.hash_tree), "roothash": packed.roothash,
                    "signature": str(packed.signature) if packed.signature else None, "rule": rule})
        return
    typer.echo(f"root hash: {packed.roothash}")
    if packed.signature:
        typer.echo(f"signature: {packed.signature}")
    typer.echo(f"rule: {rule}")


@verity_app.command("open")
def open_command(
    image: Annotated[Path, typer.Argument(help="An image made by `verity pack`.")],
    name: Annotated[str, typer.Argument(help="The device: /dev/mapper/NAME.")],
    mount: Annotated[Optional[Path], typer.Option("--mount", help="Mount it read-only here.")] = None,
) -> None:
    """Open a packed image with dm-verity (with its root hash signature when there is one)."""
    from rich.markup import escape

    from ..generate import volumes

    with reported_errors(str(image)):
        packed = volumes.open_volume(image, name, mount)
    where = f", mounted at {escape(str(mount))}" if mount else ""
    typer.echo(f"/dev/mapper/{name}: root hash {packed.roothash}"
               f"{' (signed)' if packed.signature else ''}{where}")


@verity_app.command("close")
def close_command(name: Annotated[str, typer.Argument(help="The device: /dev/mapper/NAME.")]) -> None:
    """Unmount, close and detach a volume opened by `verity open`."""
    from ..generate import volumes

    with reported_errors():
        volumes.close_volume(name)


def register(root: typer.Typer, policy_app: typer.Typer) -> None:
    policy_app.command("generate")(generate_command)
    policy_app.command("learn")(learn_command)
    root.add_typer(verity_app, name="verity")
