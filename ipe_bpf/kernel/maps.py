"""The pinned maps of a loaded ipe-bpf, from any process: the API the lifecycle uses.

    from ipe_bpf.kernel.maps import PinnedPolicyMaps
    with PinnedPolicyMaps() as maps:          # KernelError ENOENT if not loaded
        maps.install(compiled, generation=7)  # atomic switch to a compiled policy
        maps.set_enforce(False)               # permissive: DENY audited, not enforced
        maps.set_success_audit(True)          # audit ALLOW decisions too
        maps.state()                          # KernelState: active slot, generation, ...
        maps.counters()                       # Counters: allow/deny per op, audited, dropped
        maps.drops()                          # ring-buffer records lost
        maps.devices()                        # dm-verity devices the setintegrity hook captured
        maps.memory()                         # each pinned map's kernel memory (memory.py)
        maps.deactivate()                     # back to "no policy" (tests; IPE has no such op)
        maps.seal_entry()                     # the seal's state (kernel/seal.py seals)

`install(compiled, generation)`: makes the policy's digests and rules tables (hash maps
sized to the policy), fills them and puts them into the inactive slot of the ipe_digests
and ipe_rules arrays of maps (a policy whose rules all live with their digests has no rules
table), writes that slot's defaults carrying `generation`, flips the config's `active` byte to
that slot in one map write, waits for an RCU grace period (the kernel's wait after an update
of an array of maps, so no BPF program still uses the old slot), and only then empties the old
slot (the kernel frees its tables).  A half-written policy is never visible, and the tables
hold what the policy needs: no capacity to choose or to outgrow.  Each put or delete in an array
of maps costs a grace period (12 ms in the VM; 6.1 also waits after deleting nothing and after
lookups), so a switch between digest allowlists makes three (6.1: five) and no lookups.
`generation` is an opaque number the caller chooses per deployed policy (the lifecycle's
store id); audit events carry it so rule texts can be found later.

All writers serialise on /run/ipe-bpf.lock.  Layouts come from bpf/ipe_bpf.h through
ipe_bpf.policy.layout: nothing here restates a struct.
"""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ..errors import KernelError
from ..policy.layout import Header, default_header
from ..policy.model import Op
from . import bpfsys
from .pins import PIN_ROOT, control_lock, map_path

if TYPE_CHECKING:
    from ..policy.compiler import CompiledPolicy, Tables
    from .memory import MapMemory


# The per-slot tables: hash maps matching the templates in bpf/libbpf_compat.h.
TABLES = ("ipe_digests", "ipe_rules")
_BPF_MAP_TYPE_HASH = 1
_TABLE_FLAGS = 1 << 7  # BPF_F_RDONLY_PROG; preallocated, as the templates in bpf/libbpf_compat.h


@dataclass(frozen=True)
class KernelState:
    loaded: bool
    active_slot: int | None  # None: no policy active
    generation: int | None  # of the active policy
    enforcing: bool
    success_audit: bool
    flips: int
    sealed_at: float | None = None  # epoch seconds since which it is sealed; None: not sealed

    @property
    def sealed(self) -> bool:
        return self.sealed_at is not None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Counters:
    allow: dict[str, int]
    deny: dict[str, int]
    audited: int
    dropped: int
    undecidable: int  # denied because the answer hung on a signature state the kernel could not give
    seal_refused: int = 0  # attempts the seal refused (EPERM)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class DeviceState:
    dev: int  # kernel dev_t: major << 20 | minor
    has_roothash: bool
    alg: str
    roothash: str  # hex
    signature_valid: bool

    @property
    def major(self) -> int:
        return self.dev >> 20

    @property
    def minor(self) -> int:
        return self.dev & 0xFFFFF

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["device"] = f"{self.major}:{self.minor}"
        return d


@dataclass(frozen=True)
class Config:
    """struct ipe_config: the one-entry config map."""

    active: int  # IPE_ACTIVE_NONE, or 1 + the live slot
    permissive: int
    success_audit: int
    flips: int


@dataclass(frozen=True)
class SlotDefaults:
    """struct ipe_policy_defaults: one slot of the defaults map."""

    op_default: bytes
    global_default: int
    shapes: int
    bool_mask: int
    generation: int
    epoch: int


