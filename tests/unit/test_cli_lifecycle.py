"""`ipe-bpf policy deploy|activate|update|delete|list` through typer's CliRunner."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ipe_bpf.cli import lifecycle as cli_lifecycle
from ipe_bpf.kernel.lifecycle import PolicyTarget

from .lifecycle_fixtures import FakeTarget, Signer, make_signer, policy_text

runner = CliRunner()


def make_app() -> typer.Typer:
    app = typer.Typer()
    policy_app = typer.Typer()
    cli_lifecycle.register(policy_app)
    app.add_typer(policy_app, name="policy")
    return app


APP = make_app()


@pytest.fixture(scope="module")
def signer() -> Signer:
    return make_signer("ipe-bpf cli test signer")


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signer: Signer) -> Path:
    """A state dir in tmp_path, a trust dir with the signer, and no kernel loaded."""
    monkeypatch.setenv("IPE_BPF_STATE_DIR", str(tmp_path / "state"))
    signer.write_cert(tmp_path / "trust")
    use_target(monkeypatch, None)
    return tmp_path


def use_target(monkeypatch: pytest.MonkeyPatch, target: PolicyTarget | None) -> None:
    @contextlib.contextmanager
    def fake() -> Iterator[PolicyTarget | None]:
        yield target

    monkeypatch.setattr(cli_lifecycle, "kernel_target", fake)


def signed_file(env: Path, signer: Signer, name: str = "prod", version: str = "1.0.0", extra: str = "") -> Path:
    path = env / f"{name}-{version}.p7s"
    path.write_bytes(signer.sign(policy_text(name, version, extra)))
    return path


def run(env: Path, *args: str, trust: bool = True):  # type: ignore[no-untyped-def]
    argv = ["policy", *args]
    if trust and args and args[0] in ("deploy", "update"):
        argv += ["--trust", str(env / "trust")]
    return runner.invoke(APP, argv)


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_register_adds_the_commands() -> None:
    names = {c.name for c in typer.main.get_group(APP).commands["policy"].commands.values()}  # type: ignore[attr-defined]
    assert {"deploy", "activate", "update", "delete", "list"} <= names


def test_deploy_signed_not_loaded(env: Path, signer: Signer) -> None:
    result = run(env, "deploy", str(signed_file(env, signer, "prod", "1.2.0")))
    assert result.exit_code == 0, result.output
    assert 'deployed policy "prod" 1.2.0' in result.stdout
    assert "ipe-bpf policy activate prod" in result.stdout
    assert "enforcement is not loaded" in result.stdout
    assert (env / "state" / "state.json").exists()
    assert "type=1422" in (env / "state" / "audit.log").read_text()


def test_deploy_eexist_message(env: Path, signer: Signer) -> None:
    assert run(env, "deploy", str(signed_file(env, signer))).exit_code == 0
    line = one_line_error(run(env, "deploy", str(signed_file(env, signer, version="2.0.0"))))
    assert line == 'deploy: EEXIST: policy "prod" is already deployed (delete it or use update)'


def test_deploy_plain_text_without_flag(env: Path) -> None:
    path = env / "p.pol"
    path.write_bytes(policy_text())
    line = one_line_error(run(env, "deploy", str(path)))
    assert line.startswith(f"deploy: {path}: EBADMSG: not a PKCS#7 signed policy")
    assert "--unsigned" in line


def test_deploy_unsigned_says_so_loudly(env: Path) -> None:
    path = env / "p.pol"
    path.write_bytes(policy_text("test"))
    result = run(env, "deploy", "--unsigned", str(path), trust=False)
    assert result.exit_code == 0, result.output
    assert "WITHOUT A SIGNATURE" in result.stderr and "test machines" in result.stderr
    listed = json.loads(run(env, "list", "--json").stdout)
    assert listed["policies"][0]["signed"] is False
    assert "UNSIGNED" in run(env, "list").stdout


def test_deploy_parse_error_names_file_and_line(env: Path, signer: Signer) -> None:
    path = env / "bad.p7s"
    path.write_bytes(signer.sign(b"policy_name=prod policy_version=1.0.0\nDEFAULT action=ALLOW\nop=EXECUTE bogus=1 action=DENY\n"))
    line = one_line_error(run(env, "deploy", str(path)))
    assert line.startswith(f"deploy: {path}:3: EBADMSG: ")


def test_deploy_untrusted(env: Path) -> None:
    stranger = make_signer("stranger")
    line = one_line_error(run(env, "deploy", str(signed_file(env, stranger))))
    assert line.startswith("deploy: ") and ": ENOKEY: " in line


def test_deploy_missing_file(env: Path) -> None:
    line = one_line_error(run(env, "deploy", str(env / "nope.p7s")))
    assert line == f"deploy: ENOENT: {env / 'nope.p7s'}: No such file or directory"


def test_deploy_missing_trust(env: Path, signer: Signer) -> None:
    result = runner.invoke(APP, ["policy", "deploy", str(signed_file(env, signer)), "--trust", str(env / "none")])
    assert ": ENOENT: " in one_line_error(result)


def test_activate_not_loaded_records_choice(env: Path, signer: Signer) -> None:
    run(env, "deploy", str(signed_file(env, signer)))
    result = run(env, "activate", "prod")
    assert result.exit_code == 0, result.output
    assert 'activated policy "prod" 1.0.0' in result.stdout
    assert "enforcement is not loaded" in result.stdout and "ipe-bpf load" in result.stdout
    again = run(env, "activate", "prod")
    assert again.exit_code == 0 and "already active" in again.stdout


def test_activate_loaded_installs(env: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    target = FakeTarget()
    use_target(monkeypatch, target)
    run(env, "deploy", str(signed_file(env, signer)))
    result = run(env, "activate", "prod", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["applied"] and out["loaded"] and out["policy"]["active"]
    assert out["records"][0].startswith("type=1421 ")
    assert target.policy_name == b"prod"
    run(env, "deploy", str(signed_file(env, signer, "next", "1.1.0")))
    text = run(env, "activate", "next")
    assert text.exit_code == 0 and text.stdout.strip() == 'activated policy "next" 1.1.0 (enforced now)'
    assert target.policy_name == b"next"


def test_deploy_activate_in_one_command(env: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    target = FakeTarget()
    use_target(monkeypatch, target)
    result = run(env, "deploy", "--activate", str(signed_file(env, signer, "prod", "1.2.0")))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith('deployed and activated policy "prod" 1.2.0 (sha256:')
    assert result.stdout.rstrip().endswith("(enforced now)") and target.policy_name == b"prod"
    assert json.loads(run(env, "list", "--json").stdout)["active"] == "prod"
    line = one_line_error(run(env, "deploy", "--activate", str(signed_file(env, signer, "old", "1.0.0"))))
    assert line.startswith('deploy: EINVAL: the active policy "prod" has version 1.2.0')
    assert [p["name"] for p in json.loads(run(env, "list", "--json").stdout)["policies"]] == ["prod"]


def test_activate_errors(env: Path, signer: Signer) -> None:
    assert one_line_error(run(env, "activate", "ghost")) == 'activate: ENOENT: policy "ghost" is not deployed'
    run(env, "deploy", str(signed_file(env, signer, "prod", "2.0.0")))
    run(env, "deploy", str(signed_file(env, signer, "old", "1.0.0")))
    run(env, "activate", "prod")
    line = one_line_error(run(env, "activate", "old"))
    assert line.startswith("activate: EINVAL: the active policy \"prod\" has version 2.0.0")


def test_activate_install_failure_is_one_line(env: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    target = FakeTarget(fail_with=OSError(1, "Operation not permitted"))
    use_target(monkeypatch, target)
    run(env, "deploy", str(signed_file(env, signer)))
    line = one_line_error(run(env, "activate", "prod"))
    assert line.startswith("activate: EPERM: ")
    assert json.loads(run(env, "list", "--json").stdout)["active"] is None


def test_update_paths(env: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    target = FakeTarget()
    use_target(monkeypatch, target)
    assert one_line_error(run(env, "update", "prod", str(signed_file(env, signer)))).startswith("update: ENOENT: ")
    run(env, "deploy", str(signed_file(env, signer, "prod", "1.0.0")))
    run(env, "activate", "prod")
    line = one_line_error(run(env, "update", "prod", str(signed_file(env, signer, "prod", "1.0.0", "op=KMODULE action=DENY\n"))))
    assert line.startswith("update: ESTALE: version 1.0.0 is not greater than 1.0.0")
    line = one_line_error(run(env, "update", "prod", str(signed_file(env, signer, "other", "9.0.0"))))
    assert line == 'update: EINVAL: the new policy is named "other", not "prod"'
    result = run(env, "update", "prod", str(signed_file(env, signer, "prod", "1.1.0")))
    assert result.exit_code == 0, result.output
    assert 'updated policy "prod" 1.1.0' in result.stdout and "active" in result.stdout
    assert target.installs[-1][0].version == (1, 1, 0)


def test_delete_paths(env: Path, signer: Signer) -> None:
    assert one_line_error(run(env, "delete", "prod")) == 'delete: ENOENT: policy "prod" is not deployed'
    run(env, "deploy", str(signed_file(env, signer, "prod")))
    run(env, "deploy", str(signed_file(env, signer, "spare")))
    run(env, "activate", "prod")
    line = one_line_error(run(env, "delete", "prod"))
    assert line.startswith('delete: EPERM: policy "prod" is active')
    result = run(env, "delete", "spare")
    assert result.exit_code == 0 and 'deleted policy "spare" 1.0.0' in result.stdout


def test_list(env: Path, signer: Signer) -> None:
    empty = run(env, "list")
    assert empty.exit_code == 0 and "no policy deployed" in empty.stdout
    assert "enforcement is not loaded" in empty.stdout
    blob_path = signed_file(env, signer, "prod", "1.2.3")
    run(env, "deploy", str(blob_path))
    run(env, "activate", "prod")
    out = json.loads(run(env, "list", "--json").stdout)
    assert out["active"] == "prod" and out["loaded"] is False and out["enforce"] is True
    assert out["success_audit"] is False and out["kernel_generation"] is None
    [policy] = out["policies"]
    import hashlib

    assert policy["name"] == "prod" and policy["version"] == "1.2.3" and policy["active"]
    assert policy["digest"] == "sha256:" + hashlib.sha256(blob_path.read_bytes()).hexdigest().upper()
    assert policy["signed"] and "cli test signer" in policy["signer"]
    table = run(env, "list")
    assert "prod" in table.stdout and "1.2.3" in table.stdout


def test_list_warns_when_kernel_generation_differs(env: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> None:
    run(env, "deploy", str(signed_file(env, signer)))
    run(env, "activate", "prod")  # recorded while unloaded

    class Loaded(FakeTarget):
        def state(self):  # type: ignore[no-untyped-def]
            return type("S", (), {"generation": None})()

    use_target(monkeypatch, Loaded())
    result = run(env, "list")
    assert result.exit_code == 0 and "loaded;" in result.stdout
    assert "the kernel runs generation None" in result.stderr


def test_state_dir_unusable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_bytes(b"")
    monkeypatch.setenv("IPE_BPF_STATE_DIR", str(tmp_path / "file" / "state"))
    use_target(monkeypatch, None)
    path = tmp_path / "p.pol"
    path.write_bytes(policy_text())
    line = one_line_error(runner.invoke(APP, ["policy", "deploy", "--unsigned", str(path)]))
    assert line.startswith("deploy: ENOTDIR: cannot create the state directory")


def test_kernel_target_is_none_unless_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipe_bpf.kernel import pins
    from ipe_bpf.kernel.maps import PinnedPolicyMaps

    monkeypatch.setattr(pins, "is_loaded", lambda root=pins.PIN_ROOT: False)
    with cli_lifecycle.kernel_target() as target:
        assert target is None
    monkeypatch.setattr(pins, "is_loaded", lambda root=pins.PIN_ROOT: True)
    with cli_lifecycle.kernel_target() as target:  # opens maps lazily: no kernel access yet
        assert isinstance(target, PinnedPolicyMaps) and isinstance(target, PolicyTarget)
