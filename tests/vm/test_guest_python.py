"""The guest's Python: the project's requirements from the image's wheels, `ipe-bpf` on PATH,
and `pip install` of the project into a fresh virtualenv, offline (the guest has no network)."""

from __future__ import annotations

import os
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ipe_bpf.kernel import pins

from .conftest import image_facts, run
from .kernel_fixtures import Kernel, kernel  # noqa: F401

EACCES = 13
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


PLAIN = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # /work only through the install


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with `pip install /work` in it, offline, from the image's wheels."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    run("python3", "-m", "venv", str(venv), env=PLAIN)
    run(str(venv / "bin" / "pip"), "install", "--no-index", "--find-links", image_facts()["wheelhouse"],
        str(WORK), env=PLAIN)
    return venv


def test_pip_installs_the_project_into_a_fresh_virtualenv_offline(venv: Path, tmp_path: Path) -> None:
    where = run(str(venv / "bin" / "python"), "-c", "import ipe_bpf; print(ipe_bpf.__file__)",
                cwd=tmp_path, env=PLAIN).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not /work
    assert "Usage" in run(str(venv / "bin" / "ipe-bpf"), "--help", cwd=tmp_path, env=PLAIN).stdout


def test_the_installed_copy_loads_and_enforces(venv: Path, kernel: Kernel, tmp_path: Path) -> None:
    """`ipe-bpf load` of the installed package (its own copy of the CO-RE object), then a policy
    through its CLI, then a real exec refused."""
    env = {**{k: v for k, v in PLAIN.items() if k != "IPE_BPF_LOADER"},  # its default: the CO-RE object
           "IPE_BPF_STATE_DIR": str(tmp_path / "state")}

    def installed(*args: str) -> str:
        return run(str(venv / "bin" / "ipe-bpf"), *args, cwd=tmp_path, env=env).stdout

    obj = run(str(venv / "bin" / "python"), "-c", "from ipe_bpf.bpf_files import OBJECT, bpf_file; "
              "print(bpf_file(OBJECT))", cwd=tmp_path, env=PLAIN).stdout.strip()
    assert obj.startswith(str(venv)) and obj.endswith("ipe_bpf.bpf.o"), obj
    was_loaded = pins.is_loaded()
    if was_loaded:
        run("python3", "-m", "ipe_bpf", "unload")
    try:
        assert "loaded (core)" in installed("load", "--enforce")
        pol = tmp_path / "venv.pol"
        pol.write_text("policy_name=venv policy_version=0.0.1\nDEFAULT action=ALLOW\n"
                       f"op=EXECUTE fsverity_digest={kernel.bad_digest} action=DENY\n")
        installed("policy", "deploy", "--unsigned", str(pol))
        installed("policy", "activate", "venv")
        assert kernel.exec_status(kernel.bad) == EACCES
        assert kernel.exec_status(kernel.good) == 0
    finally:
        if pins.is_loaded():
            installed("unload")
        if was_loaded:
            run("python3", "-m", "ipe_bpf", "load")
