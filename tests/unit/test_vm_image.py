"""The VM images: per-line inputs, cache keys, images side by side, mmdebstrap's command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ipe_bpf.errors import VmError
from ipe_bpf.vm import image as image_module
from ipe_bpf.vm import releases
from ipe_bpf.vm.config import VmConfig, default_cache_dir
from ipe_bpf.vm.image import (
    build_image,
    find_image,
    image_key,
    load_image,
    root_image_size,
    superseded,
)
from ipe_bpf.vm.inputs import (
    INIT_PATH,
    WRAPPER_PATH,
    GuestInputs,
    explain_mmdebstrap_failure,
    mmdebstrap_argv,
    parse_package_list,
)
from ipe_bpf.vm.lines import line_named
from ipe_bpf.vm.releases import known_release, resolve_release
from ipe_bpf.vm.wheels import WHEELHOUSE, Requirements, project_requirements

PINNED_612 = line_named("6.12").pinned
PINNED_61 = line_named("6.1").pinned
FLOAT = "7.3.4+deb13-cloud-amd64"


def _inputs(line: str = "6.12", release: str | None = None) -> GuestInputs:
    chosen = line_named(line)
    return GuestInputs.for_release(chosen, release or chosen.pinned or FLOAT, project_requirements())


def _argv(inputs: GuestInputs, tmp_path: Path) -> list[str]:
    return mmdebstrap_argv(inputs, tmp_path / "root fs", "http://m.example/debian", tmp_path / "debs",
                           tmp_path / "x.deb", tmp_path / "wheels")


def test_package_list_parsing() -> None:
    assert parse_package_list("# c\npython3\n\nkmod  # why\nbusybox kmod\n") == ("python3", "kmod", "busybox")


def test_only_the_612_guest_has_bcc_and_the_kernel_headers() -> None:
    bcc = _inputs("6.12")
    assert bcc.packages[:2] == (f"linux-image-{PINNED_612}", f"linux-headers-{PINNED_612}")
    assert "python3-bpfcc" in bcc.packages
    for line in ("6.1", "7.x"):
        inputs = _inputs(line)
        assert inputs.packages[0] == f"linux-image-{inputs.kernel_release}"
        assert not any(p.startswith("linux-headers-") or p == "python3-bpfcc" for p in inputs.packages), line
    for inputs in (bcc, _inputs("6.1"), _inputs("7.x")):
        for needed in ("libbpf1", "bpftool", "python3-pip", "python3-venv", "cryptsetup-bin", "fsverity",
                       "busybox", "kmod", "openssl", "keyutils", "gcc", "libc6-dev"):
            assert needed in inputs.packages, (inputs.line.name, needed)
        # the Python packages come from wheels, never from Debian (bookworm's typer 0.7 crashes the CLI)
        assert not {"python3-typer", "python3-rich", "python3-pytest", "python3-cryptography"} & set(inputs.packages)


def test_the_guest_files() -> None:
    files = {f.path: f for f in _inputs().files}
    assert files[INIT_PATH].content.startswith(b"#!/bin/sh") and files[INIT_PATH].mode == 0o755
    wrapper = files[WRAPPER_PATH]
    assert wrapper.mode == 0o755 and b"exec python3 -m ipe_bpf" in wrapper.content and b"PYTHONPATH=/work" in wrapper.content
    pip_conf = files["/etc/pip.conf"].content.decode()
    assert "no-index = true" in pip_conf and f"find-links = {WHEELHOUSE}" in pip_conf
    assert "linux-initramfs-tool" in _inputs().no_initramfs_control


def test_key_is_stable_and_changes_with_every_input() -> None:
    base = _inputs()
    assert base.key() == _inputs().key()
    first = base.files[0]
    variants = [
        dataclasses.replace(base, packages=base.packages + ("strace",)),
        dataclasses.replace(base, files=(dataclasses.replace(first, content=first.content + b"\n"),) + base.files[1:]),
        dataclasses.replace(base, files=(dataclasses.replace(first, mode=0o700),) + base.files[1:]),
        dataclasses.replace(base, kernel_release="6.12.999+deb13-cloud-amd64"),
        dataclasses.replace(base, line=dataclasses.replace(base.line, suite="forky")),
        dataclasses.replace(base, line=dataclasses.replace(base.line, python="3.14")),
        dataclasses.replace(base, requirements=Requirements(base.requirements.install + ("attrs",), base.requirements.build)),
        dataclasses.replace(base, requirements=Requirements(base.requirements.install, ("setuptools>=70",))),
        dataclasses.replace(base, build_format=base.build_format + 1),
        dataclasses.replace(base, no_initramfs_control=base.no_initramfs_control + "X"),
    ]
    keys = {v.key() for v in variants}
    assert base.key() not in keys and len(keys) == len(variants)
    assert len({_inputs(line).key() for line in ("6.1", "6.12", "7.x")}) == 3


def test_kernel_from_env_and_option(tmp_path: Path) -> None:
    config = VmConfig.from_env({"IPE_BPF_CACHE": str(tmp_path), "IPE_BPF_VM_KERNEL": "6.1"})
    assert config.choice.line.name == "6.1" and config.choice.release == PINNED_61
    assert config.cache_dir == tmp_path
    assert VmConfig.from_env({"IPE_BPF_VM_KERNEL": "6.1"}, kernel="7.x").choice.release is None
    assert VmConfig.from_env({}).choice.line.name == "6.12"
    with pytest.raises(VmError) as caught:
        VmConfig.from_env({"IPE_BPF_VM_KERNEL": "5.10"})
    assert caught.value.errno_name == "EINVAL" and "6.1, 6.12, 7.x" in caught.value.message


def test_cache_dir_defaults() -> None:
    assert default_cache_dir({"IPE_BPF_CACHE": "/x/y"}) == Path("/x/y")
    assert default_cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/ipe-bpf")


def test_mmdebstrap_command_line(tmp_path: Path) -> None:
    argv = _argv(_inputs(), tmp_path)
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
    eat = mmdebstrap_argv(_inputs(), tmp_path, "http://m", tmp_path, tmp_path, tmp_path, True)
    assert any("eatmydata" in a for a in eat)


def test_the_wheels_go_into_the_image_and_stay_there_as_a_wheelhouse(tmp_path: Path) -> None:
    argv = _argv(_inputs("6.1"), tmp_path)
    hooks = [a.split("=", 1)[1] for a in argv if a.startswith("--customize-hook=")]
    assert f"sync-in {tmp_path / 'wheels'} {WHEELHOUSE}" in hooks
    install = next(h for h in hooks if "pip install" in h)
    assert install.startswith('chroot "$1" python3 -m pip install --no-index --find-links ' + WHEELHOUSE)
    assert "'typer>=0.9,<0.29'" in install and "'pytest>=7'" in install  # quoted: > is a redirection
    assert hooks.index(install) > hooks.index(f"sync-in {tmp_path / 'wheels'} {WHEELHOUSE}")


def test_each_line_builds_its_own_suite(tmp_path: Path) -> None:
    bookworm = _argv(_inputs("6.1"), tmp_path)
    assert bookworm[-3:] == ["bookworm", str(tmp_path / "root fs"), "http://m.example/debian"]
    assert not any("backports" in a for a in bookworm)
    backports = _argv(_inputs("7.x"), tmp_path)
    assert backports[-4:] == ["trixie", str(tmp_path / "root fs"), "http://m.example/debian",
                              "deb http://m.example/debian trixie-backports main"]
    assert "--include=linux-base/trixie-backports" in backports
    assert not any("backports" in a for a in _argv(_inputs("6.12"), tmp_path))


def test_root_image_is_roomy_and_aligned() -> None:
    size = root_image_size(700 << 20)
    assert size % (1 << 20) == 0 and size > (700 << 20) + (512 << 20)


def _fake_image(config: VmConfig, key: str, files: dict[str, bytes] | None = None, **manifest: object) -> Path:
    files = files if files is not None else {"root.img": b"r" * 10, "vmlinuz": b"k", "rootfs.cpio": b"i"}
    directory = config.images_dir / key
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    fields = {"key": key, "files": {n: len(d) for n, d in files.items()}, **manifest}
    (directory / "manifest.json").write_text(json.dumps(fields))
    return directory


def test_a_complete_image_is_found(tmp_path: Path) -> None:
    config = VmConfig(cache_dir=tmp_path)
    assert find_image(config) is None
    key = image_key(config)
    assert key is not None
    _fake_image(config, key)
    image = find_image(config)
    assert image is not None and image.key == key and image.root.name == "root.img"
    assert find_image(VmConfig(cache_dir=tmp_path, kernel="6.1")) is None  # another line, another image


@pytest.mark.parametrize(
    "damage",
    ["truncated file", "missing file", "bad json", "wrong key"],
)
def test_a_damaged_image_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    config = VmConfig(cache_dir=tmp_path)
    key = str(image_key(config))
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
    half = config.vm_dir / f"build-{image_key(config)}-123"
    (half).mkdir(parents=True)
    (half / "root.img").write_bytes(b"partial")
    assert find_image(config) is None


def test_init_path_is_absolute() -> None:
    assert INIT_PATH.startswith("/")


def test_a_pinned_kernel_the_mirror_no_longer_serves_is_explained() -> None:
    inputs = _inputs("6.1")
    generic = VmError("EIO", "mmdebstrap failed with exit status 1: E: apt-get install failed (full log: x)")
    log = f"E: Unable to locate package linux-image-{PINNED_61}\n"
    err = explain_mmdebstrap_failure(generic, log, inputs, "http://m.example/debian", "6.1.0-51-cloud-amd64")
    assert err.errno_name == "ENOENT"
    for words in (PINNED_61, "it serves 6.1.0-51-cloud-amd64 now", "--kernel 6.1.0-51-cloud-amd64",
                  "IPE_BPF_VM_KERNEL=6.1.0-51-cloud-amd64", "ipe_bpf/vm/lines.py", "(bookworm)"):
        assert words in err.message, words
    unknown = explain_mmdebstrap_failure(generic, log, inputs, "http://m", None)
    assert "--kernel RELEASE" in unknown.message and "it serves" not in unknown.message
    floating = explain_mmdebstrap_failure(generic, "E: Unable to locate package linux-image-7.3.4+deb13-cloud-amd64\n",
                                          _inputs("7.x"), "http://m", "7.3.5+deb13-cloud-amd64")
    assert "(trixie-backports)" in floating.message and "lines.py" not in floating.message
    other = explain_mmdebstrap_failure(generic, "E: Unable to locate package python3-nope\n", inputs, "http://m")
    assert "python3-nope" in other.message
    offline = explain_mmdebstrap_failure(generic, "W: Failed to fetch http://m/dists/trixie/InRelease\n", inputs, "http://m")
    assert offline.errno_name == "ENETUNREACH"
    assert explain_mmdebstrap_failure(generic, "something else", inputs, "http://m") is generic


def test_a_floating_line_resolves_when_built_and_remembers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = VmConfig(cache_dir=tmp_path, kernel="7.x")
    assert known_release(config) is None and image_key(config) is None and find_image(config) is None
    served = iter(["7.3.4+deb13-cloud-amd64", "7.3.5+deb13-cloud-amd64"])
    asked: list[tuple[str, str]] = []

    def fake_served(line: object, mirror: str) -> str:
        asked.append((getattr(line, "name"), mirror))
        return next(served)

    monkeypatch.setattr(releases, "served_release", fake_served)
    assert resolve_release(config, "http://m") == "7.3.4+deb13-cloud-amd64"
    assert known_release(config) == "7.3.4+deb13-cloud-amd64" == known_release(VmConfig(cache_dir=tmp_path, kernel="7.x"))
    assert resolve_release(config, "http://m") == "7.3.5+deb13-cloud-amd64"  # a build asks again
    assert asked == [("7.x", "http://m")] * 2
    pinned = VmConfig(cache_dir=tmp_path, kernel="6.1")
    assert resolve_release(pinned, "http://m") == PINNED_61 and len(asked) == 2  # pins never ask
    exact = VmConfig(cache_dir=tmp_path, kernel="7.2.12+deb13-cloud-amd64")
    assert known_release(exact) == "7.2.12+deb13-cloud-amd64"


def test_superseded_images_are_those_of_the_same_line(tmp_path: Path) -> None:
    config = VmConfig(cache_dir=tmp_path)
    _fake_image(config, "new612", line="6.12")
    _fake_image(config, "old612", line="6.12")
    _fake_image(config, "legacy", kernel_release="6.12.117+deb13-cloud-amd64")  # built before lines
    _fake_image(config, "img61", line="6.1")
    _fake_image(config, "img7", line="7.x")
    (config.images_dir / "broken").mkdir()
    assert [p.name for p in superseded(config.images_dir, "6.12", "new612")] == ["legacy", "old612"]
    assert [p.name for p in superseded(config.images_dir, "6.1", "other")] == ["img61"]
    assert superseded(tmp_path / "nothing", "6.1", "x") == []


def test_a_build_replaces_only_its_own_lines_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """build_image with the root-only steps faked: the images of other lines stay in the cache."""
    config = VmConfig(cache_dir=tmp_path, kernel="6.1")
    _fake_image(config, "old61", line="6.1", wheelhouse="cp311-old")
    _fake_image(config, "img612", line="6.12", wheelhouse="cp313-kept")
    _fake_image(config, "img7", line="7.x", wheelhouse="cp313-kept")
    for name in ("cp311-old", "cp313-kept", "tmp-cp311-x-1"):
        (config.wheels_dir / name).mkdir(parents=True)
    key = str(image_key(config))

    def fake_build(config: VmConfig, inputs: GuestInputs, mirror: str, work: Path, reporter: object) -> dict:
        for name in ("root.img", "vmlinuz", "rootfs.cpio"):
            (work / name).write_bytes(b"x")
        manifest = {"key": key, "line": inputs.line.name, "wheelhouse": inputs.wheelhouse,
                    "files": {"root.img": 1, "vmlinuz": 1, "rootfs.cpio": 1}}
        (work / "manifest.json").write_text(json.dumps(manifest))
        (config.wheels_dir / inputs.wheelhouse).mkdir(parents=True, exist_ok=True)
        return manifest

    monkeypatch.setattr(image_module, "_build", fake_build)
    monkeypatch.setattr(image_module, "resolve_mirror", lambda override: "http://m")
    monkeypatch.setattr(image_module.host, "require_root", lambda what: None)
    monkeypatch.setattr(image_module.host, "require_tools", lambda tools: None)
    monkeypatch.setattr(image_module.host, "require_space", lambda path, needed, what: None)
    monkeypatch.setattr(image_module.host, "KEYRING", tmp_path / "keyring")
    (tmp_path / "keyring").write_text("k")
    built = build_image(config)
    assert built.key == key
    assert sorted(p.name for p in config.images_dir.iterdir()) == sorted([key, "img612", "img7"])
    assert sorted(p.name for p in config.wheels_dir.iterdir()) == sorted([_inputs("6.1").wheelhouse, "cp313-kept"])
    assert build_image(config) == built  # current: nothing to do
