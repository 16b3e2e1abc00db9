"""What `ipe-bpf load`, `unload` and `status` do, as one library call each.

`load_and_apply`: load and pin the program, then install the store's active policy and
settings (enforcing or permissive, success audit: every stored setting, unless the caller
gives the mode); if that fails the program is unloaded again, so a failed load leaves nothing
loaded.  A load and an unload each write a 1404 record (``enabled=1 old-enabled=0``, and the
reverse) with a serial of the per-boot sequence, handed to the audit daemon like the policy
records (audit/control_log.py).

`status`: the kernel side (if loaded) and the store, with what is damaged named: a damaged
`state.json` or a stored copy of the active policy that no longer matches its digest is a
problem to report (the kernel keeps enforcing what it was given), never "no policy".
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from ..audit.control_log import ControlLog
from ..audit.policy_records import (AUDIT_MAC_STATUS, AUDIT_TRUSTED_APP, AuditIdentity, Record, lsm_switched,
                                    records_lost)
from ..audit.record import event_size
from ..errors import IpeBpfError, KernelError
from . import features, loader, pins
from .features import KernelFeatures, PropertySupport
from .lifecycle import Lifecycle, Listing, PolicyInfo
from . import maps
from .maps import Counters, DeviceState, KernelState
from .memory import MapMemory
from .ringbuf import RingBuffer
from .store import PolicyStore


@dataclass(frozen=True)
class LoadReport:
    loaded: loader.LoadResult
    active: PolicyInfo | None  # the stored active policy, now installed (None: no policy)
    enforcing: bool
    records: tuple[str, ...] = ()  # the load's 1404 line
    warnings: tuple[str, ...] = ()  # records that could not be written


@dataclass(frozen=True)
class UnloadReport:
    seconds: float  # waited for the kernel to detach
    records: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


class ApplyError(KernelError):
    """The program loaded, but the stored policy or settings could not be installed (so it was
    unloaded again)."""


def load_and_apply(options: loader.LoadOptions, store: PolicyStore | None = None, *,
                   enforce: bool | None = None, control: ControlLog | None = None) -> LoadReport:
    """Load, then apply the stored policy and settings; ``enforce`` None: the stored mode (as
    `ipe-bpf enforce on|off` left it), else the mode to load in, which becomes the stored one."""
    store = PolicyStore.default() if store is None else store
    life = Lifecycle(store, control=control)
    mode = life.state().enforce if enforce is None else enforce
    result = loader.load(replace(options, permissive=not mode))
    try:
        with maps.PinnedPolicyMaps() as target:
            active = life.apply_active(target, enforce=mode)
    except (IpeBpfError, OSError) as err:
        try:
            loader.unload()
        except IpeBpfError:
            pass  # the first error is the one to report
        errno_name = err.errno_name if isinstance(err, IpeBpfError) else errno.errorcode.get(err.errno or 0, "EIO")
        raise ApplyError(errno_name, f"the stored active policy could not be applied (unloaded again): "
                                     f"{err if isinstance(err, IpeBpfError) else f'{errno_name}: {err.strerror}'}"
                         ) from None
    lines, warnings = _record(life.control, True, mode)
    return LoadReport(result, active, mode, lines, warnings)


def unload_and_record(store: PolicyStore | None = None, *, root: Path = pins.PIN_ROOT,
                      control: ControlLog | None = None, count_unread: bool = False) -> UnloadReport:
    """Unload (loader.unload) and write the 1404 record of it, in the mode that was in force.

    ``count_unread`` (no audit daemon runs to drain the ring buffer to its end): the records
    still unread in the ring buffer go with it, and a 1121 ``lost=N reason=unloaded_unread``
    says so.
    """
    mode, unread = True, 0
    if pins.is_loaded(root):
        try:
            with maps.PinnedPolicyMaps(root) as target:
                mode = target.state().enforcing
            unread = _unread_records(root) if count_unread else 0
        except (IpeBpfError, OSError):
            pass  # a half-loaded program: unload it all the same
    seconds = loader.unload(root)
    store = PolicyStore.default() if store is None else store
    control = ControlLog.default(store.audit_log_path) if control is None else control
    extra = [Record(AUDIT_TRUSTED_APP, records_lost(unread, "unloaded_unread"))] if unread else []
    lines, warnings = _record(control, False, mode, extra)
    return UnloadReport(seconds, lines, warnings)


def _unread_records(root: Path) -> int:
    with RingBuffer(root) as ring:
        return ring.pending_bytes() // ((event_size() + 8 + 7) & ~7)  # every record has one size


def _record(control: ControlLog, enabled: bool, enforcing: bool,
            extra: list[Record] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The load/unload 1404 to every sink; warnings instead of errors (it has happened)."""
    record = Record(AUDIT_MAC_STATUS, lsm_switched(enabled, enforcing, AuditIdentity.from_proc()))
    try:
        return control.emit([*(extra or ()), record], time.time_ns())
    except IpeBpfError as err:
        return (), (f"the {'load' if enabled else 'unload'} record was not written: {err}",)


