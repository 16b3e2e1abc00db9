"""`ipe-bpf policy sign`, `verify` and `compile`: PKCS#7 envelopes for kernel IPE, and compiled
policies a build host makes for its targets."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer

from ..errors import IpeBpfError
from .common import console, fail, print_json, read_bytes, reported_errors

if TYPE_CHECKING:
    from ..policy.model import Policy


def _parse(content: bytes) -> "Policy":
    from ..policy.parser import parse_policy  # the parser is only needed once a file is read

    return parse_policy(content)


def _policy_json(policy: "Policy") -> dict[str, str]:
    from ..policy.model import text

    return {"name": text(policy.name), "version": policy.version_text}


def sign(
    policy_file: Annotated[Path, typer.Argument(metavar="POLICY", help="Policy text to sign.")],
    key: Annotated[Path, typer.Option("--key", help="Private key (PEM or DER, RSA or EC P-256/P-384).")],
    cert: Annotated[Path, typer.Option("--cert", help="The key's certificate (PEM or DER).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the signed .p7s.")],
    digest: Annotated[str, typer.Option("--digest", help="sha256, sha384 or sha512.")] = "sha256",
    no_check: Annotated[bool, typer.Option("--no-check", help="Sign even if the policy does not parse.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Sign a policy as kernel IPE takes it: attached PKCS#7, DER, no signed attributes."""
    from rich.markup import escape

    from ..policy import signing
    from ..policy.model import text

    content = read_bytes(policy_file)
    policy = None
    if not no_check:
        with reported_errors(str(policy_file)):
            policy = _parse(content)
    with reported_errors():
        signing.check_digest(digest)
    blob, signer = _signed(content, key, cert, digest)
    with reported_errors(str(output)):
        output.write_bytes(blob)
    if as_json:
        print_json({"output": str(output), "bytes": len(blob), "signer": signer, "digest": digest,
                    "policy": _policy_json(policy) if policy else None})
        return
    what = f" {escape(text(policy.name))} {policy.version_text}" if policy else ""
    console.print(f"[green]signed[/]{what} → {escape(str(output))} ({len(blob)} bytes, "
                  f"{digest}, signer {escape(signer)})", soft_wrap=True)


def _signed(content: bytes, key: Path, cert: Path, digest: str) -> tuple[bytes, str]:
    """``content`` in an attached PKCS#7 envelope signed with ``key``, and the signer's subject."""
    from ..policy import signing

    key_pem, cert_pem = read_bytes(key), read_bytes(cert)
    with reported_errors(str(key)):
        private_key = signing.load_private_key(key_pem)
    with reported_errors(str(cert)):
        certificate = signing.load_certificate(cert_pem, "signing certificate")
    with reported_errors(str(key)):  # the one remaining error: the key is not the certificate's
        blob = signing.sign_with(content, private_key, certificate, digest=digest)
    return blob, certificate.subject.rfc4514_string()


def compile_command(
    policy_file: Annotated[Path, typer.Argument(metavar="POLICY", help=(
        "The policy: text, or a signed .p7s (its text is compiled; the target checks its signature)."))],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the compiled policy.")],
    key: Annotated[Optional[Path], typer.Option("--key", help="Sign it with this private key (as `policy sign`).")] = None,
    cert: Annotated[Optional[Path], typer.Option("--cert", help="The key's certificate.")] = None,
    digest: Annotated[str, typer.Option("--digest", help="sha256, sha384 or sha512.")] = "sha256",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compile a policy into its kernel tables on a build host, for `policy deploy --compiled`:
    the target then verifies and installs them, parsing and compiling nothing.  Targets that need
    signed policies need it signed (--key and --cert) by a signer they trust."""
    from rich.markup import escape

    from ..kernel.store import version_text
    from ..policy import signing, tables_file
    from ..policy.model import text

    if (key is None) != (cert is None):
        fail("compile: EINVAL: --key and --cert go together (or leave both out for an unsigned compiled policy)")
    content = signing.policy_text(read_bytes(policy_file))
    with reported_errors(str(policy_file)):
        data, tables, rules = tables_file.compile_text(content)
    signer = None
    if key is not None and cert is not None:
        with reported_errors():
            signing.check_digest(digest)
        data, signer = _signed(data, key, cert, digest)
    with reported_errors(str(output)):
        output.write_bytes(data)
    if as_json:
        print_json({"output": str(output), "bytes": len(data), "signer": signer,
                    "policy": {"name": text(tables.name), "version": version_text(tables.version)},
                    "rules": rules, "digest_entries": tables.digest_count, "rule_entries": tables.rule_count})
        return
    console.print(f"[green]compiled[/] {escape(text(tables.name))} {version_text(tables.version)} "
                  f"({rules} rules: {tables.digest_count} digest and {tables.rule_count} rule "
                  f"entries) → {escape(str(output))} ({len(data)} bytes, "
                  + (f"signed by {escape(signer)})" if signer else "[bold]unsigned[/]: for --unsigned targets only)"),
                  soft_wrap=True)


def _verify_failed(err: IpeBpfError, file: Path, as_json: bool) -> NoReturn:
    if err.path is None:
        err.located(str(file))
    if as_json:
        print_json({"verified": False, "errno": err.errno_name, "line": err.line,
                    "message": err.message, "signer": None, "policy": None})
        raise typer.Exit(1)
    fail(str(err))


def verify(
    file: Annotated[Path, typer.Argument(metavar="FILE.p7s", help="Signed policy (DER PKCS#7).")],
    trust: Annotated[Path, typer.Option("--trust", help="Trusted certificate(s): a PEM/DER file, "
                                                          "a PEM bundle or a directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Verify a signed policy (or compiled policy) in-process and show who signed it and what it is."""
    from rich.markup import escape

    from ..kernel.store import version_text
    from ..policy import signing, tables_file
    from ..policy.model import text

    blob = read_bytes(file)
    try:
        trusted = signing.load_trust(trust)
        verified = signing.verify_policy(blob, trusted)
        compiled = tables_file.compiled_identity(verified.content)
        if compiled is None:
            policy = _parse(verified.content)
            described = {"name": text(policy.name), "version": policy.version_text}
        else:
            described = {"name": text(compiled[0]), "version": version_text(compiled[1]),
                         "compiled_from": f"sha256:{compiled[2]}"}
    except IpeBpfError as err:
        _verify_failed(err, file, as_json)
    signer = verified.signer
    if as_json:
        print_json({"verified": True, "errno": None, "line": None, "message": "verified",
                    "signer": verified.signer_subject, "issuer": signer.issuer.rfc4514_string(),
                    "digest": verified.digest, "policy": described})
        return
    what = f"{described['name']} {described['version']}"
    if compiled is not None:
        what += f" (compiled policy of the text {described['compiled_from']})"
    rows = [("signer", verified.signer_subject), ("issuer", signer.issuer.rfc4514_string()),
            ("digest", verified.digest), ("policy", what)]
    console.print(f"[green]verified[/]: {escape(str(file))}", soft_wrap=True)
    for label, value in rows:
        console.print(f"  {label:<7} {escape(value)}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `sign`, `verify` and `compile` to the `policy` sub-app."""
    app.command("sign")(sign)
    app.command("verify")(verify)
    app.command("compile")(compile_command)
