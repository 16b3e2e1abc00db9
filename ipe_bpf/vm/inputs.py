"""What a guest image is built from, the key that names it, and the mmdebstrap command line.

Per kernel line: its Debian suite, its kernel release (and the headers where BCC needs them),
the package lists (``guest/packages.txt`` for every line plus ``guest/packages-<line>.txt``),
the guest's files (PID-1 script, ``ipe-bpf`` wrapper, pip configuration) and the Python
requirements whose wheels go into it.  The key hashes all of them: change one, get a new image.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import VmError
from .lines import KernelLine
from .wheels import WHEELHOUSE, Requirements, install_command, pip_conf, wheelhouse_name

# Bump when the way an image is assembled changes (so cached images are rebuilt).
BUILD_FORMAT = 3
# Units a guest package enables that `vm run --systemd` boots must not start: fapolicyd (6.12's
# list, for benchmarks/report.py) would judge every open and exec with its own rules.  The
# benchmark starts it itself.
NOT_STARTED_AT_BOOT = ("fapolicyd.service",)
INIT_PATH = "/usr/local/sbin/ipe-bpf-vm-init"
SYSTEMD_RUNNER_PATH = "/usr/local/sbin/ipe-bpf-vm-systemd"
SYSTEMD_UNITS = ("ipe-bpf-vm-disks.service", "ipe-bpf-vm-run.service")  # used by --systemd boots only
WRAPPER_PATH = "/usr/local/bin/ipe-bpf"
NO_INITRAMFS_PACKAGE = "ipe-bpf-no-initramfs"
NO_INITRAMFS_CONTROL = f"""\
Package: {NO_INITRAMFS_PACKAGE}
Version: 1.0
Architecture: all
Maintainer: ipe-bpf test VM <root@localhost>
Provides: linux-initramfs-tool
Priority: optional
Section: kernel
Description: stands in for initramfs-tools in the ipe-bpf test VM
 The test VM boots its kernel without an initrd, so initramfs-tools (and the udev
 and systemd it would pull in) stay out of the image.
"""
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)


def guest_file(name: str) -> bytes | None:
    """A data file of ``ipe_bpf/vm/guest`` (None if there is no such file)."""
    path = resources.files("ipe_bpf.vm.guest").joinpath(name)
    return path.read_bytes() if path.is_file() else None


def parse_package_list(text: str) -> tuple[str, ...]:
    """Package names of a list file: one per line (or several), ``#`` comments."""
    names: list[str] = []
    for line in text.splitlines():
        for word in line.split("#", 1)[0].split():
            if word not in names:
                names.append(word)
    return tuple(names)


def line_packages(line: KernelLine, release: str) -> tuple[str, ...]:
    """The kernel (with headers where BCC needs them) and the listed packages of LINE."""
    kernel = (f"linux-image-{release}",) + ((f"linux-headers-{release}",) if line.bcc else ())
    listed: tuple[str, ...] = ()
    for name in ("packages.txt", f"packages-{line.name}.txt"):
        text = guest_file(name)
        listed += parse_package_list(text.decode()) if text is not None else ()
    return kernel + tuple(dict.fromkeys(listed))


@dataclass(frozen=True)
class GuestFile:
    """A file the builder writes into the image."""

    path: str
    content: bytes
    mode: int = 0o644


def guest_files() -> tuple[GuestFile, ...]:
    return (
        GuestFile(INIT_PATH, guest_file("init.sh") or b"", 0o755),
        GuestFile(WRAPPER_PATH, guest_file("ipe-bpf.sh") or b"", 0o755),
        GuestFile("/etc/pip.conf", pip_conf().encode()),
        GuestFile(SYSTEMD_RUNNER_PATH, guest_file("systemd.sh") or b"", 0o755),
        *(GuestFile(f"/etc/systemd/system/{unit}", guest_file(unit) or b"") for unit in SYSTEMD_UNITS),
    )


