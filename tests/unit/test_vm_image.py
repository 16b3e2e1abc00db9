"""The VM image's inputs, cache key, cache validation and mmdebstrap command line."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import pytest

from ipe_bpf.errors import VmError
from ipe_bpf.vm.config import KERNEL_RELEASE, VmConfig, default_cache_dir
from ipe_bpf.vm.image import (
    INIT_PATH,
    GuestInputs,
    find_image,
    load_image,
    mmdebstrap_argv,
    parse_package_list,
    root_image_size,
)


def _inputs(tmp_path: Path) -> GuestInputs:
    return GuestInputs.for_config(VmConfig(cache_dir=tmp_path))


def test_package_list_parsing() -> None:
    assert parse_package_list("# c\npython3\n\nkmod  # why\nbusybox kmod\n") == ("python3", "kmod", "busybox")


def test_inputs_hold_the_pinned_kernel_and_the_guest_files(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    assert inputs.packages[:2] == (f"linux-image-{KERNEL_RELEASE}", f"linux-headers-{KERNEL_RELEASE}")
    for needed in ("python3-bpfcc", "bpftool", "cryptsetup-bin", "fsverity", "busybox", "python3-pytest"):
        assert needed in inputs.packages
    assert inputs.init_script.startswith(b"#!/bin/sh")
    assert "linux-initramfs-tool" in inputs.no_initramfs_control


def test_key_is_stable_and_changes_with_every_input(tmp_path: Path) -> None:
    base = _inputs(tmp_path)
    assert base.key() == _inputs(tmp_path).key()
    variants = [
        dataclasses.replace(base, packages=base.packages + ("strace",)),
        dataclasses.replace(base, init_script=base.init_script + b"\n"),
        dataclasses.replace(base, kernel_release="6.12.999+deb13-cloud-amd64"),
        dataclasses.replace(base, suite="forky"),
        dataclasses.replace(base, build_format=base.build_format + 1),
        dataclasses.replace(base, no_initramfs_control=base.no_initramfs_control + "X"),
    ]
    keys = {v.key() for v in variants}
    assert base.key() not in keys and len(keys) == len(variants)


def test_kernel_override_from_env(tmp_path: Path) -> None:
    config = VmConfig.from_env({"IPE_BPF_CACHE": str(tmp_path), "IPE_BPF_VM_KERNEL": "6.12.1+deb13-cloud-amd64"})
    assert config.kernel_packages[0] == "linux-image-6.12.1+deb13-cloud-amd64"
    assert config.cache_dir == tmp_path


def test_cache_dir_defaults() -> None:
    assert default_cache_dir({"IPE_BPF_CACHE": "/x/y"}) == Path("/x/y")
    assert default_cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/ipe-bpf")


def test_mmdebstrap_command_line(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    argv = mmdebstrap_argv(inputs, tmp_path / "root fs", "http://m.example/debian", tmp_path / "debs", tmp_path / "x.deb")
    assert argv[0] == "mmdebstrap"
    assert "--mode=root" in argv and "--variant=minbase" in argv
    assert '--aptopt=APT::Install-Recommends "false"' in argv
    assert any(a.startswith("--dpkgopt=path-exclude=/usr/share/man") for a in argv)
    assert any(a.startswith("--dpkgopt=path-exclude=/usr/share/doc") for a in argv)
    assert f"--include={tmp_path / 'x.deb'}" in argv
    assert any(a.startswith("--setup-hook=sync-in") for a in argv)
    assert any(a.startswith("--customize-hook=sync-out") for a in argv)
    assert argv[-3:] == ["trixie", str(tmp_path / "root fs"), "http://m.example/debian"]
    assert not any("eatmydata" in a for a in argv)
    assert any("eatmydata" in a for a in mmdebstrap_argv(inputs, tmp_path, "http://m", tmp_path, tmp_path, True))


def test_backports_adds_the_archive_and_its_linux_base(tmp_path: Path) -> None:
    plain = _inputs(tmp_path)
    config = VmConfig.from_env({"IPE_BPF_CACHE": str(tmp_path), "IPE_BPF_VM_BACKPORTS": "1",
                                "IPE_BPF_VM_KERNEL": "7.3.4+deb13-cloud-amd64"})
    assert config.backports and config.kernel_packages[0] == "linux-image-7.3.4+deb13-cloud-amd64"
    inputs = replace(plain, backports=True)
    argv = mmdebstrap_argv(inputs, tmp_path, "http://m", tmp_path, tmp_path / "x.deb")
    assert argv[-4:] == ["trixie", str(tmp_path), "http://m", "deb http://m trixie-backports main"]
    assert "--include=linux-base/trixie-backports" in argv
    assert inputs.key() != plain.key()
    plain_argv = mmdebstrap_argv(plain, tmp_path, "http://m", tmp_path, tmp_path / "x.deb")
    assert not any("trixie-backports" in a for a in plain_argv)
    assert not VmConfig.from_env({"IPE_BPF_CACHE": str(tmp_path)}).backports


def test_root_image_is_roomy_and_aligned() -> None:
    size = root_image_size(700 << 20)
    assert size % (1 << 20) == 0 and size > (700 << 20) + (512 << 20)


def _fake_image(config: VmConfig, key: str, files: dict[str, bytes], manifest: dict | None = None) -> Path:
    directory = config.images_dir / key
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    manifest = manifest if manifest is not None else {"key": key, "files": {n: len(d) for n, d in files.items()}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_a_complete_image_is_found(tmp_path: Path) -> None:
    config = VmConfig(cache_dir=tmp_path)
    assert find_image(config) is None
    key = GuestInputs.for_config(config).key()
    _fake_image(config, key, {"root.img": b"r" * 10, "vmlinuz": b"k", "rootfs.cpio": b"i"})
    image = find_image(config)
    assert image is not None and image.key == key and image.root.name == "root.img"


@pytest.mark.parametrize(
    "damage",
    ["truncated file", "missing file", "bad json", "wrong key"],
)
def test_a_damaged_image_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    config = VmConfig(cache_dir=tmp_path)
    key = GuestInputs.for_config(config).key()
    directory = _fake_image(config, key, {"root.img": b"r" * 10, "vmlinuz": b"k"})
    if damage == "truncated file":
        (directory / "root.img").write_bytes(b"r")
    elif damage == "missing file":
        (directory / "vmlinuz").unlink()
    elif damage == "bad json":
        (directory / "manifest.json").write_text("{")
    else:
        (directory / "manifest.json").write_text(json.dumps({"key": "other", "files": {}}))
    with pytest.raises(VmError) as caught:
        load_image(directory)
    assert caught.value.errno_name == "EUCLEAN"
    assert "vm build --force" in caught.value.message


def test_an_interrupted_build_is_never_taken_as_good(tmp_path: Path) -> None:
    config = VmConfig(cache_dir=tmp_path)
    key = GuestInputs.for_config(config).key()
    half = config.vm_dir / f"build-{key}-123"
    (half).mkdir(parents=True)
    (half / "root.img").write_bytes(b"partial")
    assert find_image(config) is None


def test_init_path_is_absolute() -> None:
    assert INIT_PATH.startswith("/")


def test_a_kernel_the_mirror_no_longer_serves_is_explained(tmp_path: Path) -> None:
    from ipe_bpf.vm.image import explain_mmdebstrap_failure

    inputs = _inputs(tmp_path)
    generic = VmError("EIO", "mmdebstrap failed with exit status 1: E: apt-get install failed (full log: x)")
    log = f"E: Unable to locate package linux-image-{KERNEL_RELEASE}\nE: Unable to locate package linux-headers-x\n"
    err = explain_mmdebstrap_failure(generic, log, inputs, "http://m.example/debian")
    assert err.errno_name == "ENOENT" and "IPE_BPF_VM_KERNEL" in err.message and KERNEL_RELEASE in err.message
    other = explain_mmdebstrap_failure(generic, "E: Unable to locate package python3-nope\n", inputs, "http://m")
    assert "python3-nope" in other.message
    offline = explain_mmdebstrap_failure(generic, "W: Failed to fetch http://m/dists/trixie/InRelease\n", inputs, "http://m")
    assert offline.errno_name == "ENETUNREACH"
    assert explain_mmdebstrap_failure(generic, "something else", inputs, "http://m") is generic