@dataclass(frozen=True)
class RawCounters:
    """struct ipe_counters: one CPU's slot of the per-CPU counters map."""

    allow: tuple[int, ...]
    deny: tuple[int, ...]
    audited: int
    dropped: int
    undecidable: int
    seal_refused: int


@dataclass(frozen=True)
class BdevState:
    """struct ipe_bdev_state: what the devices map knows of a dm-verity device."""

    has_roothash: int
    sig_valid: int
    alg_len: int
    digest_len: int
    alg: bytes
    digest: bytes


@dataclass(frozen=True)
class SealEntry:
    """struct ipe_seal: the seal's one entry (kernel/seal.py fills it)."""

    sealed: int
    bpffs_dev: int
    sealed_at: int  # CLOCK_REALTIME ns
    sealed_boot_ns: int
    nr_maps: int
    nr_progs: int
    nr_links: int
    nr_dirs: int
    nr_points: int
    map_id: tuple[int, ...]
    map_type: tuple[int, ...]
    map_key_size: tuple[int, ...]
    map_value_size: tuple[int, ...]
    map_flags: tuple[int, ...]
    prog_id: tuple[int, ...]
    link_id: tuple[int, ...]
    dir_dev: tuple[int, ...]
    dir_ino: tuple[int, ...]
    point_mnt: tuple[int, ...]
    point_ino: tuple[int, ...]


@dataclass
class _Map:
    fd: int
    key_size: int
    value_size: int


