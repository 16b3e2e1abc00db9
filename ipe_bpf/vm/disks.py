"""The data disks of a boot: the project as ext4, the control tar, the results disk."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Mapping
from pathlib import Path

from ..errors import VmError
from . import host
from .image import MIB, round_up
from .procs import run_logged

# Left out of /work: caches and environments of the host (their paths and binaries mean
# nothing in the guest) and the results of earlier runs.
EXCLUDED_NAMES = frozenset(
    {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache", ".tox"}
)
EXCLUDED_TOP = frozenset({"results", "build", "dist"})
RESULTS_DISK_BYTES = 1 << 30  # sparse: costs only what the guest writes


def excluded(relative: Path) -> bool:
    """Whether a path of the project (relative to it) stays out of the guest's /work."""
    parts = relative.parts
    if not parts:
        return False
    if parts[0] in EXCLUDED_TOP:
        return True
    return any(part in EXCLUDED_NAMES or part.endswith(".egg-info") for part in parts)


def stage_project(project: Path, stage: Path, skip: tuple[Path, ...] = ()) -> None:
    """Mirror PROJECT into STAGE (hard links where possible), minus the excluded paths."""
    project = project.resolve()
    skip_resolved = {p.resolve() for p in skip}
    stage.mkdir(parents=True)
    for current, dirs, files in os.walk(project):
        here = Path(current)
        rel_dir = here.relative_to(project)
        keep_dirs = []
        for name in dirs:
            path = here / name
            if excluded(rel_dir / name) or path.resolve() in skip_resolved:
                continue
            if path.is_symlink():
                (stage / rel_dir / name).symlink_to(os.readlink(path))
                continue
            (stage / rel_dir / name).mkdir()
            shutil.copystat(path, stage / rel_dir / name)
            keep_dirs.append(name)
        dirs[:] = keep_dirs
        for name in files:
            if excluded(rel_dir / name):
                continue
            source = here / name
            target = stage / rel_dir / name
            if source.is_symlink():
                target.symlink_to(os.readlink(source))
                continue
            if not source.is_file():
                continue  # sockets, fifos: nothing to carry
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)


def work_image_size(tree_bytes: int) -> int:
    """Room for the project plus 512 MiB the tests may write (the file is sparse)."""
    return round_up(int(tree_bytes * 1.3) + 512 * MIB)


def make_work_image(stage: Path, image: Path, log: Path) -> None:
    """ext4 with 4 KiB blocks and the verity feature (fs-verity needs both)."""
    size = work_image_size(host.tree_size(stage))
    with image.open("wb") as handle:
        handle.truncate(size)
    run_logged(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "verity", "-m", "0", "-L", "work",
         "-E", "root_owner=0:0", "-d", str(stage), str(image)],
        log,
    )


def make_control_disk(image: Path, files: Mapping[str, bytes]) -> None:
    """A raw disk holding a tar of FILES (the guest runs ``tar -xf /dev/vdX``)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    image.write_bytes(data + b"\0" * (round_up(len(data) + 1024) - len(data)))


def make_results_disk(image: Path, size: int = RESULTS_DISK_BYTES) -> None:
    with image.open("wb") as handle:
        handle.truncate(size)


def extract_results(image: Path, destination: Path) -> list[str]:
    """Unpack the tar the guest wrote onto IMAGE into DESTINATION; the member names."""
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(image, mode="r:") as tar:
            members = [m for m in tar.getmembers() if m.name not in {".", "./"}]
            tar.extractall(destination, members=members, filter="data")
    except (tarfile.TarError, OSError) as err:
        raise VmError("EIO", f"cannot read the guest's results from {image}: {err}") from None
    return [m.name for m in members]
