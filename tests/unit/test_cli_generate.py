"""`policy generate`, `policy learn`, `policy explain --file` and the root hash signature, from the CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ipe_bpf.policy.parser import format_rule
from ipe_bpf.cli import app
from ipe_bpf.generate.fsverity import file_digest
from ipe_bpf.generate.volumes import sign_roothash
from ipe_bpf.policy import signing
from ipe_bpf.policy.model import Digest
from ipe_bpf.policy.parser import parse_policy

from .signing_fixtures import Pki, openssl, pki  # noqa: F401

runner = CliRunner()
ROOTHASH = "4392b2b4d8a0e2fdab5c1f4d3e0ef1aa1b6b9cc1e25cb0c3f61da8e8d0c0f5a7"


@pytest.fixture()
def programs(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy("/usr/bin/true", d / "true")
    (d / "script").write_text("#!/bin/sh\necho hi\n")
    (d / "script").chmod(0o755)
    (d / "data.txt").write_text("not executable\n")
    return d


def test_generate_directory_with_closure(programs: Path) -> None:
    result = runner.invoke(app, ["policy", "generate", str(programs)])
    assert result.exit_code == 0, result.output
    text = result.stdout.encode()
    policy = parse_policy(text)
    digests = {str(r.properties[0].digest.value.hex()) for r in policy.rules}
    want = {programs / "true", programs / "script", Path(os.path.realpath("/bin/sh")),
            Path(os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")), Path(os.path.realpath("/lib64/ld-linux-x86-64.so.2"))}
    assert {file_digest(p).hex() for p in want} <= digests
    assert file_digest(programs / "data.txt").hex() not in digests
    assert f"# {programs / 'script'}\n".encode() in text
    again = runner.invoke(app, ["policy", "generate", str(programs)])
    assert again.stdout == result.stdout  # deterministic


def test_generate_no_closure_writes_file_that_checks(programs: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.pol"
    result = runner.invoke(app, ["policy", "generate", "--no-closure", "--name", "mine", "--version", "1.2.3",
                                 str(programs / "true"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    policy = parse_policy(out.read_bytes())
    assert (policy.name, policy.version) == (b"mine", (1, 2, 3))
    assert [format_rule(r).decode() for r in policy.rules] == [f"op=EXECUTE fsverity_digest=sha256:{file_digest(programs / 'true').hex()} action=ALLOW"]
    assert runner.invoke(app, ["policy", "check", str(out)]).exit_code == 0
    assert "lack fs-verity" in result.stderr


def test_generate_signed(programs: Path, tmp_path: Path, pki: Pki) -> None:
    out = tmp_path / "p.p7s"
    result = runner.invoke(app, ["policy", "generate", "--no-closure", str(programs / "true"), "--sign",
                                 "--key", str(pki.rsa.key_path), "--cert", str(pki.rsa.cert_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    verified = signing.verify_policy(out.read_bytes(), [pki.rsa.cert])
    assert parse_policy(verified.content).rules


@pytest.mark.parametrize(("args", "code", "message"), [
    (["/nonexistent/prog"], 1, "/nonexistent/prog: ENOENT"),
    (["--package", "no-such-package-ipe"], 1, "ENOENT: package 'no-such-package-ipe' is not installed"),
    ([], 2, "nothing to allow"),
    (["/usr/bin/true", "--hash-alg", "md5"], 2, "EINVAL"),
    (["/usr/bin/true", "--sign"], 2, "--sign needs"),
])
def test_generate_errors_are_one_line(args: list[str], code: int, message: str) -> None:
    result = runner.invoke(app, ["policy", "generate", *args])
    assert result.exit_code == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_learn_lists_what_it_cannot_learn(tmp_path: Path, programs: Path) -> None:
    records = tmp_path / "records"
    ino = os.stat(programs / "true").st_ino
    records.write_text(f'type=1420 audit(1.0:1): ipe_op=EXECUTE ipe_hook=BPRM_CHECK enforcing=0 pid=1 comm="x" '
                       f'path="{programs / "true"}" dev="vda" ino={ino} rule="DEFAULT op=EXECUTE action=DENY"\n')
    result = runner.invoke(app, ["policy", "learn", str(records), "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["rules"] == [] and report["denials"] == 1
    assert "--enable-verity" in report["unlearnable"][0]
    human = runner.invoke(app, ["policy", "learn", str(records)])
    assert human.exit_code == 0 and "cannot learn: EXECUTE" in human.stderr
    assert parse_policy(human.stdout.encode()).rules == ()


def test_explain_file_measures_the_real_file(tmp_path: Path, programs: Path) -> None:
    pol = tmp_path / "p.pol"
    pol.write_text("policy_name=p policy_version=0.0.1\nDEFAULT action=ALLOW\nDEFAULT op=EXECUTE action=DENY\n"
                   f"op=EXECUTE fsverity_digest=sha256:{file_digest(programs / 'true').hex()} action=ALLOW\n")
    # no fs-verity on this file here: its digest is not the kernel's to see, so the default denies
    result = runner.invoke(app, ["policy", "explain", str(pol), "--file", str(programs / "true"), "--exit-status", "--json"])
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["action"] == "DENY" and out["file"]["fsverity_digest"] is None
    assert out["audit"].endswith(f'ino={os.stat(programs / "true").st_ino} rule="DEFAULT op=EXECUTE action=DENY"')
    allow = runner.invoke(app, ["policy", "explain", str(pol), "--file", str(programs / "true"), "--op", "KMODULE",
                                "--exit-status"])
    assert allow.exit_code == 0 and "ALLOW" in allow.stdout
    both = runner.invoke(app, ["policy", "explain", str(pol), "--file", "/usr/bin/true", "--boot-verified"])
    assert both.exit_code == 2


def test_explain_file_takes_what_this_kernel_cannot_evaluate_as_false(tmp_path: Path, programs: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On a 6.1-like kernel a signed fs-verity file is evaluated as unsigned, as the program does."""
    from dataclasses import replace

    from ipe_bpf.cli import generate
    from ipe_bpf.kernel import features, measure
    from ipe_bpf.kernel.pins import HOOKS

    real = measure.measure(programs / "true")
    signed = replace(real, fsverity=Digest(b"sha256", file_digest(programs / "true")), fsverity_signed=True)
    monkeypatch.setattr(generate, "measure_file", lambda path: signed)
    no_hooks = tuple(h for h in HOOKS if "integrity" not in h)
    monkeypatch.setattr(features, "running_kernel", lambda: features.KernelFeatures(no_hooks, "inode", None, True, False, True, False))
    pol = tmp_path / "p.pol"
    pol.write_text("policy_name=p policy_version=0.0.1\nDEFAULT action=ALLOW\n"
                   "op=EXECUTE fsverity_signature=TRUE action=DENY\n")
    out = json.loads(runner.invoke(app, ["policy", "explain", str(pol), "--file", str(programs / "true"), "--json"]).stdout)
    assert (out["action"], out["always_false_here"]) == ("ALLOW", ["fsverity_signature"])
    human = runner.invoke(app, ["policy", "explain", str(pol), "--file", str(programs / "true")]).stdout
    assert "cannot evaluate the file's fsverity_signature: FALSE here" in human


def test_roothash_signature_is_what_openssl_makes(tmp_path: Path, pki: Pki) -> None:
    """RSA PKCS#1 v1.5 is deterministic: the bytes equal openssl's -nocerts -noattr detached DER."""
    content = tmp_path / "roothash.txt"
    content.write_text(ROOTHASH)
    ours = sign_roothash(ROOTHASH, pki.rsa.key_pem, pki.rsa.cert_pem)
    theirs = tmp_path / "openssl.p7s"
    made = openssl("smime", "-sign", "-nocerts", "-noattr", "-binary", "-in", content, "-inkey", pki.rsa.key_path,
                   "-signer", pki.rsa.cert_path, "-outform", "der", "-out", theirs)
    assert made.returncode == 0, made.stderr
    assert ours == theirs.read_bytes()
    sig = tmp_path / "ours.p7s"
    sig.write_bytes(ours)
    checked = openssl("smime", "-verify", "-binary", "-inform", "der", "-in", sig, "-content", content,
                      "-certfile", pki.rsa.cert_path, "-CAfile", pki.rsa.cert_path, "-purpose", "any")
    assert checked.returncode == 0, checked.stderr
