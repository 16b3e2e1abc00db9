"""`ipe-bpf policy check|explain|format` and the top-level CLI contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ipe_bpf import __version__
from ipe_bpf.cli import app

runner = CliRunner()

GOOD = b"""policy_name=demo policy_version=1.2.3
DEFAULT action=ALLOW
DEFAULT op=EXECUTE action=DENY
op=EXECUTE boot_verified=TRUE fsverity_signature=TRUE action=ALLOW
op=EXECUTE fsverity_digest=sha256:abcd action=ALLOW
op=KMODULE dmverity_signature=FALSE action=DENY
"""


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.pol"
    path.write_bytes(GOOD)
    return path


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "p.pol"
    path.write_bytes(data)
    return path


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_check_valid_summary(good: Path) -> None:
    result = runner.invoke(app, ["policy", "check", str(good)])
    assert result.exit_code == 0, result.output
    assert "demo 1.2.3" in result.stdout and "valid" in result.stdout


def test_check_invalid_one_line_on_stderr(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace(b"sha256:abcd", b"sha256:abc"))
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"{path}:5: EINVAL: digest 'fsverity_digest=sha256:abc' has invalid hex"
    assert result.stdout == ""


def test_check_json_contract(good: Path, tmp_path: Path) -> None:
    ok = runner.invoke(app, ["policy", "check", "--json", str(good)])
    assert ok.exit_code == 0
    body = json.loads(ok.stdout)
    assert set(body) == {"valid", "errno", "line", "message", "policy", "warnings"}
    assert body["valid"] is True and body["errno"] is None and body["line"] is None
    assert body["policy"]["name"] == "demo" and body["policy"]["rules_per_op"]["EXECUTE"] == 2
    bad = runner.invoke(app, ["policy", "check", "--json", str(write(tmp_path, b"policy_name=x policy_version=1.0.70000\n"))])
    assert bad.exit_code == 1
    body = json.loads(bad.stdout)
    assert (body["valid"], body["errno"], body["line"], body["policy"]) == (False, "ERANGE", 1, None)
    assert "70000" in body["message"]


def test_check_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["policy", "check", str(tmp_path / "nope.pol")])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"{tmp_path / 'nope.pol'}: ENOENT: No such file or directory"


def test_explain_rule_and_misses(good: Path) -> None:
    result = runner.invoke(
        app, ["policy", "explain", str(good), "--op", "EXECUTE", "--fsverity-digest", "sha256:ABCD", "--json"]
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["action"] == "ALLOW" and body["source"] == "rule" and body["line"] == 5
    assert body["skipped"] == [
        {"line": 4, "rule": "op=EXECUTE boot_verified=TRUE fsverity_signature=TRUE action=ALLOW", "failed": "boot_verified=TRUE"}
    ]


def test_explain_shows_the_rule_as_the_kernel_audits_it(good: Path) -> None:
    """The rule text of `explain` is the rule="..." of the kernel's 1420 record (quoted alg, HEX)."""
    args = ["policy", "explain", str(good), "--op", "EXECUTE", "--fsverity-digest", "sha256:abcd"]
    body = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert body["rule"] == 'op=EXECUTE fsverity_digest="sha256":ABCD action=ALLOW'
    human = runner.invoke(app, args)
    assert 'ALLOW by rule: op=EXECUTE fsverity_digest="sha256":ABCD action=ALLOW (line 5)' in human.stdout
    missed = runner.invoke(app, ["policy", "explain", str(good), "--op", "EXECUTE"])
    assert 'no: fsverity_digest="sha256":ABCD' in missed.stdout


def test_explain_default_and_no_file(good: Path) -> None:
    denied = json.loads(runner.invoke(app, ["policy", "explain", str(good), "--op", "EXECUTE", "--boot-verified", "--json"]).stdout)
    assert (denied["action"], denied["source"], denied["rule"]) == ("DENY", "op_default", "DEFAULT op=EXECUTE action=DENY")
    assert denied["skipped"][0]["failed"] == "fsverity_signature=TRUE"
    anon = json.loads(runner.invoke(app, ["policy", "explain", str(good), "--op", "KMODULE", "--no-file", "--json"]).stdout)
    assert (anon["action"], anon["line"]) == ("DENY", 6)
    unknown = json.loads(runner.invoke(app, ["policy", "explain", str(good), "--op", "UNKNOWN", "--json"]).stdout)
    assert (unknown["action"], unknown["rule"]) == ("ALLOW", "DEFAULT action=ALLOW")


def test_explain_human_output(good: Path) -> None:
    result = runner.invoke(app, ["policy", "explain", str(good), "--op", "EXECUTE"])
    assert result.exit_code == 0
    assert "DENY" in result.stdout and "no: boot_verified=TRUE" in result.stdout


@pytest.mark.parametrize("args", [["--op", "execute"], ["--op", "EXECUTE", "--fsverity-digest", "zz"], []])
def test_explain_usage_errors_exit_2(good: Path, args: list[str]) -> None:
    result = runner.invoke(app, ["policy", "explain", str(good), *args])
    assert result.exit_code == 2


