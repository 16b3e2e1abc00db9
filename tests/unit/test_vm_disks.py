"""The data disks of a boot: what of the project goes to /work, the control and results tars."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from ipe_bpf.errors import VmError
from ipe_bpf.vm.disks import excluded, extract_results, make_control_disk, stage_project


@pytest.mark.parametrize(
    "path, out",
    [
        ("ipe_bpf/vm/run.py", False),
        (".git/config", True),
        ("ipe_bpf/__pycache__/x.pyc", True),
        (".venv/bin/python", True),
        ("ipe_bpf.egg-info/PKG-INFO", True),
        ("results/vm/console.log", True),
        ("tests/results/keep.txt", False),
        (".hypothesis/examples/x", True),
    ],
)
def test_excluded(path: str, out: bool) -> None:
    assert excluded(Path(path)) is out


def test_stage_project(tmp_path: Path) -> None:
    project = tmp_path / "p"
    (project / "pkg" / "__pycache__").mkdir(parents=True)
    (project / "pkg" / "a.py").write_text("A")
    (project / "pkg" / "__pycache__" / "a.pyc").write_text("X")
    (project / ".git").mkdir()
    (project / "cache").mkdir()
    (project / "cache" / "big").write_text("B")
    (project / "link").symlink_to("pkg/a.py")
    stage = tmp_path / "stage"
    stage_project(project, stage, skip=(project / "cache",))
    assert (stage / "pkg" / "a.py").read_text() == "A"
    assert (stage / "link").is_symlink() and (stage / "link").read_text() == "A"
    assert not (stage / "pkg" / "__pycache__").exists()
    assert not (stage / ".git").exists() and not (stage / "cache").exists()


def test_control_disk_is_a_padded_tar(tmp_path: Path) -> None:
    disk = tmp_path / "ctl.img"
    make_control_disk(disk, {"nonce": b"abc", "command.sh": b"exec true\n"})
    data = disk.read_bytes()
    assert len(data) % (1 << 20) == 0
    with tarfile.open(disk) as tar:
        assert tar.extractfile("nonce").read() == b"abc"  # type: ignore[union-attr]
        assert tar.getmember("command.sh").mode == 0o755


def _results_disk(path: Path, members: dict[str, bytes]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(path.parent, arcname=".", recursive=False)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue() + b"\0" * 65536)


def test_results_are_extracted(tmp_path: Path) -> None:
    disk = tmp_path / "results.img"
    _results_disk(disk, {"./junit.xml": b"<x/>", "./sub/log.txt": b"log"})
    out = tmp_path / "out"
    names = extract_results(disk, out)
    assert (out / "junit.xml").read_bytes() == b"<x/>" and (out / "sub" / "log.txt").read_bytes() == b"log"
    assert "./junit.xml" in names


def test_results_cannot_escape(tmp_path: Path) -> None:
    disk = tmp_path / "results.img"
    _results_disk(disk, {"../evil": b"x"})
    with pytest.raises(VmError):
        extract_results(disk, tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_garbage_results_disk_is_a_clear_error(tmp_path: Path) -> None:
    disk = tmp_path / "results.img"
    disk.write_bytes(b"\x01" * 4096)
    with pytest.raises(VmError):
        extract_results(disk, tmp_path / "out")
