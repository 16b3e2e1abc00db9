"""The QEMU command line of a test VM boot (pure: unit-tested)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .inputs import INIT_PATH

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class Disk:
    """A virtio-blk data disk the guest finds by its serial."""

    serial: str
    path: Path
    readonly: bool = False


@dataclass(frozen=True)
class BootSpec:
    kernel: Path
    root: Path | None  # the ext4 root image (None: boot from the initramfs)
    initramfs: Path | None
    disks: tuple[Disk, ...]
    memory_mib: int = 2048
    cpus: int = 2
    icount: bool = False
    # TCG with every vCPU in one host thread (round robin).  With a thread per vCPU (QEMU 7.2's
    # default) a vCPU sometimes still ran an int3 that text_poke_bp() had already taken out, and
    # the guest died with "Oops: int3" (a static key at 6.12's boot; an earlier 7.x Oops in a BPF
    # trampoline looked the same).
    accel: str = "tcg,thread=single"
    firmware: tuple[Path, Path] | None = None  # UEFI (code, per-run variable store); None: SeaBIOS
    kernel_args: tuple[str, ...] = ()
    init: str = INIT_PATH  # PID 1 (systemd for `--systemd` boots)
    snapshot: bool = True  # False: the root disk keeps what the guest writes (`--state`)

    def cmdline(self) -> str:
        # no_timer_check: under a loaded host TCG's timer interrupt can arrive too late for the
        # kernel's check, which then panics with "IO-APIC + timer doesn't work!"
        common = ("console=ttyS0 panic=-1 oops=panic quiet loglevel=4 8250.nr_uarts=1 random.trust_cpu=on "
                  "no_timer_check")
        common = " ".join((common, *self.kernel_args))
        if self.root is not None:
            return f"{common} root=/dev/nvme0n1 rootfstype=ext4 rw init={self.init}"
        return f"{common} rdinit={self.init}"

    def argv(self) -> list[str]:
        argv = [
            QEMU,
            "-machine", "q35",
            "-accel", self.accel,
            "-cpu", "max",
            "-smp", str(self.cpus),
            "-m", str(self.memory_mib),
            # no display, no VGA (so the firmware stays off the console), serial on stdio
            "-display", "none", "-vga", "none", "-monitor", "none", "-serial", "stdio",
            "-no-reboot",
            "-nic", "none",
            "-kernel", str(self.kernel),
            "-append", self.cmdline(),
        ]
        if self.icount:
            # 1 ns of guest time per instruction; an idle guest (waiting for its disk) counts the
            # host's real time (sleep=on).  With sleep=off it jumps to its next timer instead, as
            # often as the host lets it while the I/O is pending: one 11 MB fsync then counted
            # 0.2 to 9 s of guest time from boot to boot, for the same 0.1 s of host I/O.
            argv += ["-icount", "shift=0,sleep=on"]
        if self.firmware is not None:
            code, variables = self.firmware
            argv += [
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_escape(code)}",
                "-drive", f"if=pflash,format=raw,unit=1,file={_escape(variables)}",
            ]
        # cache=unsafe on every disk: a guest flush stops at the host's page cache.  These disks are
        # thrown away or only have to outlive QEMU (never the host), and a flush that waits on the
        # host's disk would count as guest time under -icount.
        if self.root is not None:
            argv += [
                "-drive", f"file={_escape(self.root)},if=none,id=root,format=raw,cache=unsafe"
                          + (",snapshot=on" if self.snapshot else ""),
                "-device", "nvme,serial=ipe-bpf-root,drive=root",
            ]
        if self.initramfs is not None:
            argv += ["-initrd", str(self.initramfs)]
        for disk in self.disks:
            ro = ",readonly=on" if disk.readonly else ""
            argv += [
                "-drive", f"file={_escape(disk.path)},if=none,id={disk.serial},format=raw,cache=unsafe{ro}",
                "-device", f"virtio-blk-pci,drive={disk.serial},serial={disk.serial}",
            ]
        return argv


def _escape(path: Path) -> str:
    """QEMU option values double a comma to mean a literal one."""
    return str(path).replace(",", ",,")
