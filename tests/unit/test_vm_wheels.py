"""The guest's Python packages: requirements from pyproject.toml, pip download for the guest."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from ipe_bpf.errors import VmError
from ipe_bpf.vm.lines import line_named
from ipe_bpf.vm.wheels import (
    LIST_FILE,
    PYPROJECT,
    WHEELHOUSE,
    Requirements,
    download_argv,
    ensure_wheelhouse,
    install_command,
    pip_conf,
    project_requirements,
    prune_wheelhouses,
    wheelhouse_name,
)

PYPROJECT_TEXT = """\
[build-system]
requires = ["setuptools>=61"]

[project]
name = "x"
dependencies = ["typer>=0.9", "rich>=13"]

[project.optional-dependencies]
test = ["pytest>=7"]
docs = ["sphinx"]
"""


def test_requirements_come_from_pyproject(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text(PYPROJECT_TEXT)
    req = project_requirements(path)
    assert req.install == ("typer>=0.9", "rich>=13", "pytest>=7")  # no docs extra
    assert req.build == ("setuptools>=61", "wheel")
    assert req.every == ("typer>=0.9", "rich>=13", "pytest>=7", "setuptools>=61", "wheel")


def test_the_projects_own_requirements() -> None:
    data = tomllib.loads(PYPROJECT.read_text())
    req = project_requirements()
    assert set(data["project"]["dependencies"]) <= set(req.install)
    assert set(data["project"]["optional-dependencies"]["test"]) <= set(req.install)
    assert set(data["build-system"]["requires"]) <= set(req.build)
    names = " ".join(req.every)
    for name in ("typer", "rich", "cryptography", "pyelftools", "pytest", "hypothesis", "setuptools", "wheel"):
        assert name in names


def test_a_missing_or_bad_pyproject(tmp_path: Path) -> None:
    with pytest.raises(VmError) as caught:
        project_requirements(tmp_path / "pyproject.toml")
    assert caught.value.errno_name == "ENOENT" and "source checkout" in caught.value.message
    (tmp_path / "pyproject.toml").write_text("[project\n")
    with pytest.raises(VmError) as caught:
        project_requirements(tmp_path / "pyproject.toml")
    assert caught.value.errno_name == "EINVAL" and "pyproject.toml" in caught.value.message


def _options(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


@pytest.mark.parametrize("line, version, abi, glibc", [("6.1", "3.11", "cp311", 36), ("6.12", "3.13", "cp313", 41)])
def test_download_is_for_the_guests_python_and_libc(line: str, version: str, abi: str, glibc: int) -> None:
    req = Requirements(("typer>=0.9",), ("setuptools>=61",))
    argv = download_argv("/usr/bin/python3", line_named(line), req, Path("/w"))
    assert argv[:4] == ["/usr/bin/python3", "-m", "pip", "download"]
    assert "--only-binary=:all:" in argv
    assert _options(argv, "--python-version") == [version] and _options(argv, "--abi") == [abi]
    assert _options(argv, "--implementation") == ["cp"] and _options(argv, "--dest") == ["/w"]
    platforms = _options(argv, "--platform")
    assert platforms[0] == f"manylinux_2_{glibc}_x86_64" and "manylinux_2_17_x86_64" in platforms
    assert "manylinux2014_x86_64" in platforms and f"manylinux_2_{glibc + 1}_x86_64" not in platforms
    assert argv[-2:] == ["typer>=0.9", "setuptools>=61"]


def test_wheelhouse_names_follow_python_and_requirements() -> None:
    req = Requirements(("typer>=0.9",), ("wheel",))
    names = {
        wheelhouse_name(line_named("6.1"), req),
        wheelhouse_name(line_named("6.12"), req),
        wheelhouse_name(line_named("6.12"), Requirements(("typer>=0.10",), ("wheel",))),
    }
    assert len(names) == 3 and wheelhouse_name(line_named("6.12"), req) == wheelhouse_name(line_named("7.x"), req)
    assert wheelhouse_name(line_named("6.1"), req).startswith("cp311-")


FAKE_PIP = """\
#!/bin/sh
# stands in for `python -m pip download ... --dest DIR REQ...`: one wheel per call
echo "$@" >> {calls}
[ -n "{fail}" ] && {{ echo "ERROR: No matching distribution found for typer>=0.9"; exit 1; }}
while [ "$1" != "--dest" ]; do shift; done
touch "$2/typer-1.0-py3-none-any.whl"
"""


def _fake_pip(tmp_path: Path, fail: bool = False) -> tuple[str, Path]:
    calls = tmp_path / "calls"
    script = tmp_path / ("pip-fail" if fail else "pip")
    script.write_text(FAKE_PIP.format(calls=calls, fail="1" if fail else ""))
    script.chmod(0o755)
    return str(script), calls


def test_a_wheelhouse_is_downloaded_once_and_complete(tmp_path: Path) -> None:
    req = Requirements(("typer>=0.9", "pytest>=7"), ("wheel",))
    line = line_named("6.1")
    pip, calls = _fake_pip(tmp_path)
    wheels = tmp_path / "wheels"
    first = ensure_wheelhouse(wheels, line, req, tmp_path / "log", python=pip)
    assert first.name == wheelhouse_name(line, req)
    assert (first / "typer-1.0-py3-none-any.whl").is_file()
    assert (first / LIST_FILE).read_text() == "typer>=0.9\npytest>=7\n"
    assert ensure_wheelhouse(wheels, line, req, tmp_path / "log", python=pip) == first
    assert len(calls.read_text().splitlines()) == 1  # cached
    (first / LIST_FILE).unlink()  # an incomplete wheelhouse is downloaded again
    ensure_wheelhouse(wheels, line, req, tmp_path / "log", python=pip)
    assert len(calls.read_text().splitlines()) == 2


def test_a_failed_download_leaves_no_wheelhouse(tmp_path: Path) -> None:
    req = Requirements(("typer>=0.9",), ())
    pip, _ = _fake_pip(tmp_path, fail=True)
    with pytest.raises(VmError) as caught:
        ensure_wheelhouse(tmp_path / "wheels", line_named("6.12"), req, tmp_path / "log", python=pip)
    assert "No matching distribution found for typer>=0.9" in caught.value.message
    assert not (tmp_path / "wheels" / wheelhouse_name(line_named("6.12"), req)).exists()


def test_unused_wheelhouses_are_pruned(tmp_path: Path) -> None:
    for name in ("cp311-a", "cp313-b", "tmp-cp313-c-99"):
        (tmp_path / name).mkdir()
    prune_wheelhouses(tmp_path, {"cp313-b"})
    assert [p.name for p in tmp_path.iterdir()] == ["cp313-b"]
    prune_wheelhouses(tmp_path / "none", set())  # nothing cached yet


def test_guest_pip_configuration_and_install_hook() -> None:
    assert "no-index = true" in pip_conf() and f"find-links = {WHEELHOUSE}" in pip_conf()
    hook = install_command(Requirements(("typer>=0.9", "rich>=13"), ("wheel",)))
    assert hook.startswith('chroot "$1" python3 -m pip install --no-index')
    assert "--break-system-packages" in hook and hook.endswith("'typer>=0.9' 'rich>=13'")
    assert "wheel" not in hook.split("'typer")[1]  # the build tools stay in the wheelhouse only


def test_a_host_python_without_pip_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VmError) as caught:
        ensure_wheelhouse(tmp_path, line_named("6.1"), Requirements(("x",), ()), tmp_path / "log")
    assert caught.value.errno_name == "ENOENT" and sys.executable in caught.value.message
    assert "python3-pip" in caught.value.message
