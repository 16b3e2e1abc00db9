"""What `ipe-bpf load` and `ipe-bpf status` do, as one library call each.

`load_and_apply`: load and pin the program, then install the store's active policy and
settings; if that fails the program is unloaded again, so a failed load leaves nothing loaded.

`status`: the kernel side (if loaded) and the store, with what is damaged named: a damaged
`state.json` or a stored copy of the active policy that no longer matches its digest is a
problem to report (the kernel keeps enforcing what it was given), never "no policy".
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import IpeBpfError, KernelError
from . import loader, pins
from .lifecycle import Lifecycle, Listing, PolicyInfo
from . import maps
from .maps import Counters, DeviceState, KernelState
from .store import PolicyStore


@dataclass(frozen=True)
class LoadReport:
    loaded: loader.LoadResult
    active: PolicyInfo | None  # the stored active policy, now installed (None: no policy)


class ApplyError(KernelError):
    """The program loaded, but the stored policy or settings could not be installed (so it was
    unloaded again)."""


def load_and_apply(options: loader.LoadOptions, store: PolicyStore | None = None) -> LoadReport:
    """Load, then apply the stored policy and settings (boot mode: `options.permissive`)."""
    store = PolicyStore.default() if store is None else store
    result = loader.load(options)
    try:
        with maps.PinnedPolicyMaps() as target:
            active = Lifecycle(store).apply_active(target, enforce=not options.permissive)
    except (IpeBpfError, OSError) as err:
        try:
            loader.unload()
        except IpeBpfError:
            pass  # the first error is the one to report
        errno_name = err.errno_name if isinstance(err, IpeBpfError) else errno.errorcode.get(err.errno or 0, "EIO")
        raise ApplyError(errno_name, f"the stored active policy could not be applied (unloaded again): "
                                     f"{err if isinstance(err, IpeBpfError) else f'{errno_name}: {err.strerror}'}"
                         ) from None
    return LoadReport(result, active)


class KernelView(Protocol):
    """What `status` reads from the loaded program (PinnedPolicyMaps, or a fake in tests)."""

    def __enter__(self) -> "KernelView": ...
    def __exit__(self, *exc: object) -> None: ...
    def state(self) -> KernelState: ...
    def counters(self) -> Counters: ...
    def devices(self) -> list[DeviceState]: ...


@dataclass(frozen=True)
class Status:
    loaded: bool
    kernel: KernelState | None
    hooks: tuple[str, ...]
    counters: Counters | None
    devices: tuple[DeviceState, ...]
    listing: Listing | None  # None: the store could not be read
    store_problem: str | None  # what is damaged in the store, if anything

    @property
    def active(self) -> PolicyInfo | None:
        return None if self.listing is None else self.listing.active

    @property
    def kernel_generation(self) -> int | None:
        return None if self.kernel is None else self.kernel.generation

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"loaded": self.loaded}
        if self.kernel is not None:
            data.update(self.kernel.as_dict())
            data["sealed"] = self.kernel.sealed
            data["hooks"] = list(self.hooks)
            data["counters"] = self.counters.as_dict() if self.counters is not None else None
            data["devices"] = [d.as_dict() for d in self.devices]
        data["active_policy"] = self.active.to_json() if self.active is not None else None
        data["policies"] = [p.to_json() for p in self.listing.policies] if self.listing is not None else []
        if self.store_problem is not None:
            data["store_error"] = self.store_problem
        return data


def _store_view(store: PolicyStore) -> tuple[Listing | None, str | None]:
    life = Lifecycle(store)
    try:
        listing = life.list()
    except (IpeBpfError, OSError) as err:
        return None, f"the policy store is damaged: {err}"
    active = life.state().active_policy()
    if active is not None:
        try:
            store.blob(active)
        except (IpeBpfError, OSError) as err:
            return listing, f"the stored copy of the active policy is damaged: {err}"
    return listing, None


def status(store: PolicyStore | None = None, *, root: Path = pins.PIN_ROOT,
           open_kernel: Callable[[Path], KernelView] | None = None) -> Status:
    """The kernel side (if loaded; read through `open_kernel`, the pinned maps by default)
    and the store, as one value."""
    store = PolicyStore.default() if store is None else store
    open_kernel = maps.PinnedPolicyMaps if open_kernel is None else open_kernel
    loaded = pins.is_loaded(root)
    kernel = counters = None
    devices: tuple[DeviceState, ...] = ()
    hooks: tuple[str, ...] = ()
    if loaded:
        with open_kernel(root) as view:
            kernel, counters, devices = view.state(), view.counters(), tuple(view.devices())
        hooks = tuple(p.name for p in pins.link_paths(root))
    listing, problem = _store_view(store)
    return Status(loaded, kernel, hooks, counters, devices, listing, problem)
