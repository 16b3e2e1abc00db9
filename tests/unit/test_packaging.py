"""`pip install .` ships the BPF program: the wheel carries bpf/ as ipe_bpf/bpf, and an
installed copy finds its object and header there (not in a source tree)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _listed_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(config["tool"]["setuptools"]["packages"])


def test_every_package_directory_is_listed() -> None:
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ipe_bpf").rglob("__init__.py")}
    assert found | {"ipe_bpf.bpf"} == _listed_packages()


def test_wheel_ships_the_object_and_sources_and_an_install_finds_them(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
         str(ROOT)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("ipe_bpf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("ipe_bpf.bpf.o", "ipe_bpf.bpf.c", "ipe_bpf.h", "libbpf_compat.h", "bcc_compat.h"):
        assert f"ipe_bpf/bpf/{name}" in names

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    probe = subprocess.run(
        [python, "-c", "from ipe_bpf.bpf_files import bpf_file, OBJECT; print(bpf_file(OBJECT))"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    installed = Path(probe.stdout.strip())
    assert installed.is_file() and "site-packages" in installed.parts
    assert installed.read_bytes() == (ROOT / "bpf" / "ipe_bpf.bpf.o").read_bytes()
