"""A policy compiled on a build host (`policy compile`) and deployed with `--compiled`: its
tables are installed without parsing or compiling, and only on the trust the policy itself needs."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ipe_bpf.audit.policy_records import AuditIdentity
from ipe_bpf.cli import app
from ipe_bpf.errors import IpeBpfError
from ipe_bpf.kernel.lifecycle import Lifecycle
from ipe_bpf.kernel.store import PolicyStore
from ipe_bpf.kernel.submission import Compiled
from ipe_bpf.policy import parser, tables_file
from ipe_bpf.policy.compiler import compile_policy

from .lifecycle_fixtures import FakeTarget, Signer
from .test_kernel_loader import HOOKS, _features
from .test_lifecycle import signer, stranger, trust  # noqa: F401  (fixtures)

DIGESTS = [hashlib.sha256(bytes([i])).hexdigest() for i in range(30)]


def text(version: str = "1.0.0", extra: str = "") -> bytes:
    return (f"policy_name=app policy_version={version}\nDEFAULT action=DENY\n"
            + "".join(f"op=EXECUTE fsverity_digest=sha256:{d} action=ALLOW\n" for d in DIGESTS)
            + f"op=KMODULE boot_verified=TRUE action=ALLOW\n{extra}").encode()


def compiled(content: bytes, signer: Signer | None = None) -> Compiled:
    data, _, _ = tables_file.compile_text(content)
    return Compiled(signer.sign(data) if signer else data, "app.ipec")


@pytest.fixture()
def life(tmp_path: Path) -> Lifecycle:
    return Lifecycle(PolicyStore(tmp_path / "state"), FakeTarget(), identity=AuditIdentity(auid=0, ses=1),
                     clock_ns=lambda: 1_700_000_000_000_000_000)


def installs(life: Lifecycle) -> list:  # type: ignore[type-arg]
    assert isinstance(life.target, FakeTarget)
    return life.target.installs


def refuse_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(data: bytes) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(parser, "parse_policy", refuse)


def refused(call) -> IpeBpfError:  # type: ignore[no-untyped-def]
    with pytest.raises(IpeBpfError) as err:
        call()
    return err.value


def test_deploy_installs_the_signed_compiled_tables_without_parsing(
        life: Lifecycle, signer: Signer, trust, monkeypatch: pytest.MonkeyPatch) -> None:
    content = text()
    blob, tables = signer.sign(content), compiled(content, signer)
    expected = compile_policy(parser.parse_policy(content)).tables
    refuse_parsing(monkeypatch)
    out = life.deploy(blob, trust, activate=True, compiled=tables)
    assert out.applied and out.policy is not None and out.policy.active and out.policy.signed
    assert (out.policy.name_text, out.policy.version_text) == ("app", "1.0.0")
    assert installs(life)[-1][0] == expected
    assert out.policy.digest == hashlib.sha256(blob).hexdigest()  # what audit records name
    (kept,) = (life.store.root / "policies").glob("*.tables")  # the store's cache: activate parses nothing
    assert tables_file.read(kept.read_bytes(), hashlib.sha256(content).hexdigest(), expected.abi) == expected


def test_update_of_the_active_policy_installs_the_compiled_tables(life: Lifecycle, signer: Signer, trust,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    life.deploy(signer.sign(text()), trust, activate=True)
    newer = text("1.0.1", "op=EXECUTE boot_verified=TRUE action=ALLOW\n")
    expected, tables = compile_policy(parser.parse_policy(newer)).tables, compiled(newer, signer)
    refuse_parsing(monkeypatch)
    out = life.update(b"app", signer.sign(newer), trust, compiled=tables)
    assert out.applied and installs(life)[-1][0] == expected


def test_the_policy_signature_is_still_checked(life: Lifecycle, signer: Signer, stranger: Signer, trust) -> None:
    content = text()
    tables = compiled(content, signer)
    assert refused(lambda: life.deploy(content, trust, compiled=tables)).errno_name == "EBADMSG"
    err = refused(lambda: life.deploy(stranger.sign(content), trust, compiled=tables, source="app.p7s"))
    assert err.errno_name == "ENOKEY" and err.path == "app.p7s"
    assert life.list().policies == () and installs(life) == []


def test_compiled_policies_need_the_trust_a_policy_needs(life: Lifecycle, signer: Signer, stranger: Signer,
                                                         trust) -> None:
    content = text()
    blob = signer.sign(content)
    unsigned = refused(lambda: life.deploy(blob, trust, compiled=compiled(content)))
    assert unsigned.errno_name == "EBADMSG" and unsigned.path == "app.ipec" and "not signed" in unsigned.message
    assert refused(lambda: life.deploy(blob, trust, compiled=compiled(content, stranger))).errno_name == "ENOKEY"
    signed = compiled(content, signer).blob
    at = signed.index(b'"crc32"')  # inside the signed content: the signature no longer verifies
    tampered = Compiled(signed[:at] + b'"crc33"' + signed[at + 7:], "app.ipec")
    assert refused(lambda: life.deploy(blob, trust, compiled=tampered)).errno_name == "EKEYREJECTED"
    assert life.list().policies == () and installs(life) == []
    # where unsigned policies are allowed, so are unsigned compiled policies
    assert life.deploy(content, (), allow_unsigned=True, compiled=compiled(content)).changed


def test_tables_of_another_text_are_einval_and_change_nothing(life: Lifecycle, signer: Signer, trust) -> None:
    life.deploy(signer.sign(text()), trust, activate=True)
    before = installs(life)[:]
    other = text("1.0.1", "op=EXECUTE boot_verified=TRUE action=ALLOW\n")
    err = refused(lambda: life.deploy(signer.sign(text("2.0.0")), trust, activate=True,
                                      compiled=compiled(other, signer)))
    assert err.errno_name == "EINVAL" and "compiled from another policy text" in str(err)
    assert str(err).startswith("app.ipec: EINVAL")
    assert [p.version_text for p in life.list().policies] == ["1.0.0"] and installs(life) == before


@pytest.mark.parametrize("what", ["policy text", "damaged", "no property list"])
def test_what_is_no_compiled_policy_is_ebadmsg(life: Lifecycle, what: str) -> None:
    content = text()
    data = compiled(content).blob
    if what == "policy text":
        data = content
    elif what == "damaged":
        data = data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:]
    else:  # a tables file the store keeps, not one `policy compile` made
        data = tables_file.write(compile_policy(parser.parse_policy(content)).tables,
                                 hashlib.sha256(content).hexdigest())
    err = refused(lambda: life.deploy(content, (), allow_unsigned=True, compiled=Compiled(data, "x.ipec")))
    assert err.errno_name == "EBADMSG" and err.path == "x.ipec"
    assert life.list().policies == ()


def test_tables_packed_for_another_abi_are_compiled_here_with_a_warning(
        life: Lifecycle, monkeypatch: pytest.MonkeyPatch) -> None:
    content = text()
    tables = compiled(content)
    monkeypatch.setattr(tables_file, "abi_fingerprint", lambda abi: "0" * 64)
    out = life.deploy(content, (), allow_unsigned=True, activate=True, compiled=tables)
    assert any("packed for another ipe-bpf" in w and "app.ipec" in w for w in out.warnings)
    assert installs(life)[-1][0] == compile_policy(parser.parse_policy(content)).tables


def test_unevaluable_properties_are_refused_from_the_compiled_list(tmp_path: Path, signer: Signer, trust,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    kernel_6_1 = _features(hooks=tuple(h for h in HOOKS if "integrity" not in h), dm_table_signature=False)
    life = Lifecycle(PolicyStore(tmp_path), kernel=lambda: kernel_6_1)
    content = text(extra="op=EXECUTE fsverity_signature=TRUE action=ALLOW\n")
    tables = compiled(content, signer)
    real_parse = parser.parse_policy
    refuse_parsing(monkeypatch)
    err = refused(lambda: life.deploy(signer.sign(content), trust, compiled=tables))
    assert err.errno_name == "EOPNOTSUPP" and "fsverity_signature" in str(err)
    monkeypatch.setattr(parser, "parse_policy", real_parse)  # the warning names the rules: it reads the text
    out = life.deploy(signer.sign(content), trust, compiled=tables, allow_unevaluable=True)
    assert any("line 34 `op=EXECUTE fsverity_signature=TRUE action=ALLOW` never matches" in w for w in out.warnings)


# ------------------------------------------------------------------------------------- CLI


def openssl_content(signed: Path, cert: Path) -> bytes:
    """The content of an attached PKCS#7 as `openssl cms -verify` checks and extracts it."""
    done = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(signed),
                           "-CAfile", str(cert), "-purpose", "any"], capture_output=True, check=True)
    return done.stdout


