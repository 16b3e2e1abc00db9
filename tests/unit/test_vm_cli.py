"""`ipe-bpf vm ...` failures are one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ipe_bpf.cli.vm import app
from ipe_bpf.vm.config import VmConfig
from ipe_bpf.vm.image import image_key
from ipe_bpf.vm.run import RunRequest, command_script

runner = CliRunner()


def _fake_tools(tmp_path: Path, names: tuple[str, ...]) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        tool = bin_dir / name
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(0o755)
    return str(bin_dir)


def _one_line_error(result: object) -> str:
    output = result.output.strip()  # type: ignore[attr-defined]
    assert result.exception is None or isinstance(result.exception, SystemExit)  # type: ignore[attr-defined]
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    return output


def test_run_without_qemu(tmp_path: Path) -> None:
    env = {"PATH": _fake_tools(tmp_path, ()), "IPE_BPF_CACHE": str(tmp_path / "cache")}
    result = runner.invoke(app, ["run", "--project", str(tmp_path), "--", "true"], env=env)
    assert result.exit_code == 125
    line = _one_line_error(result)
    assert "qemu-system-x86_64" in line and "ipe-bpf vm setup" in line


def test_run_with_a_corrupt_cached_image(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    key = image_key(VmConfig(cache_dir=cache))
    image = cache / "vm" / "images" / key
    image.mkdir(parents=True)
    (image / "manifest.json").write_text(json.dumps({"key": key, "files": {"root.img": 5}}))
    env = {"PATH": _fake_tools(tmp_path, ("qemu-system-x86_64", "mke2fs", "tar")), "IPE_BPF_CACHE": str(cache)}
    result = runner.invoke(app, ["run", "--project", str(tmp_path), "--", "true"], env=env)
    assert result.exit_code == 125
    line = _one_line_error(result)
    assert "EUCLEAN" in line and "--force" in line


def test_run_a_missing_project(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--project", str(tmp_path / "nope"), "--", "true"])
    assert result.exit_code == 125
    assert "does not exist" in _one_line_error(result)


def test_build_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = runner.invoke(app, ["build"], env={"IPE_BPF_CACHE": str(tmp_path)})
    assert result.exit_code == 1
    assert "root" in _one_line_error(result)


def test_run_needs_a_command() -> None:
    result = runner.invoke(app, ["run"])
    assert result.exit_code != 0


def test_command_script_quotes_and_exports() -> None:
    request = RunRequest(("python3", "-c", "print('a b')"), Path("."), initramfs=True, env=(("X", "y z"),))
    script = command_script(request, terminal=False, columns=None)
    assert "IPE_BPF_IN_VM=1" in script and "IPE_BPF_VM_MODE=initramfs" in script
    systemd = command_script(RunRequest(("true",), Path("."), systemd=True), terminal=False, columns=None)
    assert "IPE_BPF_VM_MODE=systemd" in systemd
    assert "PYTHONPATH=/work" in script and "TERM=dumb" in script
    assert "X='y z'; export X" in script
    assert script.rstrip().endswith("exec python3 -c 'print('\"'\"'a b'\"'\"')'")
    assert "cd /work" in script


def test_default_project_is_the_enclosing_git_checkout(tmp_path: Path) -> None:
    from ipe_bpf.cli.vm import current_checkout

    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "repo" / "tests" / "vm").mkdir(parents=True)
    assert current_checkout(tmp_path / "repo" / "tests" / "vm") == tmp_path / "repo"
    assert current_checkout(tmp_path / "repo") == tmp_path / "repo"
    (tmp_path / "plain").mkdir()
    assert current_checkout(tmp_path / "plain") == (tmp_path / "plain").resolve()


@pytest.mark.parametrize("command", [["build", "--kernel", "5.10"], ["run", "--kernel", "5.10", "--", "true"]])
def test_a_kernel_that_names_no_line_is_one_line(tmp_path: Path, command: list[str]) -> None:
    result = runner.invoke(app, command, env={"IPE_BPF_CACHE": str(tmp_path)})
    assert result.exit_code != 0
    line = _one_line_error(result)
    assert "EINVAL" in line and "6.1, 6.12, 7.x" in line


def test_bad_kernel_from_the_environment_too(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--", "true"], env={"IPE_BPF_CACHE": str(tmp_path), "IPE_BPF_VM_KERNEL": "x"})
    assert result.exit_code == 125 and "EINVAL" in _one_line_error(result)


def test_the_loader_choice_is_passed_on_to_the_guest() -> None:
    from ipe_bpf.cli.vm import forwarded_env

    assert forwarded_env({"IPE_BPF_LOADER": "bcc", "HOME": "/root"}) == (("IPE_BPF_LOADER", "bcc"),)
    assert forwarded_env({"IPE_BPF_LOADER": ""}) == ()
    script = command_script(RunRequest(("true",), Path("."), env=forwarded_env({"IPE_BPF_LOADER": "bcc"})), False, None)
    assert "IPE_BPF_LOADER=bcc; export IPE_BPF_LOADER" in script
