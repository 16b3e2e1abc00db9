"""Building and caching the guest image.

An image is a directory ``<cache>/vm/images/<key>/`` holding ``root.img`` (ext4 with the
verity feature, made by ``mke2fs -d`` from an mmdebstrap tree, no loop mounts), ``vmlinuz``
(the guest kernel, taken from its ``/boot``), ``rootfs.cpio`` (the same tree as an
initramfs, uncompressed: unpacking zstd under TCG cost 4.5 s a boot) and ``manifest.json``, written last.  ``<key>`` hashes every input (package list,
PID-1 script, kernel release, suite, builder format), so changing one builds a new image and
an unchanged one is reused.  A build happens in a temporary directory that is renamed into
place only when complete: an interrupted or failed build is never taken as good.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import VmError
from . import host
from .config import VmConfig
from .mirror import resolve_mirror
from .procs import run_logged
from .progress import Reporter, SilentReporter

# Bump when the way an image is assembled changes (so cached images are rebuilt).
BUILD_FORMAT = 2
INIT_PATH = "/usr/local/sbin/ipe-bpf-vm-init"
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
ROOT_FILE = "root.img"
KERNEL_FILE = "vmlinuz"
INITRAMFS_FILE = "rootfs.cpio"
MANIFEST_FILE = "manifest.json"
BUILD_SPACE = 5 * host.GIB
MIB = 1 << 20


def _guest_file(name: str) -> bytes:
    return resources.files("ipe_bpf.vm.guest").joinpath(name).read_bytes()


def parse_package_list(text: str) -> tuple[str, ...]:
    """Package names of a list file: one per line (or several), ``#`` comments."""
    names: list[str] = []
    for line in text.splitlines():
        for word in line.split("#", 1)[0].split():
            if word not in names:
                names.append(word)
    return tuple(names)


@dataclass(frozen=True)
class GuestInputs:
    """Everything an image is built from; its hash names the image."""

    packages: tuple[str, ...]
    init_script: bytes
    kernel_release: str
    suite: str
    backports: bool = False
    no_initramfs_control: str = NO_INITRAMFS_CONTROL
    build_format: int = BUILD_FORMAT

    @classmethod
    def for_config(cls, config: VmConfig) -> "GuestInputs":
        listed = parse_package_list(_guest_file("packages.txt").decode())
        return cls(
            packages=tuple(config.kernel_packages) + listed,
            init_script=_guest_file("init.sh"),
            kernel_release=config.kernel_release,
            suite=config.suite,
            backports=config.backports,
        )

    def key(self) -> str:
        digest = hashlib.sha256()
        for part in (
            f"format={self.build_format}",
            f"suite={self.suite}",
            f"kernel={self.kernel_release}",
            "packages=" + " ".join(self.packages),
            "no-initramfs=" + self.no_initramfs_control,
            *(["backports=1"] if self.backports else []),  # absent: keys of existing images hold
        ):
            digest.update(part.encode() + b"\0")
        digest.update(hashlib.sha256(self.init_script).digest())
        return digest.hexdigest()[:20]


@dataclass(frozen=True)
class Image:
    """A complete cached image."""

    directory: Path
    manifest: dict = field(compare=False)

    @property
    def root(self) -> Path:
        return self.directory / ROOT_FILE

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL_FILE

    @property
    def initramfs(self) -> Path:
        return self.directory / INITRAMFS_FILE

    @property
    def key(self) -> str:
        return str(self.manifest["key"])


def load_image(directory: Path) -> Image:
    """The image in DIRECTORY; VmError(EUCLEAN) if it is incomplete or damaged."""
    hint = "rebuild it with `ipe-bpf vm build --force`"
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if manifest.get("key") != directory.name:
            raise ValueError("manifest names another key")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VmError("EUCLEAN", f"cached VM image {directory} is corrupt ({err}): {hint}") from None
    for name, size in files.items():
        path = directory / name
        try:
            actual = path.stat().st_size
        except OSError:
            raise VmError("EUCLEAN", f"cached VM image {directory} lacks {name}: {hint}") from None
        if actual != size:
            raise VmError(
                "EUCLEAN", f"cached VM image file {path} has {actual} bytes, expected {size}: {hint}"
            )
    return Image(directory, manifest)


def find_image(config: VmConfig) -> Image | None:
    """The cached image for the current inputs, None if there is none (corrupt: EUCLEAN)."""
    directory = config.images_dir / GuestInputs.for_config(config).key()
    if not directory.exists():
        return None
    return load_image(directory)


