"""`ipe-bpf enforce|success-audit` go through the lifecycle: kernel, store and 1404 record."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ipe_bpf.cli import kernel as cli_kernel
from ipe_bpf.kernel.store import PolicyStore

from .lifecycle_fixtures import FakeTarget
from .test_cli_lifecycle import use_target

runner = CliRunner()
APP = typer.Typer()
cli_kernel.register(APP)


@pytest.fixture()
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IPE_BPF_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_enforce_off_reaches_the_kernel_the_store_and_the_audit_log(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = FakeTarget()
    use_target(monkeypatch, target)
    result = runner.invoke(APP, ["enforce", "off"])
    assert result.exit_code == 0, result.output
    assert target.calls == ["enforce 0"]
    assert PolicyStore.default().load().enforce is False
    log = PolicyStore.default().audit_log_path.read_text()
    assert "type=1404" in log and "enforcing=0 old_enforcing=1" in log
    assert "enforce off, in effect now" in result.stdout

    again = runner.invoke(APP, ["enforce", "off"])
    assert again.exit_code == 0 and "(unchanged)" in again.stdout
    assert PolicyStore.default().audit_log_path.read_text().count("type=1404") == 1


def test_enforce_needs_a_loaded_kernel(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_target(monkeypatch, None)
    result = runner.invoke(APP, ["enforce", "off"])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("enforce: ENOENT: enforcement is not loaded")
    assert not PolicyStore.default().audit_log_path.exists()


def test_success_audit_is_recorded_while_unloaded_for_the_next_load(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_target(monkeypatch, None)
    result = runner.invoke(APP, ["success-audit", "on"])
    assert result.exit_code == 0, result.output
    assert "at the next `ipe-bpf load`" in result.stdout
    assert PolicyStore.default().load().success_audit is True


def test_bad_value_is_a_one_line_error(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = FakeTarget()
    use_target(monkeypatch, target)
    result = runner.invoke(APP, ["success-audit", "maybe"])
    assert result.exit_code == 1 and target.calls == []
    assert result.stderr.strip() == "EINVAL: expected on or off, got 'maybe'"


def test_load_whose_stored_policy_cannot_be_applied_unloads_again(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ipe_bpf.kernel import loader, maps
    from ipe_bpf.kernel.lifecycle import Lifecycle

    life = Lifecycle(PolicyStore.default())
    life.deploy(b"policy_name=p policy_version=1.0.0\nDEFAULT action=ALLOW\n", [], allow_unsigned=True)
    life.activate(b"p")
    events: list[str] = []
    target = FakeTarget(fail_with=OSError(28, "No space left on device"))

    class Maps:
        def __enter__(self) -> FakeTarget:
            return target

        def __exit__(self, *exc: object) -> None:
            pass

    from ipe_bpf.kernel.features import KernelFeatures
    from ipe_bpf.kernel.pins import HOOKS

    found = KernelFeatures(HOOKS, "inode", None, True, True, True, False)
    monkeypatch.setattr(loader, "load", lambda options: events.append("load") or loader.LoadResult(
        "core", HOOKS, found, 1.0))
    monkeypatch.setattr(loader, "unload", lambda: events.append("unload") or 0.01)
    monkeypatch.setattr(maps, "PinnedPolicyMaps", Maps)
    result = runner.invoke(APP, ["load"])
    assert result.exit_code == 1 and events == ["load", "unload"]
    err = result.stderr.strip()
    assert "\n" not in err and err.startswith("load: the stored active policy could not be applied")
    assert "ENOSPC" in err