def test_cli_compile_then_deploy(tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPE_BPF_STATE_DIR", str(tmp_path / "state"))
    key, cert = tmp_path / "k.pem", signer.write_cert(tmp_path / "trust")
    key.write_bytes(signer.key_pem)
    policy = tmp_path / "app.pol"
    policy.write_bytes(text())
    (tmp_path / "app.p7s").write_bytes(signer.sign(text()))
    runner = CliRunner()
    made = runner.invoke(app, ["policy", "compile", str(policy), "-o", str(tmp_path / "app.ipec"),
                               "--key", str(key), "--cert", str(cert)])
    assert made.exit_code == 0, made.output
    assert "compiled app 1.0.0 (31 rules: 30 digest and 1 rule entries)" in made.output
    assert openssl_content(tmp_path / "app.ipec", cert) == tables_file.compile_text(text())[0]
    deployed = runner.invoke(app, ["policy", "deploy", str(tmp_path / "app.p7s"), "--trust", str(cert),
                                   "--compiled", str(tmp_path / "app.ipec"), "--activate"])
    assert deployed.exit_code == 0, deployed.output
    assert 'deployed and activated policy "app" 1.0.0' in deployed.output
    half = runner.invoke(app, ["policy", "compile", str(policy), "-o", str(tmp_path / "x"), "--key", str(key)])
    assert half.exit_code == 1 and "compile: EINVAL: --key and --cert go together" in half.output
    assert not (tmp_path / "x").exists()


def test_cli_verify_names_what_a_compiled_policy_was_compiled_from(tmp_path: Path, signer: Signer) -> None:
    cert = signer.write_cert(tmp_path / "trust")
    (tmp_path / "app.ipec").write_bytes(compiled(text(), signer).blob)
    done = CliRunner().invoke(app, ["policy", "verify", str(tmp_path / "app.ipec"), "--trust", str(cert), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["policy"] == {
        "name": "app", "version": "1.0.0", "compiled_from": f"sha256:{hashlib.sha256(text()).hexdigest()}"}