@contextmanager
def build_lock(config: VmConfig, reporter: Reporter | None = None) -> Iterator[None]:
    """One build at a time per cache (others wait: CI jobs may share a cache)."""
    config.vm_dir.mkdir(parents=True, exist_ok=True)
    with open(config.lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if reporter is not None:
                reporter.note(f"waiting for another VM build to finish ({config.lock_path})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below PATH."""
    top = str(path.resolve())
    found = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            target = line.split()[1].replace("\\040", " ")
            if target == top or target.startswith(top + "/"):
                found.append(target)
    return found


def remove_tree(path: Path) -> None:
    """Remove a (possibly half-built) tree, never crossing into a mount left inside it."""
    if not path.exists():
        return
    for target in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)
    if _mounts_under(path):
        raise VmError("EBUSY", f"{path} still has mounts inside; unmount them and remove it by hand")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def _make_no_initramfs_deb(workdir: Path, control: str) -> Path:
    pkg = workdir / "no-initramfs"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(control)
    out = workdir / f"{NO_INITRAMFS_PACKAGE}_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(pkg), str(out)],
        check=True,
        capture_output=True,
    )
    return out


TMPFS_MIN_AVAILABLE = 4 * host.GIB
TMPFS_SIZE = "3g"


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _rootfs_on_tmpfs(rootfs: Path) -> bool:
    """Build the tree in RAM when there is room: dpkg's fsyncs and deleting 30,000 files
    cost minutes on some disks (discard); unmounting a tmpfs costs nothing."""
    rootfs.mkdir()
    if _mem_available() < TMPFS_MIN_AVAILABLE:
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "ipe-bpf-rootfs", str(rootfs)],
        capture_output=True,
    )
    return proc.returncode == 0


def mmdebstrap_argv(
    inputs: GuestInputs, rootfs: Path, mirror: str, debs: Path, local_deb: Path, eatmydata: bool = False
) -> list[str]:
    """The mmdebstrap command line (pure: unit-tested)."""
    q = shlex.quote
    argv = [
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
        *([f"--include=linux-base/{inputs.suite}-backports"] if inputs.backports else []),
        "--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount",
        *(["--hook-dir=/usr/share/mmdebstrap/hooks/eatmydata"] if eatmydata else []),
        "--skip=essential/unlink",
        f"--setup-hook=mkdir -p {q(str(debs))} \"$1\"/var/cache/apt/archives/",
        f"--setup-hook=sync-in {q(str(debs))} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {q(str(debs))}",
        inputs.suite,
        str(rootfs),
        mirror,
        *([f"deb {mirror} {inputs.suite}-backports main"] if inputs.backports else []),
    ]
    return argv


def explain_mmdebstrap_failure(err: VmError, log_text: str, inputs: GuestInputs, mirror: str) -> VmError:
    """A clearer error for the failures a user can act on (pinned kernel gone, no network)."""
    missing = re.findall(r"Unable to locate package (\S+)", log_text)
    if any(name.startswith(("linux-image-", "linux-headers-")) for name in missing):
        return VmError(
            "ENOENT",
            f"{mirror} ({inputs.suite}) no longer serves the pinned kernel {inputs.kernel_release}: set "
            f"IPE_BPF_VM_KERNEL to the release it serves now (the ABI name in the Depends of "
            f"linux-image-cloud-amd64, e.g. `apt-cache show linux-image-cloud-amd64` on a {inputs.suite} system)",
        )
    if missing:
        return VmError("ENOENT", f"{mirror} ({inputs.suite}) has no package {', '.join(sorted(set(missing)))}")
    if re.search(r"(Could not resolve|Failed to fetch|Temporary failure resolving|Connection failed)", log_text):
        return VmError("ENETUNREACH", f"cannot download from {mirror}: {err.message}")
    return err


def _finish_rootfs(rootfs: Path, inputs: GuestInputs, key: str) -> None:
    init = rootfs / INIT_PATH.lstrip("/")
    init.parent.mkdir(parents=True, exist_ok=True)
    init.write_bytes(inputs.init_script)
    init.chmod(0o755)
    (rootfs / "etc" / "hostname").write_text("ipe-bpf-vm\n")
    (rootfs / "etc" / "hosts").write_text("127.0.0.1\tlocalhost ipe-bpf-vm\n::1\tlocalhost\n")
    (rootfs / "etc" / "ipe-bpf-vm").write_text(
        f"key={key}\nkernel={inputs.kernel_release}\nsuite={inputs.suite}\n"
    )
    for name in ("work", "results"):
        (rootfs / name).mkdir(exist_ok=True)
    for leftover in (rootfs / "var" / "cache" / "apt").glob("*.bin"):
        leftover.unlink()


def _make_ext4(source: Path, image: Path, size: int, label: str, log: Path) -> None:
    with image.open("wb") as handle:
        handle.truncate(size)
    run_logged(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "verity", "-m", "0", "-L", label,
         "-d", str(source), str(image)],
        log,
    )