@dataclass
class PinnedPolicyMaps:
    """Open file descriptors to the pinned maps; use as a context manager."""

    root: Path = PIN_ROOT
    header: Header = field(default_factory=default_header)
    _maps: dict[tuple[str, bool], _Map] = field(default_factory=dict, init=False)

    def __enter__(self) -> "PinnedPolicyMaps":
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for m in self._maps.values():
            os.close(m.fd)
        self._maps.clear()

    def _map(self, name: str, write: bool = False) -> _Map:
        """An fd to a pinned map: read-only unless `write` (readers never hold write fds)."""
        m = self._maps.get((name, write))
        if m is None:
            path = map_path(name, self.root)
            if not path.exists():
                raise KernelError("ENOENT", "ipe-bpf is not loaded (run `ipe-bpf load`)")
            fd = bpfsys.obj_get(str(path), read_only=not write)
            info = bpfsys.map_info(fd)
            m = self._maps[(name, write)] = _Map(fd, info.key_size, info.value_size)
        return m

    def map_fd(self, name: str, write: bool = False) -> int:
        """The fd of a pinned map (owned by this object)."""
        return self._map(name, write).fd

    # ------------------------------------------------------------ config

    def _config(self) -> Config:
        view = self.header.struct("ipe_config").view(Config)
        raw = bpfsys.lookup(self._map("ipe_config").fd, struct.pack("=I", 0), view.layout.size)
        assert raw is not None, "array maps always have index 0"
        return view.unpack(raw)

    def _write_config(self, config: Config) -> None:
        view = self.header.struct("ipe_config").view(Config)
        bpfsys.update(self._map("ipe_config", write=True).fd, struct.pack("=I", 0), view.pack(config))

    def set_enforce(self, on: bool) -> None:
        with control_lock():
            self._write_config(replace(self._config(), permissive=0 if on else 1))

    def set_success_audit(self, on: bool) -> None:
        with control_lock():
            self._write_config(replace(self._config(), success_audit=1 if on else 0))

    def deactivate(self) -> None:
        """Back to "no policy": everything allowed, nothing audited (used by tests)."""
        with control_lock():
            cfg = self._config()
            if cfg.active == 0:
                return
            self._write_config(replace(cfg, active=0, flips=cfg.flips + 1))
            self._wait_for_programs(cfg.active - 1)
            self._delete_slot(cfg.active - 1)

    def state(self) -> KernelState:
        cfg = self._config()
        slot = cfg.active - 1 if cfg.active else None
        generation = None if slot is None else self._defaults(slot).generation
        seal = self.seal_entry()
        return KernelState(
            loaded=True,
            active_slot=slot,
            generation=generation,
            enforcing=not cfg.permissive,
            success_audit=bool(cfg.success_audit),
            flips=cfg.flips,
            sealed_at=seal.sealed_at / 1e9 if seal is not None and seal.sealed else None,
        )

    # ------------------------------------------------------------ seal (kernel/seal.py)

    def seal_entry(self) -> SealEntry | None:
        """The seal's entry; None if the loaded program has no seal map (an older load)."""
        if not map_path("ipe_seal", self.root).exists():
            return None
        view = self.header.struct("ipe_seal").view(SealEntry)
        raw = bpfsys.lookup(self._map("ipe_seal").fd, struct.pack("=I", 0), view.layout.size)
        assert raw is not None, "array maps always have index 0"
        return view.unpack(raw)

    def write_seal_entry(self, entry: SealEntry) -> None:
        view = self.header.struct("ipe_seal").view(SealEntry)
        bpfsys.update(self._map("ipe_seal", write=True).fd, struct.pack("=I", 0), view.pack(entry))

    def _defaults(self, slot: int) -> SlotDefaults:
        view = self.header.struct("ipe_policy_defaults").view(SlotDefaults)
        raw = bpfsys.lookup(self._map("ipe_defaults").fd, struct.pack("=I", slot), view.layout.size)
        assert raw is not None
        return view.unpack(raw)

    # ------------------------------------------------------------ policy switch

    def _table_sizes(self, name: str) -> tuple[int, int]:
        """Key and value size of the tables of `name` (ipe_digests or ipe_rules)."""
        if name == "ipe_digests":
            return self.header.struct("ipe_digest_key").size, self.header.struct("ipe_digest_value").size
        return self.header.struct("ipe_rule_key").size, self.header.struct("ipe_rule_value").size

    def table_ids(self) -> list[int]:
        """The map ids of the tables in every slot (the seal freezes them, status counts them)."""
        slots = self.header.constant("IPE_SLOTS")
        return [i for name in TABLES for i in bpfsys.inner_map_ids(self._map(name).fd, slots)]

    def _put_table(self, name: str, slot: int, keys: bytes, values: bytes) -> int:
        """A new table of `name` holding the packed `keys` -> `values`, into `slot` (replacing
        what was there); its fd, for the caller to close."""
        key_size, value_size = self._table_sizes(name)
        count = len(keys) // key_size
        fd = bpfsys.map_create(_BPF_MAP_TYPE_HASH, key_size, value_size, max(1, count), _TABLE_FLAGS, f"{name}{slot}")
        try:
            bpfsys.update_packed(fd, keys, values, key_size, value_size)
            bpfsys.update(self._map(name, write=True).fd, struct.pack("=I", slot), struct.pack("=I", fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _wait_for_programs(self, slot: int, table_fd: int | None = None) -> None:
        """Return once no BPF program can still be running with what it read before the config's
        last write.  The programs run under RCU, and the kernel waits for a grace period
        (synchronize_rcu) after every update of an array of maps (maybe_wait_bpf_programs): putting
        `slot`'s digests table (`table_fd`; every installed policy has one) into its place again
        is that wait, on every kernel line and CPU count (membarrier's global barrier is no wait
        on a single CPU, and refused with nohz_full)."""
        outer = self._map("ipe_digests", write=True).fd
        key = struct.pack("=I", slot)
        if table_fd is not None:
            bpfsys.update(outer, key, struct.pack("=I", table_fd))
            return
        raw = bpfsys.lookup(outer, key, 4)  # the inner map's id
        if raw is None:
            raise KernelError("ENOENT", f"slot {slot} has no digests table to wait on")
        fd = bpfsys.map_fd_by_id(struct.unpack("=I", raw)[0])
        try:
            bpfsys.update(outer, key, struct.pack("=I", fd))
        finally:
            os.close(fd)

    def _delete_slot(self, slot: int, names: tuple[str, ...] = TABLES) -> None:
        """Empty `slot` of the tables `names`: they go (the kernel frees them once no program
        holds them)."""
        for name in names:
            bpfsys.delete(self._map(name, write=True).fd, struct.pack("=I", slot))

    def install(self, policy: CompiledPolicy | Tables, generation: int) -> None:
        """Make `policy` (compiled, or its packed tables) the active policy, atomically (see the
        module doc)."""
        tables = policy.tables if hasattr(policy, "tables") else policy  # readers (`status`) import no compiler
        with control_lock():
            cfg = self._config()
            active = cfg.active
            new_slot = 1 if active == 1 else 0
            digests = self._fill_slot(new_slot, tables, generation, cfg)
            try:
                self._write_config(replace(cfg, active=new_slot + 1, flips=cfg.flips + 1))
                if active:
                    self._wait_for_programs(new_slot, digests)
                    self._delete_slot(active - 1)
            finally:
                os.close(digests)

    def _fill_slot(self, slot: int, tables: Tables, generation: int, cfg: Config) -> int:
        """Write `tables` into `slot`, which no program reads, tagged with the epoch the config's
        next write (flips + 1) brings; the fd of the slot's digests table, for the caller to close.
        Puts replace what an interrupted install left behind; with no rules table to put, the
        slot's rules entry is deleted instead.  No lookups: 6.1 waits for a grace period after
        every lookup in an array of maps too."""
        digest_keys, rule_keys = tables.slotted(slot)
        if not tables.rule_count:  # the slot stays empty, which the program reads as no rules
            self._delete_slot(slot, ("ipe_rules",))
        digests = self._put_table("ipe_digests", slot, digest_keys, tables.digest_values)
        try:
            if tables.rule_count:
                os.close(self._put_table("ipe_rules", slot, rule_keys, tables.rule_values))
            # the epoch tags the program's cached decisions: unique per install, never reused
            k, v = tables.defaults_entry(slot, generation=generation, epoch=cfg.flips + 1)
            bpfsys.update(self._map("ipe_defaults", write=True).fd, k, v)
        except BaseException:
            os.close(digests)
            raise
        return digests

    # ------------------------------------------------------------ counters

    def counters(self) -> Counters:
        view = self.header.struct("ipe_counters").view(RawCounters)
        size = view.layout.size
        ncpu = bpfsys.possible_cpus()
        stride = (size + 7) // 8 * 8
        raw = bpfsys.lookup(self._map("ipe_counters").fd, struct.pack("=I", 0), stride * ncpu)
        assert raw is not None
        per_cpu = [view.unpack(raw[cpu * stride : cpu * stride + size]) for cpu in range(ncpu)]
        return Counters(
            allow={op.name: sum(c.allow[op] for c in per_cpu) for op in Op},
            deny={op.name: sum(c.deny[op] for c in per_cpu) for op in Op},
            audited=sum(c.audited for c in per_cpu),
            dropped=sum(c.dropped for c in per_cpu),
            undecidable=sum(c.undecidable for c in per_cpu),
            seal_refused=sum(c.seal_refused for c in per_cpu),
        )

    def drops(self) -> int:
        return self.counters().dropped

    # ------------------------------------------------------------ dm-verity devices

    def memory(self) -> tuple[MapMemory, ...]:
        from .memory import pinned_memory

        return pinned_memory(self.root)

    def devices(self) -> list[DeviceState]:
        view = self.header.struct("ipe_bdev_state").view(BdevState)
        digest_max = self.header.constant("IPE_DIGEST_MAX")
        m = self._map("ipe_devices")
        out = []
        for k in bpfsys.keys(m.fd, m.key_size):
            raw = bpfsys.lookup(m.fd, k, m.value_size)
            if raw is None:
                continue
            s = view.unpack(raw)
            out.append(
                DeviceState(
                    dev=struct.unpack("=I", k)[0],
                    has_roothash=bool(s.has_roothash),
                    alg=s.alg[: s.alg_len].decode("ascii", "replace"),
                    roothash=s.digest[: min(s.digest_len, digest_max)].hex(),
                    signature_valid=bool(s.sig_valid),
                )
            )
        return sorted(out, key=lambda d: d.dev)


def kernel_dev(major: int, minor: int) -> int:
    """The kernel's dev_t (what bdev->bd_dev holds), not userspace's st_dev encoding."""
    return (major << 20) | minor
