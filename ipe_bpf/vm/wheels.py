"""The guest's Python packages: wheels the host downloads for the guest's Python.

The guest has no network, and Debian's own packages are too old on some lines (bookworm's
python3-typer 0.7 crashes the CLI).  So the project's dependencies and its ``test`` extra, read
from ``pyproject.toml`` (the one list), are downloaded by the host's pip as wheels for the
guest's Python and C library into the cache, installed into the image's ``python3`` when it is
built, and kept in the image as a wheelhouse (``WHEELHOUSE``, with the build backend and
``wheel``) so that ``pip install /work`` into a fresh virtualenv works offline in the guest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmError
from .lines import KernelLine
from .procs import run_logged
from .progress import StepHandle

WHEELHOUSE = "/opt/ipe-bpf/wheels"  # in the guest
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
LIST_FILE = "requirements.txt"  # written last: a wheelhouse without it is incomplete
BUILD_EXTRA = ("wheel",)  # beside build-system.requires: what `pip install .` may ask for


@dataclass(frozen=True)
class Requirements:
    """What the guest's python3 gets (install) and what only the wheelhouse holds (build)."""

    install: tuple[str, ...]
    build: tuple[str, ...]

    @property
    def every(self) -> tuple[str, ...]:
        return self.install + tuple(r for r in self.build if r not in self.install)


def project_requirements(pyproject: Path = PYPROJECT) -> Requirements:
    """The dependencies, the ``test`` extra and the build requirements of the project."""
    try:
        data = tomllib.loads(pyproject.read_text())
    except OSError as err:
        raise VmError(
            "ENOENT", f"building the VM image needs the project's {pyproject.name} (a source checkout): "
            f"cannot read {pyproject}: {err.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise VmError("EINVAL", f"{pyproject}: {err}") from None
    project = data.get("project", {})
    install = [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("test", [])]
    build = [*data.get("build-system", {}).get("requires", []), *BUILD_EXTRA]
    return Requirements(tuple(install), tuple(build))


def pip_conf() -> str:
    """The guest's /etc/pip.conf: no network, every package from the wheelhouse."""
    return (
        "# the test VM has no network: packages come from the image's wheelhouse\n"
        f"[global]\nno-index = true\nfind-links = {WHEELHOUSE}\ndisable-pip-version-check = true\n"
    )


def install_command(requirements: Requirements) -> str:
    """The customize hook that installs the requirements into the new image's python3."""
    return (
        'chroot "$1" python3 -m pip install --no-index --find-links ' + WHEELHOUSE
        + " --break-system-packages --root-user-action=ignore --no-warn-script-location --no-cache-dir "
        + shlex.join(requirements.install)
    )


def python_tag(line: KernelLine) -> str:
    return "cp" + line.python.replace(".", "")


def platforms(line: KernelLine) -> list[str]:
    """manylinux tags the guest's glibc runs, newest first (pip does not expand them itself)."""
    major, minor = line.glibc
    return [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 16, -1)] + ["manylinux2014_x86_64"]


def wheelhouse_name(line: KernelLine, requirements: Requirements) -> str:
    digest = hashlib.sha256("\0".join((line.python, str(line.glibc), *requirements.every)).encode())
    return f"{python_tag(line)}-{digest.hexdigest()[:12]}"


def download_argv(python: str, line: KernelLine, requirements: Requirements, dest: Path) -> list[str]:
    """The host's ``pip download`` of every requirement, as wheels for LINE's guest (pure)."""
    argv = [
        python, "-m", "pip", "download", "--disable-pip-version-check", "--progress-bar", "off",
        "--only-binary=:all:", "--implementation", "cp", "--python-version", line.python,
        "--abi", python_tag(line),
    ]
    for tag in platforms(line):
        argv += ["--platform", tag]
    return argv + ["--dest", str(dest), *requirements.every]


def ensure_wheelhouse(
    wheels_dir: Path,
    line: KernelLine,
    requirements: Requirements,
    log: Path,
    step: StepHandle | None = None,
    python: str = sys.executable,
) -> Path:
    """The cached wheelhouse for LINE's Python and REQUIREMENTS, downloaded first if missing."""
    final = wheels_dir / wheelhouse_name(line, requirements)
    if (final / LIST_FILE).is_file():
        return final
    if python == sys.executable and importlib.util.find_spec("pip") is None:
        raise VmError(
            "ENOENT", f"{sys.executable} has no pip to download the guest's wheels with "
            "(apt-get install python3-pip, or run from the virtualenv scripts/dev makes)"
        )
    work = wheels_dir / f"tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run_logged(download_argv(python, line, requirements, work), log, step)
    (work / LIST_FILE).write_text("".join(f"{r}\n" for r in requirements.install))
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return final


def prune_wheelhouses(wheels_dir: Path, keep: set[str]) -> None:
    """Remove the wheelhouses no cached image was built from (and interrupted downloads)."""
    if not wheels_dir.is_dir():
        return
    for entry in wheels_dir.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)