def round_up(value: int, unit: int = MIB) -> int:
    return -(-value // unit) * unit


def root_image_size(tree_bytes: int) -> int:
    """Room for the tree plus ext4 metadata and 512 MiB the tests may write (sparse)."""
    return round_up(int(tree_bytes * 1.25) + 512 * MIB)


def _make_initramfs(rootfs: Path, out: Path, log: Path) -> None:
    script = (
        "set -o pipefail; find . -xdev -print0 | LC_ALL=C sort -z "
        "| cpio --null --create --format=newc --quiet > " + shlex.quote(str(out))
    )
    run_logged(["bash", "-c", script], log, cwd=rootfs)


def build_image(config: VmConfig, force: bool = False, reporter: Reporter | None = None) -> Image:
    """Build (or reuse) the image for the current inputs and return it."""
    reporter = reporter or SilentReporter()
    inputs = GuestInputs.for_config(config)
    key = inputs.key()
    final = config.images_dir / key
    if not force:
        try:
            existing = find_image(config)
        except VmError as err:
            reporter.note(f"{err.message.split(':')[0]}; rebuilding")
            existing = None
        if existing is not None:
            return existing
    host.require_root("building the VM image")
    host.require_tools(host.BUILD_TOOLS)
    if not host.KEYRING.is_file():
        raise VmError("ENOENT", f"missing {host.KEYRING} (package debian-archive-keyring): run `ipe-bpf vm setup`")
    mirror = resolve_mirror(config.mirror)
    with build_lock(config, reporter):
        if not force and (final / MANIFEST_FILE).exists():
            try:
                return load_image(final)  # another process built it while this one waited
            except VmError:
                pass
        for stale in config.vm_dir.glob("build-*"):
            remove_tree(stale)
        host.require_space(config.vm_dir, BUILD_SPACE, "building the VM image")
        config.debs_dir.mkdir(parents=True, exist_ok=True)
        work = config.vm_dir / f"build-{key}-{os.getpid()}"
        log = config.vm_dir / "build.log"
        log.write_text(f"ipe-bpf VM build {key} from {mirror} {inputs.suite}\n")
        started = time.monotonic()
        try:
            work.mkdir(parents=True)
            rootfs = work / "rootfs"
            in_ram = _rootfs_on_tmpfs(rootfs)
            local_deb = _make_no_initramfs_deb(work, inputs.no_initramfs_control)
            argv = mmdebstrap_argv(inputs, rootfs, mirror, config.debs_dir, local_deb, eatmydata=not in_ram)
            with reporter.step(f"mmdebstrap: Debian {inputs.suite} + Linux {inputs.kernel_release}") as step:
                try:
                    run_logged(argv, log, step)
                except VmError as err:
                    raise explain_mmdebstrap_failure(err, log.read_text(errors="replace"), inputs, mirror) from None
            _finish_rootfs(rootfs, inputs, key)
            vmlinuz = rootfs / "boot" / f"vmlinuz-{inputs.kernel_release}"
            if not vmlinuz.is_file():
                raise VmError("ENOENT", f"the guest has no {vmlinuz.name} (see {log})")
            shutil.copyfile(vmlinuz, work / KERNEL_FILE)
            tree = host.tree_size(rootfs)
            with reporter.step(f"root disk image ({tree / MIB:.0f} MiB of files)"):
                _make_ext4(rootfs, work / ROOT_FILE, root_image_size(tree), "ipe-bpf-root", log)
            with reporter.step("initramfs (the same tree as a cpio)"):
                _make_initramfs(rootfs, work / INITRAMFS_FILE, log)
            remove_tree(rootfs)
            local_deb.unlink()
            remove_tree(work / "no-initramfs")
            files = {name: (work / name).stat().st_size for name in (ROOT_FILE, KERNEL_FILE, INITRAMFS_FILE)}
            manifest = {
                "key": key,
                "kernel_release": inputs.kernel_release,
                "suite": inputs.suite,
                "packages": list(inputs.packages),
                "build_format": BUILD_FORMAT,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - started, 1),
                "rootfs_bytes": tree,
                "files": files,
            }
            with open(work / MANIFEST_FILE, "w") as handle:
                json.dump(manifest, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.sync()
            config.images_dir.mkdir(parents=True, exist_ok=True)
            if final.exists():
                old = config.vm_dir / f"build-old-{key}-{os.getpid()}"
                final.rename(old)
                remove_tree(old)
            work.rename(final)
        except BaseException:
            remove_tree(work)
            raise
        for other in config.images_dir.iterdir():
            if other.name != key:
                remove_tree(other)
    return load_image(final)


def image_summary(image: Image) -> dict:
    return {"directory": str(image.directory), **{k: v for k, v in image.manifest.items() if k != "packages"}}


__all__ = ["GuestInputs", "Image", "build_image", "find_image", "load_image"]
