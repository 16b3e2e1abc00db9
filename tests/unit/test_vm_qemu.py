"""The QEMU command line of a boot."""

from __future__ import annotations

from pathlib import Path

from ipe_bpf.vm.inputs import INIT_PATH
from ipe_bpf.vm.qemu import BootSpec, Disk


def _spec(**kw: object) -> BootSpec:
    values: dict[str, object] = dict(
        kernel=Path("/c/vmlinuz"),
        root=Path("/c/root.img"),
        initramfs=None,
        disks=(Disk("ctl", Path("/r/ctl.img"), readonly=True), Disk("work", Path("/r/a,b.img"))),
    )
    values.update(kw)
    return BootSpec(**values)  # type: ignore[arg-type]


def _opt(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_disk_boot() -> None:
    argv = _spec().argv()
    assert argv[0] == "qemu-system-x86_64"
    assert _opt(argv, "-machine") == ["q35"] and _opt(argv, "-accel") == ["tcg,thread=single"]  # vCPUs in one thread: no cross-modifying-code races
    assert _opt(argv, "-cpu") == ["max"] and _opt(argv, "-smp") == ["2"] and _opt(argv, "-m") == ["2048"]
    assert "-no-reboot" in argv and _opt(argv, "-nic") == ["none"]
    assert _opt(argv, "-kernel") == ["/c/vmlinuz"]
    append = _opt(argv, "-append")[0]
    assert "root=/dev/nvme0n1" in append and f"init={INIT_PATH}" in append and "console=ttyS0" in append
    assert "panic=-1" in append
    assert "no_timer_check" in append.split()  # a loaded host made the IO-APIC timer check panic
    drives = _opt(argv, "-drive")
    assert drives[0].startswith("file=/c/root.img,") and "snapshot=on" in drives[0]
    assert [d for d in _opt(argv, "-device") if d.startswith("nvme")] == ["nvme,serial=ipe-bpf-root,drive=root"]
    assert "readonly=on" in drives[1]
    assert drives[2].startswith("file=/r/a,,b.img,")  # commas doubled
    assert "virtio-blk-pci,drive=work,serial=work" in _opt(argv, "-device")
    assert "-icount" not in argv and "-initrd" not in argv


def test_initramfs_boot_has_no_root_disk() -> None:
    argv = _spec(root=None, initramfs=Path("/c/rootfs.cpio"), memory_mib=4096).argv()
    append = _opt(argv, "-append")[0]
    assert f"rdinit={INIT_PATH}" in append and "root=" not in append
    assert _opt(argv, "-initrd") == ["/c/rootfs.cpio"]
    assert not any(d.startswith("nvme") for d in _opt(argv, "-device"))
    assert _opt(argv, "-m") == ["4096"]


def test_icount() -> None:
    assert _opt(_spec(icount=True).argv(), "-icount") == ["shift=0,sleep=on"]


def test_uefi_boot_adds_pflash_and_kernel_args() -> None:
    argv = _spec(firmware=(Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/r/v,ars.fd")),
                 kernel_args=("audit=1",)).argv()
    drives = _opt(argv, "-drive")
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd" in drives
    assert "if=pflash,format=raw,unit=1,file=/r/v,,ars.fd" in drives
    assert " audit=1 " in _opt(argv, "-append")[0]
    assert not any("pflash" in d for d in _opt(_spec().argv(), "-drive"))


def test_systemd_init_and_a_kept_root_disk() -> None:
    argv = _spec(init="/lib/systemd/systemd", snapshot=False, kernel_args=("systemd.unit=multi-user.target",)).argv()
    append = _opt(argv, "-append")[0]
    assert "init=/lib/systemd/systemd" in append.split() and append.endswith(
        "systemd.unit=multi-user.target root=/dev/nvme0n1 rootfstype=ext4 rw init=/lib/systemd/systemd")
    assert _opt(argv, "-drive")[0] == "file=/c/root.img,if=none,id=root,format=raw,cache=unsafe"
