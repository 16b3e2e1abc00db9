"""`policy sign` and `policy verify`, run on a bare typer app that only has these two commands."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ipe_bpf.cli.sign import register

from .signing_fixtures import (  # noqa: F401  (pki and policy_file are fixtures)
    POLICY,
    Identity,
    Pki,
    openssl_sign,
    openssl_verify,
    pki,
    policy_file,
)


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def run(app: typer.Typer, *args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def sign(app: typer.Typer, ident: Identity, policy: Path, out: Path, *extra: str):
    return run(app, "sign", policy, "--key", ident.key_path, "--cert", ident.cert_path, "-o", out, *extra)


def assert_one_line_error(result, path: Path, errno_name: str) -> str:
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"{path}: {errno_name}: "), line
    return line


def test_sign_then_verify(app: typer.Typer, pki: Pki, policy_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "signed.p7s"
    result = sign(app, pki.p256, policy_file, out)
    assert result.exit_code == 0, result.output
    assert "signed_test 1.2.3" in result.stdout and str(out) in result.stdout
    result = run(app, "verify", out, "--trust", pki.ca.cert_path)
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout
    assert "CN=p256,O=ipe-bpf tests" in result.stdout
    assert "signed_test 1.2.3" in result.stdout


def test_verify_json(app: typer.Typer, pki: Pki, policy_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "signed.p7s"
    assert sign(app, pki.rsa, policy_file, out, "--digest", "sha512").exit_code == 0
    result = run(app, "verify", out, "--trust", pki.dir, "--json")  # a directory of certificates
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["verified"] is True and obj["errno"] is None
    assert obj["signer"] == "CN=rsa,O=ipe-bpf tests"
    assert obj["digest"] == "sha512"
    assert obj["policy"] == {"name": "signed_test", "version": "1.2.3"}


def test_sign_json(app: typer.Typer, pki: Pki, policy_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "signed.p7s"
    result = sign(app, pki.p384, policy_file, out, "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["output"] == str(out) and obj["bytes"] == out.stat().st_size
    assert obj["signer"] == "CN=p384,O=ipe-bpf tests"
    assert obj["policy"] == {"name": "signed_test", "version": "1.2.3"}


def test_cli_signature_is_openssl_compatible(app: typer.Typer, pki: Pki, policy_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "signed.p7s"
    assert sign(app, pki.rsa, policy_file, out).exit_code == 0
    assert out.read_bytes() == openssl_sign(pki.rsa, policy_file, "-noattr", "-nosmimecap")
    proc = openssl_verify(out.read_bytes(), pki.rsa.cert_path, tmp_path)
    assert proc.returncode == 0 and proc.stdout == POLICY


def test_verify_accepts_openssl_signature(app: typer.Typer, pki: Pki, policy_file: Path) -> None:
    blob_path = policy_file.with_suffix(".p7s")
    blob_path.write_bytes(openssl_sign(pki.p384, policy_file, "-noattr", "-nosmimecap"))
    result = run(app, "verify", blob_path, "--trust", pki.p384.cert_path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["signer"] == "CN=p384,O=ipe-bpf tests"


def test_sign_refuses_an_invalid_policy_unless_told(app: typer.Typer, pki: Pki, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pol"
    bad.write_bytes(b"policy_name=x policy_version=1.0.0\nop=EXECUTE action=ALLOW\n")  # no DEFAULT
    out = tmp_path / "bad.p7s"
    assert_one_line_error(sign(app, pki.rsa, bad, out), bad, "EBADMSG")
    assert not out.exists()
    result = sign(app, pki.rsa, bad, out, "--no-check")
    assert result.exit_code == 0, result.output
    # The signature verifies, but the policy inside does not parse: verify says so.
    line = assert_one_line_error(run(app, "verify", out, "--trust", pki.rsa.cert_path), out, "EBADMSG")
    assert "DEFAULT" in line


def test_sign_key_errors(app: typer.Typer, pki: Pki, policy_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.p7s"
    line = assert_one_line_error(run(app, "sign", policy_file, "--key", pki.rsa.key_path,
                                     "--cert", pki.p256.cert_path, "-o", out), pki.rsa.key_path, "EINVAL")
    assert "does not belong" in line
    result = run(app, "sign", policy_file, "--key", tmp_path / "nokey", "--cert", pki.rsa.cert_path, "-o", out)
    assert result.exit_code == 1 and "ENOENT" in result.stderr
    assert run(app, "sign", policy_file, "--cert", pki.rsa.cert_path, "-o", out).exit_code == 2  # usage


def _tampered_content(blob: bytes) -> bytes:
    at = blob.index(POLICY) + 10
    return blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1:]


def _tampered_signature(blob: bytes) -> bytes:
    return blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:]


@pytest.mark.parametrize("case, errno_name", [
    ("tampered-content", "EKEYREJECTED"),
    ("tampered-signature", "EKEYREJECTED"),
    ("untrusted", "ENOKEY"),
    ("expired", "EKEYREJECTED"),
    ("truncated", "EBADMSG"),
    ("detached", "EBADMSG"),
    ("random", "EBADMSG"),
    ("plaintext", "EBADMSG"),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_verify_rejects(app: typer.Typer, pki: Pki, policy_file: Path, tmp_path: Path,
                        case: str, errno_name: str, as_json: bool) -> None:
    signer = {"untrusted": pki.untrusted, "expired": pki.expired}.get(case, pki.p256)
    good = openssl_sign(signer, policy_file, "-noattr", "-nosmimecap", detached=case == "detached")
    blob = {
        "tampered-content": _tampered_content,
        "tampered-signature": _tampered_signature,
        "truncated": lambda b: b[: len(b) // 3],
        "random": lambda b: random.Random(5).randbytes(len(b)),
        "plaintext": lambda b: POLICY,
    }.get(case, lambda b: b)(good)
    path = tmp_path / f"{case}.p7s"
    path.write_bytes(blob)
    args = ["verify", path, "--trust", pki.ca.cert_path, *(["--json"] if as_json else [])]
    result = run(app, *args)
    assert result.exit_code == 1, result.output
    if as_json:
        obj = json.loads(result.stdout)
        assert obj["verified"] is False and obj["errno"] == errno_name
        assert obj["message"] and obj["policy"] is None
    else:
        assert_one_line_error(result, path, errno_name)
        assert result.stdout == ""


def test_verify_bad_trust_path_names_it(app: typer.Typer, pki: Pki, policy_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "signed.p7s"
    assert sign(app, pki.rsa, policy_file, out).exit_code == 0
    garbage = tmp_path / "trust.pem"
    garbage.write_bytes(b"nothing here")
    assert_one_line_error(run(app, "verify", out, "--trust", garbage), garbage, "EINVAL")
    empty = tmp_path / "empty"
    empty.mkdir()
    line = assert_one_line_error(run(app, "verify", out, "--trust", empty), out, "ENOKEY")
    assert str(empty) in line


def test_verify_of_plain_text_says_it_is_not_signed(app: typer.Typer, pki: Pki, tmp_path: Path) -> None:
    plain = tmp_path / "plain.pol"
    plain.write_bytes(b"policy_name=p policy_version=1.0.0\nDEFAULT action=ALLOW\n")
    result = run(app, "verify", plain, "--trust", pki.ca.cert_path)
    assert result.exit_code == 1
    assert result.stderr.strip().startswith(f"{plain}: EBADMSG: not signed: ")


def test_sign_errors_name_the_wrong_file_without_library_internals(app: typer.Typer, pki: Pki, policy_file: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "x.p7s"
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    line = assert_one_line_error(run(app, "sign", policy_file, "--key", junk, "--cert", pki.rsa.cert_path, "-o", out),
                                 junk, "EINVAL")
    assert line == f"{junk}: EINVAL: not a private key (PEM or DER)"
    line = assert_one_line_error(run(app, "sign", policy_file, "--key", pki.rsa.key_path, "--cert", junk, "-o", out),
                                 junk, "EINVAL")
    assert line == f"{junk}: EINVAL: not a PEM or DER certificate"
    line = assert_one_line_error(run(app, "sign", policy_file, "--key", pki.rsa.cert_path, "--cert", pki.rsa.cert_path,
                                     "-o", out), pki.rsa.cert_path, "EINVAL")  # a certificate given as the key
    assert "Could not" not in line and "OpenSSL" not in line and "asn1" not in line.lower()
    assert not out.exists()
