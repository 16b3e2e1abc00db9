"""Building and caching the guest images, one per kernel line, side by side.

An image is a directory ``<cache>/vm/images/<key>/`` holding ``root.img`` (ext4 with the
verity feature, made by ``mke2fs -d`` from an mmdebstrap tree, no loop mounts), ``vmlinuz``
(the guest kernel, taken from its ``/boot``), ``rootfs.cpio`` (the same tree as an initramfs,
uncompressed: unpacking zstd under TCG cost 4.5 s a boot) and ``manifest.json``, written last.
``<key>`` hashes every input (see inputs.py), so changing one builds a new image and an
unchanged one is reused.  A build happens in a temporary directory that is renamed into place
only when complete: an interrupted or failed build is never taken as good.  A new image replaces
only the images of its own line (each line keeps its newest); the others stay.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VmError
from . import host
from .archive import served_release
from .config import VmConfig
from .inputs import NO_INITRAMFS_PACKAGE, GuestInputs, explain_mmdebstrap_failure, mmdebstrap_argv
from .lines import line_of_release
from .mirror import resolve_mirror
from .procs import run_logged
from .progress import Reporter, SilentReporter
from .releases import known_release, resolve_release
from .wheels import WHEELHOUSE, ensure_wheelhouse, project_requirements, prune_wheelhouses

ROOT_FILE = "root.img"
KERNEL_FILE = "vmlinuz"
INITRAMFS_FILE = "rootfs.cpio"
MANIFEST_FILE = "manifest.json"
BUILD_SPACE = 5 * host.GIB
MIB = 1 << 20


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


def current_inputs(config: VmConfig, release: str) -> GuestInputs:
    return GuestInputs.for_release(config.choice.line, release, project_requirements())


def image_key(config: VmConfig) -> str | None:
    """The key of the image the current inputs make (None: a floating line never resolved)."""
    release = known_release(config)
    return None if release is None else current_inputs(config, release).key()


def find_image(config: VmConfig) -> Image | None:
    """The cached image for the current inputs, None if there is none (corrupt: EUCLEAN)."""
    key = image_key(config)
    if key is None or not (config.images_dir / key).exists():
        return None
    return load_image(config.images_dir / key)


def image_line(directory: Path) -> str | None:
    """The line a cached image belongs to (images built before lines: by their kernel)."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if isinstance(manifest.get("line"), str):
        return manifest["line"]
    line = line_of_release(str(manifest.get("kernel_release", "")))
    return line.name if line is not None else None


def superseded(images_dir: Path, line: str, keep: str) -> list[Path]:
    """The images of LINE other than KEEP: what a new build of that line replaces."""
    if not images_dir.is_dir():
        return []
    return sorted(d for d in images_dir.iterdir() if d.name != keep and image_line(d) == line)