def test_format_prints_canonical_text(good: Path) -> None:
    result = runner.invoke(app, ["policy", "format", str(good)])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1:3] == ["DEFAULT action=ALLOW", "DEFAULT op=EXECUTE action=DENY"]


def test_unknown_command_is_usage_error() -> None:
    assert runner.invoke(app, ["policy", "frobnicate"]).exit_code == 2


def test_console_script_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "ipe_bpf", "policy", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "check" in result.stdout


def test_output_to_a_pipe_is_never_wrapped(tmp_path: Path) -> None:
    """A long rule stays on one line, in the explain output and in the check summary table."""
    props = " ".join(["boot_verified=TRUE", "dmverity_signature=FALSE", "fsverity_signature=TRUE"] * 4)
    digest = "ab" * 64
    text = (b"policy_name=" + b"n" * 120 + b" policy_version=1.0.0\nDEFAULT action=DENY\n"
            + f"op=EXECUTE {props} fsverity_digest=sha512:{digest} action=ALLOW\n".encode())
    path = write(tmp_path, text)
    out = subprocess.run([sys.executable, "-m", "ipe_bpf", "policy", "explain", str(path), "--op", "EXECUTE"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rule = f'op=EXECUTE {props} fsverity_digest="sha512":{digest.upper()} action=ALLOW'
    assert f"  line 3: {rule}  (no: boot_verified=TRUE)" in out.stdout.splitlines()
    check = subprocess.run([sys.executable, "-m", "ipe_bpf", "policy", "check", str(path)],
                           capture_output=True, text=True)
    assert any(line.strip() == "n" * 120 + " 1.0.0" for line in check.stdout.splitlines()), check.stdout


def test_check_summary_shows_allow_defaults(tmp_path: Path) -> None:
    """ALLOW is 0: a global ALLOW and a per-op ALLOW must show as such, not as '-' or 'global'."""
    path = write(tmp_path, b"policy_name=d policy_version=1.0.0\nDEFAULT action=ALLOW\n"
                           b"DEFAULT op=KMODULE action=DENY\nDEFAULT op=FIRMWARE action=ALLOW\n")
    out = runner.invoke(app, ["policy", "check", str(path)]).stdout
    cells = [line.replace("\u2502", " ").split() for line in out.splitlines()]
    rows = {c[0]: c[2:] for c in cells if c and c[0] in {"EXECUTE", "KMODULE", "FIRMWARE"}}
    assert rows == {"EXECUTE": ["ALLOW", "(global)"], "KMODULE": ["DENY", "(op)"], "FIRMWARE": ["ALLOW", "(op)"]}


@pytest.mark.parametrize("bad", [b"op=EXECUTE " + b"x" * (1 << 20) + b" action=ALLOW",
                                 b"op=EXECUTE fsverity_digest=sha256:" + b"g" * (1 << 20) + b" action=ALLOW"])
def test_error_lines_are_capped(tmp_path: Path, bad: bytes) -> None:
    """A 1 MB bad token is named, not echoed whole."""
    path = write(tmp_path, b"policy_name=t policy_version=0.0.0\nDEFAULT action=ALLOW\n" + bad + b"\n")
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith(f"{path}:3: ") and "\n" not in line and len(line) < 300, line[:400]
    assert f"({len(bad.split()[1])} bytes)" in line
    body = json.loads(runner.invoke(app, ["policy", "check", "--json", str(path)]).stdout)
    assert len(body["message"]) < 200


@pytest.mark.parametrize("command", [["policy", "check"], ["policy", "format"], ["policy", "deploy", "--unsigned"],
                                     ["policy", "verify", "--trust", "/dev/null"]])
def test_devices_are_refused_before_reading(command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/zero used to be read until a MemoryError."""
    monkeypatch.setenv("IPE_BPF_STATE_DIR", str(tmp_path / "state"))
    result = subprocess.run([sys.executable, "-m", "ipe_bpf", *command, "/dev/zero"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "/dev/zero" in result.stderr and "EINVAL" in result.stderr and "character device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_policies_above_the_limit_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ipe_bpf.policy import files

    monkeypatch.setattr(files, "MAX_INPUT_BYTES", 1000)
    path = write(tmp_path, GOOD + b"#" * 1000)
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"{path}: EFBIG: {len(GOOD) + 1000} bytes, more than the 1000 bytes ipe-bpf reads"


def test_a_regular_file_is_read_in_one_piece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One read() of its size and a byte more, then the one that finds its end: no 11 MB policy
    is copied together from chunks; every byte comes back."""
    from ipe_bpf.policy import files

    data = os.urandom(3 << 20)
    path = tmp_path / "big.pol"
    path.write_bytes(data)
    sizes: list[int] = []
    real = os.read
    monkeypatch.setattr(files.os, "read", lambda fd, n: sizes.append(n) or real(fd, n))
    assert files.read_input(path) == data
    assert sizes == [len(data) + 1, 1 << 20]


def test_a_pipe_is_read_up_to_the_limit(tmp_path: Path) -> None:
    from ipe_bpf.errors import InputError
    from ipe_bpf.policy.files import read_input

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"head -c 5000 /dev/zero > {fifo}"])
    with pytest.raises(InputError) as info:
        read_input(fifo, limit=4096)
    writer.wait(timeout=10)
    assert info.value.errno_name == "EFBIG"
    writer = subprocess.Popen(["sh", "-c", f"printf abc > {fifo}"])
    assert read_input(fifo, limit=4096) == b"abc"
    writer.wait(timeout=10)


def test_check_json_of_a_missing_file_is_json(tmp_path: Path) -> None:
    result = runner.invoke(app, ["policy", "check", "--json", str(tmp_path / "nope.pol")])
    assert result.exit_code == 1
    body = json.loads(result.stdout)
    assert (body["valid"], body["errno"], body["policy"]) == (False, "ENOENT", None)


HEADER = b"policy_name=t policy_version=0.0.0\nDEFAULT action=ALLOW\n"


def test_a_nul_byte_cutting_the_policy_is_accepted_with_a_warning(tmp_path: Path) -> None:
    """The kernel stops at a NUL: the rules after it are lost, so say so (line of the NUL)."""
    path = write(tmp_path, HEADER + b"op=EXECUTE boot_verified=TRUE action=ALLOW\0\nop=EXECUTE action=DENY\n")
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 0
    assert result.stderr.startswith(f"warning: {path}:3: a NUL byte ends the policy here")
    body = json.loads(runner.invoke(app, ["policy", "check", "--json", str(path)]).stdout)
    assert body["valid"] and body["policy"]["rules_per_op"]["EXECUTE"] == 1 and body["warnings"][0]["line"] == 3
    assert runner.invoke(app, ["policy", "check", str(write(tmp_path, HEADER + b"\0\0\n"))]).stderr == ""


def test_deploy_warns_about_a_nul_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPE_BPF_STATE_DIR", str(tmp_path / "state"))
    path = write(tmp_path, HEADER + b"\0op=EXECUTE action=DENY\n")
    result = runner.invoke(app, ["policy", "deploy", "--unsigned", str(path)])
    assert result.exit_code == 0, result.output
    assert f"warning: {path}:3: a NUL byte ends the policy here" in result.stderr


@pytest.mark.parametrize(("rule", "why"), [
    (b"op=EXECUTE boot_verified=TRUE boot_verified=FALSE action=ALLOW", "boot_verified=TRUE and boot_verified=FALSE"),
    (b"op=EXECUTE fsverity_digest=sha256:aa fsverity_digest=sha256:bb action=ALLOW", "two different fsverity_digest"),
])
def test_lint_rules_that_can_never_match(tmp_path: Path, rule: bytes, why: str) -> None:
    path = write(tmp_path, HEADER + rule + b"\n")
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 0
    assert result.stderr.strip() == f"warning: {path}:3: this rule can never match: " + (
        why if "TRUE" in why else why + " values (a file has one)")


@pytest.mark.parametrize(("rule", "message"), [
    (b"op=EXECUTE op=KMODULE action=ALLOW", "a second op= ('op=KMODULE'): a line has one op"),
    (b"op=EXECUTE boot_verifed=TRUE action=ALLOW", "unknown property 'boot_verifed=TRUE' (did you mean boot_verified?)"),
    (b"op=EXECUTE fsverity_digests=sha256:aa action=ALLOW", "(did you mean fsverity_digest?)"),
    (b"opp=EXECUTE action=ALLOW", "found 'opp=EXECUTE' (did you mean op?)"),
])
def test_second_op_and_misspelt_keys_are_explained(tmp_path: Path, rule: bytes, message: str) -> None:
    path = write(tmp_path, HEADER + rule + b"\n")
    result = runner.invoke(app, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{path}:3: EBADMSG: ") and message in result.stderr


def test_format_keeps_comments_and_order(tmp_path: Path) -> None:
    text = (b"# header comment\r\n"
            b"policy_name=x   policy_version=01.0.0   # trailing\n"
            b"\n"
            b"op=EXECUTE\tfsverity_digest=sha256:ABCD action=DENY   # why\n"
            b"  DEFAULT   op=KMODULE action=ALLOW\n"
            b"DEFAULT action=DENY\n\n")
    result = runner.invoke(app, ["policy", "format", str(write(tmp_path, text))])
    assert result.exit_code == 0, result.output
    assert result.stdout == ("# header comment\n"
                             "policy_name=x policy_version=1.0.0  # trailing\n"
                             "\n"
                             "op=EXECUTE fsverity_digest=sha256:abcd action=DENY  # why\n"
                             "DEFAULT op=KMODULE action=ALLOW\n"
                             "DEFAULT action=DENY\n")
    again = runner.invoke(app, ["policy", "format", str(write(tmp_path, result.stdout.encode()))])
    assert again.stdout == result.stdout
