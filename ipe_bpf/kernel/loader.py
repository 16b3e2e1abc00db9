"""Compile, attach and pin the BPF-LSM program (`load`), and take it away again (`unload`).

`load()` compiles bpf/ipe_bpf.bpf.c with BCC (slow under emulation: once per boot),
which attaches one LSM program per hook; it then pins every map and every program link
under /sys/fs/bpf/ipe_bpf/ and drops all of its own references, so enforcement belongs
to the pins and outlives this process.  Any failure removes whatever was pinned.

`unload()` removes the pins and polls until the kernel has really released the links
(detaching is asynchronous).

BCC is imported lazily here only; everything else works without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import KernelError
from . import bpfsys, btf, devices, doctor
from .pins import HOOKS, MAP_NAMES, PIN_ROOT, control_lock, link_paths, links_dir, map_path, maps_dir

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
SOURCE = BPF_DIR / "ipe_bpf.bpf.c"
COMPAT = BPF_DIR / "bcc_compat.h"

DEFAULT_RULE_ENTRIES = 1 << 21  # both slots; a rule makes up to 8 entries
DEFAULT_DIGEST_ENTRIES = 1 << 19
DEFAULT_RINGBUF_PAGES = 64


@dataclass(frozen=True)
class LoadOptions:
    permissive: bool = False
    rule_entries: int = DEFAULT_RULE_ENTRIES
    digest_entries: int = DEFAULT_DIGEST_ENTRIES
    ringbuf_pages: int = DEFAULT_RINGBUF_PAGES
    seed_devices: bool = True


@dataclass(frozen=True)
class LoadResult:
    hooks: tuple[str, ...]
    fsverity: bool
    fsverity_missing: str | None
    overlay_missing: str | None
    seeded_devices: int
    compile_seconds: float


def cflags(
    options: LoadOptions, offsets: btf.FsverityOffsets, overlay: btf.OverlayOffsets | None = None,
    mount: list[str] | None = None,
) -> list[str]:
    return [
        f"-I{BPF_DIR}",
        f"-DIPE_RULES_MAX={options.rule_entries}",
        f"-DIPE_DIGESTS_MAX={options.digest_entries}",
        f"-DIPE_RINGBUF_PAGES={options.ringbuf_pages}",
        *offsets.defines(),
        *(overlay.defines() if overlay is not None else []),
        *(mount or []),
    ]


def overlay_offsets() -> btf.OverlayOffsets:
    """overlayfs layout for d_real_inode(); loads the overlay module if it is not loaded."""
    if not Path("/sys/kernel/btf/overlay").exists() and shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "overlay"], check=False, capture_output=True)
    return btf.overlay_offsets()


def program_text() -> str:
    """The program source with bcc_compat.h inlined.

    BCC rewrites map method calls (map.lookup(), ringbuf_reserve(), ...) only in the main
    source buffer, not in included files, so the compatibility header is spliced in.
    """
    source = SOURCE.read_text()
    include = '#include "bcc_compat.h"'
    if include not in source:
        raise KernelError("EINVAL", f"{SOURCE} does not include bcc_compat.h")
    return source.replace(include, COMPAT.read_text(), 1)


def _bcc_error(exc: BaseException) -> KernelError:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if "Permission denied" in first or "Operation not permitted" in first:
        return KernelError("EPERM", f"the kernel refused the BPF program: {first}")
    if "compile" in first.lower():
        return KernelError("EINVAL", f"BPF compile failed: {first} (details above)")
    return KernelError("EINVAL", f"BPF load failed: {first}")


def _remove_pins(root: Path) -> None:
    for d in (links_dir(root), maps_dir(root)):
        if d.is_dir():
            for p in d.iterdir():
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            d.rmdir()
    if root.is_dir():
        root.rmdir()


def load(options: LoadOptions = LoadOptions(), root: Path = PIN_ROOT) -> LoadResult:
    """Compile, attach and pin; raises KernelError (EEXIST if already loaded)."""
    doctor.require_loadable()
    with control_lock():
        if root.exists() and (link_paths(root) or (maps_dir(root).is_dir() and any(maps_dir(root).iterdir()))):
            raise KernelError("EEXIST", f"ipe-bpf is already loaded ({root} exists); unload it first")
        offsets = btf.fsverity_offsets()
        overlay = overlay_offsets()
        from bcc import BPF  # lazily: python3-bpfcc is a system package
        from bcc.libbcc import lib

        started = time.monotonic()
        try:
            b = BPF(text=program_text().encode(),
                    cflags=cflags(options, offsets, overlay, btf.mount_defines()))
        except Exception as exc:  # BCC raises plain Exception for compile/load/attach errors
            raise _bcc_error(exc) from None
        compile_seconds = time.monotonic() - started
        attached = {name.decode().removeprefix("lsm__"): fd for name, fd in b.lsm_fds.items()}
        try:
            missing = [h for h in HOOKS if h not in attached]
            if missing:
                raise KernelError("EINVAL", f"hooks not attached: {', '.join(missing)}")
            maps_dir(root).mkdir(parents=True, exist_ok=True)
            links_dir(root).mkdir(parents=True, exist_ok=True)
            for name in MAP_NAMES:
                fd = lib.bpf_table_fd(b.module, name.encode())
                if fd < 0:
                    raise KernelError("ENOENT", f"map {name} not found in the compiled program")
                bpfsys.obj_pin(fd, str(map_path(name, root)))
            from .maps import PinnedPolicyMaps

            with PinnedPolicyMaps(root) as maps:
                maps.set_enforce(not options.permissive)
                seeded = devices.seed(maps) if options.seed_devices else 0
            for hook in HOOKS:
                bpfsys.obj_pin(attached[hook], str(links_dir(root) / hook))
        except BaseException:
            b.cleanup()
            _remove_pins(root)
            raise
        b.cleanup()  # drop this process's fds: the pins own everything now
    return LoadResult(tuple(HOOKS), offsets.missing is None, offsets.missing, overlay.missing, seeded, compile_seconds)


def unload(root: Path = PIN_ROOT, timeout: float = 10.0) -> float:
    """Remove the pins and wait until every link is gone; returns the seconds waited."""
    with control_lock():
        links = link_paths(root)
        if not links and not root.exists():
            raise KernelError("ENOENT", "ipe-bpf is not loaded")
        links_ids: list[int] = []
        prog_ids: list[int] = []
        for path in links:
            fd = bpfsys.obj_get(str(path))
            try:
                info = bpfsys.link_info(fd)
            finally:
                os.close(fd)
            links_ids.append(info.id)
            prog_ids.append(info.prog_id)
        _remove_pins(root)
        started = time.monotonic()
        # A link's id disappears just before it detaches; its program's id only once the
        # detach is complete and nothing else holds the program.
        while any(bpfsys.link_exists(i) for i in links_ids) or any(bpfsys.prog_exists(i) for i in prog_ids):
            if time.monotonic() - started > timeout:
                raise KernelError(
                    "ETIMEDOUT", f"programs {prog_ids} still loaded after {timeout:.0f} s (another process holds them?)"
                )
            time.sleep(0.01)
        return time.monotonic() - started


def attached_link_ids(root: Path = PIN_ROOT) -> dict[str, int]:
    """hook -> link id of every pinned link."""
    out: dict[str, int] = {}
    for path in link_paths(root):
        fd = bpfsys.obj_get(str(path))
        try:
            out[path.name] = bpfsys.link_info(fd).id
        finally:
            os.close(fd)
    return out


if __name__ == "__main__":  # python3 -m ipe_bpf.kernel.loader load|unload (for tests)
    cmd = sys.argv[1] if len(sys.argv) > 1 else "load"
    if cmd == "load":
        r = load(LoadOptions(permissive="--permissive" in sys.argv))
        print(f"loaded in {r.compile_seconds:.1f}s", flush=True)
        if "--hold" in sys.argv:
            print("READY", flush=True)
            while True:
                time.sleep(3600)
    else:
        print(f"unloaded after {unload():.3f}s")
