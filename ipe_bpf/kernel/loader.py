"""Load the BPF-LSM program (attach and pin it), and take it away again (unload).

Two loaders produce the same pinned result:
  - core (default): the prebuilt CO-RE object through the distribution's libbpf
    (core_loader.py): no compiler, no kernel headers, seconds;
  - bcc (`--loader bcc` or IPE_BPF_LOADER=bcc): BCC compiles the source at load time
    (bcc_loader.py), for development on kernels whose headers BCC understands.
Either way `load()` pins every map and every program link under /sys/fs/bpf/ipe_bpf/ and
drops its own references, so enforcement belongs to the pins and outlives this process; what
the kernel offered is recorded in /run/ipe-bpf/loaded.json (status, doctor, the deploy-time
property check read it).  Any failure removes whatever was pinned.

`unload()` removes the pins and polls until the kernel has really released the links
(detaching is asynchronous).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from ..bpf_files import OBJECT, bpf_file
from ..errors import KernelError
from . import bpfsys, doctor, features
from .doctor import LOADERS, default_loader
from .features import DECISION_HOOKS, KernelFeatures
from .pins import (LOADED_STATE, MAP_NAMES, PIN_ROOT, control_lock, link_paths, links_dir, map_path,
                   maps_dir)

DEFAULT_RINGBUF_PAGES = 64


@dataclass(frozen=True)
class LoadOptions:
    permissive: bool = False
    ringbuf_pages: int = DEFAULT_RINGBUF_PAGES
    loader: str | None = None  # None: $IPE_BPF_LOADER, else "core"


@dataclass(frozen=True)
class LoadResult:
    loader: str
    hooks: tuple[str, ...]  # attached
    features: KernelFeatures
    seconds: float

    @property
    def missing_hooks(self) -> tuple[str, ...]:
        return self.features.missing_hooks


class _Program(Protocol):
    def map_fd(self, name: str) -> int: ...

    def link_fds(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LoadedState:
    """What /run/ipe-bpf/loaded.json remembers about the program that is loaded."""

    loader: str
    hooks: tuple[str, ...]
    features: KernelFeatures
    object_sha256: str | None
    loaded_at: float

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["features"] = self.features.as_dict()
        return d

    @classmethod
    def read(cls, path: Path = LOADED_STATE) -> "LoadedState | None":
        try:
            d = json.loads(path.read_text())
            return cls(d["loader"], tuple(d["hooks"]), KernelFeatures.from_dict(d["features"]),
                       d.get("object_sha256"), float(d["loaded_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


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


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def _forget_unused_inodes() -> None:
    """Evict unused inodes, so that fs-verity files whose signature was checked before load
    are checked again, in view of the program, when next opened (files in use: verity_seed)."""
    try:
        for _ in range(3):  # an inode recently used survives one pass of the LRU (referenced bit)
            DROP_CACHES.write_text("3\n")  # page cache too: an inode with cached pages stays
    except OSError:
        pass


def _load_program(loader: str, options: LoadOptions, found: KernelFeatures) -> _Program:
    if loader == "bcc":
        from . import bcc_loader

        return bcc_loader.load_program(options.ringbuf_pages)
    from . import core_loader

    return core_loader.load_program(found, options.ringbuf_pages)


def _pin(program: _Program, options: LoadOptions, root: Path) -> tuple[str, ...]:
    maps_dir(root).mkdir(parents=True, exist_ok=True)
    links_dir(root).mkdir(parents=True, exist_ok=True)
    for name in MAP_NAMES:
        bpfsys.obj_pin(program.map_fd(name), str(map_path(name, root)))
    from .maps import PinnedPolicyMaps

    with PinnedPolicyMaps(root) as maps:
        maps.set_enforce(not options.permissive)
    links = program.link_fds()
    missing = [h for h in DECISION_HOOKS if h not in links]
    if missing:
        raise KernelError("EINVAL", f"hooks not attached: {', '.join(missing)}")
    for hook, fd in links.items():  # enforcement starts here
        bpfsys.obj_pin(fd, str(links_dir(root) / hook))
    return tuple(sorted(links))


def load(options: LoadOptions = LoadOptions(), root: Path = PIN_ROOT,
         state_file: Path = LOADED_STATE) -> LoadResult:
    """Load, attach and pin; raises KernelError (EEXIST if already loaded)."""
    loader = options.loader or default_loader()
    if loader not in LOADERS:
        raise KernelError("EINVAL", f"unknown loader {loader!r} (expected {' or '.join(LOADERS)})")
    doctor.require_loadable(loader)
    with control_lock():
        if root.exists() and (link_paths(root) or (maps_dir(root).is_dir() and any(maps_dir(root).iterdir()))):
            raise KernelError("EEXIST", f"ipe-bpf is already loaded ({root} exists); unload it first")
        features.load_modules()
        found = features.probe()
        missing = [h for h in DECISION_HOOKS if h not in found.hooks]
        if missing:
            raise KernelError("EOPNOTSUPP", f"this kernel lacks the LSM hooks {', '.join(missing)}")
        started = time.monotonic()
        program = _load_program(loader, options, found)
        try:
            hooks = _pin(program, options, root)
        except BaseException:
            program.close()
            _remove_pins(root)
            raise
        program.close()  # drop this process's fds: the pins own everything now
        seconds = time.monotonic() - started
        if "inode_setintegrity" in hooks:
            _forget_unused_inodes()
            from . import verity_seed

            verity_seed.seed(root)
    obj = bpf_file(OBJECT)
    digest = hashlib.sha256(obj.read_bytes()).hexdigest() if loader == "core" else None
    state = LoadedState(loader, hooks, found, digest, time.time())
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state.to_json(), indent=1) + "\n")
    return LoadResult(loader, hooks, found, seconds)


def unload(root: Path = PIN_ROOT, timeout: float = 10.0, state_file: Path = LOADED_STATE) -> float:
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
        state_file.unlink(missing_ok=True)
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
        print(f"loaded with {r.loader} in {r.seconds:.1f}s; hooks: {' '.join(r.hooks)}", flush=True)
        if "--hold" in sys.argv:
            print("READY", flush=True)
            while True:
                time.sleep(3600)
    else:
        print(f"unloaded after {unload():.3f}s")