@dataclass(frozen=True)
class GuestInputs:
    """Everything an image is built from; its hash names the image."""

    line: KernelLine
    kernel_release: str
    packages: tuple[str, ...]
    files: tuple[GuestFile, ...]
    requirements: Requirements
    no_initramfs_control: str = NO_INITRAMFS_CONTROL
    build_format: int = BUILD_FORMAT

    @classmethod
    def for_release(cls, line: KernelLine, release: str, requirements: Requirements) -> "GuestInputs":
        return cls(line, release, line_packages(line, release), guest_files(), requirements)

    @property
    def suite(self) -> str:
        return self.line.suite

    @property
    def wheelhouse(self) -> str:
        return wheelhouse_name(self.line, self.requirements)

    def key(self) -> str:
        digest = hashlib.sha256()
        for part in (
            f"format={self.build_format}",
            f"line={self.line}",
            f"kernel={self.kernel_release}",
            "packages=" + " ".join(self.packages),
            "no-initramfs=" + self.no_initramfs_control,
            "requirements=" + " ".join(self.requirements.every),
            *(f"file={f.path}:{f.mode:o}:{hashlib.sha256(f.content).hexdigest()}" for f in self.files),
        ):
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()[:20]


def mmdebstrap_argv(
    inputs: GuestInputs,
    rootfs: Path,
    mirror: str,
    debs: Path,
    local_deb: Path,
    wheelhouse: Path,
    eatmydata: bool = False,
) -> list[str]:
    """The mmdebstrap command line (pure: unit-tested)."""
    q = shlex.quote
    backports = f"{inputs.suite}-backports" if inputs.line.backports else None
    return [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--verbose",
        "--architectures=amd64",
        "--aptopt=APT::Install-Recommends \"false\"",
        "--aptopt=APT::Install-Suggests \"false\"",
        *(f"--dpkgopt={rule}" for rule in DPKG_EXCLUDES),
        "--include=" + ",".join(inputs.packages),
        f"--include={local_deb}",
        *([f"--include=linux-base/{backports}"] if backports else []),
        "--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount",
        *(["--hook-dir=/usr/share/mmdebstrap/hooks/eatmydata"] if eatmydata else []),
        "--skip=essential/unlink",
        f"--setup-hook=mkdir -p {q(str(debs))} \"$1\"/var/cache/apt/archives/",
        f"--setup-hook=sync-in {q(str(debs))} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {q(str(debs))}",
        f"--customize-hook=mkdir -p \"$1\"{WHEELHOUSE}",
        f"--customize-hook=sync-in {q(str(wheelhouse))} {WHEELHOUSE}",
        "--customize-hook=" + install_command(inputs.requirements),
        *(f"--customize-hook=rm -f \"$1\"/etc/systemd/system/multi-user.target.wants/{unit}"
          for unit in NOT_STARTED_AT_BOOT),
        inputs.suite,
        str(rootfs),
        mirror,
        *([f"deb {mirror} {backports} main"] if backports else []),
    ]


def explain_mmdebstrap_failure(
    err: VmError, log_text: str, inputs: GuestInputs, mirror: str, served: str | None = None
) -> VmError:
    """A clearer error for the failures a user can act on (kernel gone, no network).

    SERVED is the release of the line the mirror offers now, if known.
    """
    missing = re.findall(r"Unable to locate package (\S+)", log_text)
    line = inputs.line
    if any(name.startswith(("linux-image-", "linux-headers-")) for name in missing):
        now = f" (it serves {served} now)" if served and served != inputs.kernel_release else ""
        fix = (
            f"build with --kernel {served or 'RELEASE'} (or IPE_BPF_VM_KERNEL={served or 'RELEASE'})"
            + (f" and update the {line.name} pin in ipe_bpf/vm/lines.py" if line.pinned else "")
        )
        return VmError(
            "ENOENT",
            f"{mirror} ({line.kernel_suite}) does not serve the {line.name} kernel {inputs.kernel_release}{now}: {fix}",
        )
    if missing:
        return VmError("ENOENT", f"{mirror} ({inputs.suite}) has no package {', '.join(sorted(set(missing)))}")
    if re.search(r"(Could not resolve|Failed to fetch|Temporary failure resolving|Connection failed)", log_text):
        return VmError("ENETUNREACH", f"cannot download from {mirror}: {err.message}")
    return err
