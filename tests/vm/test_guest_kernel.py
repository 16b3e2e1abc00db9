"""The guest kernel offers what ipe-bpf builds on: BPF LSM, BTF, dm-verity, fs-verity (and IPE,
headers where its line has them)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ipe_bpf.vm.lines import line_of_release

from .conftest import active_lsms, image_facts, kernel_line, run


def test_bpf_is_an_active_lsm() -> None:
    lsms = active_lsms()
    assert "bpf" in lsms, lsms


@pytest.mark.requires("kernel_ipe")
def test_ipe_is_an_active_lsm_with_its_securityfs() -> None:
    lsms = active_lsms()
    assert "ipe" in lsms, lsms
    assert Path("/sys/kernel/security/ipe").is_dir()


def test_kernel_btf_is_present() -> None:
    btf = Path("/sys/kernel/btf/vmlinux")
    assert btf.is_file()
    assert btf.read_bytes()[:2] == b"\x9f\xeb"  # BTF magic, little endian


def test_bpffs_and_securityfs_are_mounted() -> None:
    mounts = {line.split()[1]: line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()}
    assert mounts.get("/sys/fs/bpf") == "bpf"
    assert mounts.get("/sys/kernel/security") == "securityfs"


def test_running_the_images_kernel_on_its_line() -> None:
    release = os.uname().release
    assert release.endswith("-cloud-amd64"), release
    facts = image_facts()
    assert facts["kernel"] == release, facts
    line = line_of_release(release)
    assert line is not None and facts["line"] == line.name == kernel_line(), facts


@pytest.mark.requires("kernel_headers")
def test_kernel_headers_for_bcc() -> None:
    assert Path(f"/lib/modules/{os.uname().release}/build/include").is_dir(), "kernel headers (BCC needs them)"


def test_dm_verity_volume_opens_on_a_loop_device(tmp_path: Path, loop_modules: None) -> None:
    data, hashes = tmp_path / "data.img", tmp_path / "hash.img"
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("verified hello\n")
    run("mke2fs", "-q", "-t", "ext4", "-b", "4096", "-d", str(tree), str(data), "8M")
    formatted = run("veritysetup", "format", str(data), str(hashes)).stdout
    match = re.search(r"Root hash:\s+([0-9a-f]{64})", formatted)
    assert match, formatted
    root_hash = match.group(1)
    name = f"ipe-bpf-test-{os.getpid()}"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("veritysetup", "open", str(data), name, str(hashes), root_hash)
    try:
        status = run("veritysetup", "status", name).stdout
        assert re.search(r"status:\s+verified", status), status
        assert root_hash in status, status
        run("mount", "-o", "ro", f"/dev/mapper/{name}", str(mnt))
        try:
            assert (mnt / "hello.txt").read_text() == "verified hello\n"
        finally:
            run("umount", str(mnt))
    finally:
        run("veritysetup", "close", name)


def test_fs_verity_on_a_work_file(work_tmp: Path) -> None:
    path = work_tmp / "measured.bin"
    content = b"ipe-bpf fs-verity test\n" * 1000
    path.write_bytes(content)
    run("fsverity", "enable", str(path))
    measured = run("fsverity", "measure", str(path)).stdout.split()
    assert measured[0].startswith("sha256:")
    digest = measured[0].removeprefix("sha256:")
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    # the kernel's measurement equals the digest computed in userspace
    assert digest == run("fsverity", "digest", "--compact", str(path)).stdout.strip()
    # once enabled, the file is read-only for everyone, root included
    with pytest.raises(PermissionError):
        path.open("ab")
    assert path.read_bytes() == content


def test_the_guest_knows_it_is_the_vm() -> None:
    assert os.environ["IPE_BPF_IN_VM"] == "1"
    assert os.environ.get("IPE_BPF_VM_MODE") in {"disk", "initramfs"}
    assert Path("/etc/ipe-bpf-vm").is_file()