def _wheelhouses_in_use(images_dir: Path) -> set[str]:
    used = set()
    for directory in images_dir.iterdir() if images_dir.is_dir() else ():
        try:
            used.add(str(json.loads((directory / MANIFEST_FILE).read_text())["wheelhouse"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return used


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


def _finish_rootfs(rootfs: Path, inputs: GuestInputs, key: str) -> None:
    for item in inputs.files:
        path = rootfs / item.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.content)
        path.chmod(item.mode)
    (rootfs / "etc" / "hostname").write_text("ipe-bpf-vm\n")
    (rootfs / "etc" / "hosts").write_text("127.0.0.1\tlocalhost ipe-bpf-vm\n::1\tlocalhost\n")
    (rootfs / "etc" / "ipe-bpf-vm").write_text(
        f"key={key}\nline={inputs.line.name}\nkernel={inputs.kernel_release}\nsuite={inputs.suite}\n"
        f"python={inputs.line.python}\nwheelhouse={WHEELHOUSE}\n"
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
    """Build (or reuse) the image of config.kernel's line for the current inputs and return it.

    A floating line (7.x) first asks the mirror for its newest release.  The new image replaces
    the older images of its own line only.
    """
    reporter = reporter or SilentReporter()
    choice = config.choice
    if not force and choice.release is not None:
        try:
            existing = find_image(config)
        except VmError as err:
            reporter.note(f"{err.message.split(':')[0]}; rebuilding")
            existing = None
        if existing is not None:
            return existing
    mirror = resolve_mirror(config.mirror)
    inputs = current_inputs(config, resolve_release(config, mirror))
    key = inputs.key()
    final = config.images_dir / key
    if not force and choice.release is None and (final / MANIFEST_FILE).exists():
        try:
            return load_image(final)
        except VmError as err:
            reporter.note(f"{err.message.split(':')[0]}; rebuilding")
    host.require_root("building the VM image")
    host.require_tools(host.BUILD_TOOLS)
    if not host.KEYRING.is_file():
        raise VmError("ENOENT", f"missing {host.KEYRING} (package debian-archive-keyring): run `ipe-bpf vm setup`")
    with build_lock(config, reporter):
        if not force and (final / MANIFEST_FILE).exists():
            try:
                return load_image(final)  # another process built it while this one waited
            except VmError:
                pass
        for stale in config.vm_dir.glob("build-*"):
            remove_tree(stale)
        host.require_space(config.vm_dir, BUILD_SPACE, "building the VM image")
        work = config.vm_dir / f"build-{key}-{os.getpid()}"
        try:
            work.mkdir(parents=True)
            _build(config, inputs, mirror, work, reporter)
            config.images_dir.mkdir(parents=True, exist_ok=True)
            if final.exists():
                old = config.vm_dir / f"build-old-{key}-{os.getpid()}"
                final.rename(old)
                remove_tree(old)
            work.rename(final)
        except BaseException:
            remove_tree(work)
            raise
        for other in superseded(config.images_dir, inputs.line.name, key):
            reporter.note(f"removing the superseded {inputs.line.name} image {other.name}")
            remove_tree(other)
        prune_wheelhouses(config.wheels_dir, _wheelhouses_in_use(config.images_dir))
    return load_image(final)


def _build(config: VmConfig, inputs: GuestInputs, mirror: str, work: Path, reporter: Reporter) -> dict:
    """Build the image into WORK (the build lock held); its manifest, written last."""
    key = inputs.key()
    log = config.vm_dir / "build.log"
    log.write_text(f"ipe-bpf VM build {key}: line {inputs.line.name}, Linux {inputs.kernel_release}, "
                   f"{inputs.suite} from {mirror}\n")
    started = time.monotonic()
    line = inputs.line
    with reporter.step(f"wheels for the guest's Python {line.python} (pip download)") as step:
        wheelhouse = ensure_wheelhouse(config.wheels_dir, line, inputs.requirements, log, step)
    debs = config.debs_dir(inputs.suite)
    debs.mkdir(parents=True, exist_ok=True)
    rootfs = work / "rootfs"
    in_ram = _rootfs_on_tmpfs(rootfs)
    local_deb = _make_no_initramfs_deb(work, inputs.no_initramfs_control)
    argv = mmdebstrap_argv(inputs, rootfs, mirror, debs, local_deb, wheelhouse, eatmydata=not in_ram)
    with reporter.step(f"mmdebstrap: Debian {inputs.suite} + Linux {inputs.kernel_release}") as step:
        try:
            run_logged(argv, log, step)
        except VmError as err:
            text = log.read_text(errors="replace")
            served = _served_now(inputs, mirror) if "Unable to locate package linux-" in text else None
            raise explain_mmdebstrap_failure(err, text, inputs, mirror, served) from None
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
    manifest = {
        "key": key,
        "line": line.name,
        "kernel_release": inputs.kernel_release,
        "suite": inputs.suite,
        "kernel_suite": line.kernel_suite,
        "python": line.python,
        "requirements": list(inputs.requirements.every),
        "wheelhouse": wheelhouse.name,
        "packages": list(inputs.packages),
        "build_format": inputs.build_format,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
        "rootfs_bytes": tree,
        "files": {name: (work / name).stat().st_size for name in (ROOT_FILE, KERNEL_FILE, INITRAMFS_FILE)},
    }
    with open(work / MANIFEST_FILE, "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.sync()
    return manifest


def _served_now(inputs: GuestInputs, mirror: str) -> str | None:
    """The release of the line the mirror serves now (for the error when ours is gone)."""
    try:
        return served_release(inputs.line, mirror)
    except VmError:
        return None


def image_summary(image: Image) -> dict:
    return {"directory": str(image.directory), **{k: v for k, v in image.manifest.items() if k != "packages"}}


__all__ = ["Image", "build_image", "find_image", "image_key", "load_image", "superseded"]
