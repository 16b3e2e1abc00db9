"""Kernel lines: what --kernel accepts, which release of a line is the newest, the mirror's index."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import pytest

from ipe_bpf.errors import VmError
from ipe_bpf.vm.archive import fetch_index, kernel_releases, served_release
from ipe_bpf.vm.lines import LINES, line_named, line_of_release, newest_release, parse_kernel

INDEX = """\
Package: linux-image-7.2.12+deb13-cloud-amd64
Version: 7.2.12-1~bpo13+1

Package: linux-image-7.10.1+deb13-cloud-amd64-unsigned
Version: 7.10.1-1~bpo13+1

Package: linux-image-7.3.4+deb13-cloud-amd64
Version: 7.3.4-1~bpo13+1

Package: linux-image-7.3.4+deb13-cloud-amd64-dbg
Version: 7.3.4-1~bpo13+1

Package: linux-image-6.19.14+deb13-cloud-amd64
Version: 6.19.14-1~bpo13+1

Package: linux-image-7.3.4+deb13-amd64
Version: 7.3.4-1~bpo13+1

Package: linux-image-cloud-amd64
Version: 7.3.4-1~bpo13+1
Depends: linux-image-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1)
"""


@pytest.mark.parametrize("spec, line, release", [
    ("6.1", "6.1", line_named("6.1").pinned),
    ("6.12", "6.12", line_named("6.12").pinned),
    ("7.x", "7.x", None),  # floats: the newest trixie-backports serves
    ("6.1.0-50-cloud-amd64", "6.1", "6.1.0-50-cloud-amd64"),
    ("6.12.117+deb13-cloud-amd64", "6.12", "6.12.117+deb13-cloud-amd64"),  # not 6.1
    ("7.3.4+deb13-cloud-amd64", "7.x", "7.3.4+deb13-cloud-amd64"),
    (" 6.1 ", "6.1", line_named("6.1").pinned),
])
def test_kernel_specs(spec: str, line: str, release: str | None) -> None:
    choice = parse_kernel(spec)
    assert (choice.line.name, choice.release) == (line, release)
    assert choice.spec == (release or line)


@pytest.mark.parametrize("spec, words", [
    ("5.10", "neither a line (6.1, 6.12, 7.x) nor a Debian cloud kernel release"),
    ("6.12.117+deb13-amd64", "neither a line"),  # not the cloud flavour: it needs an initrd
    ("linux-image-6.1.0-50-cloud-amd64", "neither a line"),
    ("6.6.1-cloud-amd64", "belongs to none of the lines 6.1, 6.12, 7.x"),
])
def test_bad_kernel_specs_are_one_clear_error(spec: str, words: str) -> None:
    with pytest.raises(VmError) as caught:
        parse_kernel(spec)
    assert caught.value.errno_name == "EINVAL" and words in caught.value.message


def test_the_lines_are_consistent() -> None:
    assert [line.name for line in LINES] == ["6.1", "6.12", "7.x"]
    for line in LINES:
        assert line.pinned is None or line_of_release(line.pinned) == line, line  # a pin of its own line
    assert [line.name for line in LINES if line.bcc] == ["6.12"]
    assert [line.name for line in LINES if line.backports] == ["7.x"]
    assert line_named("6.1").suite == "bookworm" and line_named("6.1").python == "3.11"
    assert line_of_release("6.12.57+deb13-amd64") == line_named("6.12")  # uname -r of a Vagrant box
    assert line_of_release("5.10.0-30-cloud-amd64") is None
    with pytest.raises(VmError):
        line_named("8.x")


def test_newest_release_of_a_line_compares_numbers() -> None:
    releases = kernel_releases(INDEX)
    assert releases == ["6.19.14+deb13-cloud-amd64", "7.2.12+deb13-cloud-amd64", "7.3.4+deb13-cloud-amd64"]
    assert newest_release(line_named("7.x"), releases) == "7.3.4+deb13-cloud-amd64"
    assert newest_release(line_named("7.x"), [*releases, "7.10.1+deb13-cloud-amd64"]) == "7.10.1+deb13-cloud-amd64"
    assert newest_release(line_named("6.1"), ["6.1.0-47-cloud-amd64", "6.1.0-50-cloud-amd64",
                                              "6.12.1+deb13-cloud-amd64"]) == "6.1.0-50-cloud-amd64"
    assert newest_release(line_named("6.1"), releases) is None


def _mirror(tmp_path: Path, suite: str, index: str, kind: str = "xz") -> str:
    where = tmp_path / "dists" / suite / "main" / "binary-amd64"
    where.mkdir(parents=True)
    if kind == "xz":
        (where / "Packages.xz").write_bytes(lzma.compress(index.encode()))
    else:
        (where / "Packages.gz").write_bytes(gzip.compress(index.encode()))
    return tmp_path.as_uri()


@pytest.mark.parametrize("kind", ["xz", "gz"])
def test_the_newest_release_the_mirror_serves(tmp_path: Path, kind: str) -> None:
    mirror = _mirror(tmp_path, "trixie-backports", INDEX, kind)
    assert "linux-image-cloud-amd64" in fetch_index(mirror, "trixie-backports")
    assert served_release(line_named("7.x"), mirror) == "7.3.4+deb13-cloud-amd64"


def test_a_mirror_without_the_line_or_the_index(tmp_path: Path) -> None:
    mirror = _mirror(tmp_path, "trixie-backports", "Package: linux-image-6.19.14+deb13-cloud-amd64\n")
    with pytest.raises(VmError) as caught:
        served_release(line_named("7.x"), mirror)
    assert caught.value.errno_name == "ENOENT" and "serves no 7.x kernel" in caught.value.message
    with pytest.raises(VmError) as caught:
        fetch_index(mirror, "bookworm")
    assert caught.value.errno_name == "ENOENT" and "no package index for bookworm" in caught.value.message
