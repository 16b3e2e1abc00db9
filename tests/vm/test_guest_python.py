"""The guest's Python: the project's requirements from the image's wheels, `ipe-bpf` on PATH,
and `pip install` of the project into a fresh virtualenv, offline (the guest has no network)."""

from __future__ import annotations

import os
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from .conftest import image_facts, run

WORK = Path("/work")


def _requirements() -> list[Requirement]:
    project = tomllib.loads((WORK / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in (*project["dependencies"], *project["optional-dependencies"]["test"])]


def test_the_projects_requirements_are_installed() -> None:
    for req in _requirements():
        version = metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} does not satisfy {req}"


def test_ipe_bpf_is_on_path_and_runs_the_checkout(tmp_path: Path) -> None:
    assert run("sh", "-c", "command -v ipe-bpf").stdout.strip() == "/usr/local/bin/ipe-bpf"
    # from elsewhere than /work, as a README command typed in the guest would be
    out = run("ipe-bpf", "policy", "check", str(WORK / "policies" / "fsverity-allowlist.pol"), cwd=tmp_path)
    assert out.returncode == 0
    assert "Usage" in run("ipe-bpf", "--help", cwd=tmp_path).stdout


def test_pip_installs_the_project_into_a_fresh_virtualenv_offline(tmp_path: Path) -> None:
    wheelhouse = image_facts()["wheelhouse"]
    venv = tmp_path / "v"
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # /work only through the install
    run("python3", "-m", "venv", str(venv), env=plain)
    run(str(venv / "bin" / "pip"), "install", "--no-index", "--find-links", wheelhouse, str(WORK), env=plain)
    where = run(str(venv / "bin" / "python"), "-c", "import ipe_bpf; print(ipe_bpf.__file__)",
                cwd=tmp_path, env=plain).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not /work
    assert "Usage" in run(str(venv / "bin" / "ipe-bpf"), "--help", cwd=tmp_path, env=plain).stdout