class KernelView(Protocol):
    """What `status` reads from the loaded program (PinnedPolicyMaps, or a fake in tests)."""

    def __enter__(self) -> "KernelView": ...
    def __exit__(self, *exc: object) -> None: ...
    def state(self) -> KernelState: ...
    def counters(self) -> Counters: ...
    def devices(self) -> list[DeviceState]: ...
    def memory(self) -> tuple[MapMemory, ...]: ...


@dataclass(frozen=True)
class Status:
    loaded: bool
    kernel: KernelState | None
    hooks: tuple[str, ...]
    counters: Counters | None
    devices: tuple[DeviceState, ...]
    listing: Listing | None  # None: the store could not be read
    store_problem: str | None  # what is damaged in the store, if anything
    memory: tuple[MapMemory, ...] = ()  # the pinned maps' kernel memory (loaded only)
    always_false: tuple[PropertySupport, ...] = ()  # properties this kernel cannot evaluate: FALSE

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
            data["map_memory"] = {"total": sum(m.memlock for m in self.memory),
                                  "maps": {m.name: m.as_dict() for m in self.memory}}
        data["active_policy"] = self.active.to_json() if self.active is not None else None
        data["policies"] = [p.to_json() for p in self.listing.policies] if self.listing is not None else []
        data["always_false"] = {p.property: p.how for p in self.always_false}
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


def _always_false(found: KernelFeatures | None) -> tuple[PropertySupport, ...]:
    return () if found is None else tuple(p for p in found.properties().values() if not p.supported)


def status(store: PolicyStore | None = None, *, root: Path = pins.PIN_ROOT,
           open_kernel: Callable[[Path], KernelView] | None = None,
           kernel_features: Callable[[], KernelFeatures | None] | None = None) -> Status:
    """The kernel side (if loaded; read through `open_kernel`, the pinned maps by default),
    what this kernel cannot evaluate (`kernel_features`: features.running_kernel by default)
    and the store, as one value."""
    store = PolicyStore.default() if store is None else store
    open_kernel = maps.PinnedPolicyMaps if open_kernel is None else open_kernel
    loaded = pins.is_loaded(root)
    kernel = counters = None
    devices: tuple[DeviceState, ...] = ()
    hooks: tuple[str, ...] = ()
    memory: tuple[MapMemory, ...] = ()
    if loaded:
        with open_kernel(root) as view:
            kernel, counters, devices = view.state(), view.counters(), tuple(view.devices())
            memory = view.memory()
        hooks = tuple(p.name for p in pins.link_paths(root))
    listing, problem = _store_view(store)
    found = (kernel_features or features.running_kernel)()
    return Status(loaded, kernel, hooks, counters, devices, listing, problem, memory, _always_false(found))
