"""The pinned maps of a loaded ipe-bpf, from any process: the API the lifecycle uses.

    from ipe_bpf.kernel.maps import PinnedPolicyMaps
    with PinnedPolicyMaps() as maps:          # KernelError ENOENT if not loaded
        maps.install(compiled, generation=7)  # atomic switch to a compiled policy
        maps.set_enforce(False)               # permissive: DENY audited, not enforced
        maps.set_success_audit(True)          # audit ALLOW decisions too
        maps.state()                          # KernelState: active slot, generation, ...
        maps.counters()                       # Counters: allow/deny per op, audited, dropped
        maps.drops()                          # ring-buffer records lost
        maps.devices()                        # dm-verity devices known to the kernel side
        maps.deactivate()                     # back to "no policy" (tests; IPE has no such op)

`install(compiled, generation)`: writes the compiled tables into the inactive slot
(digests, rules, then that slot's defaults carrying `generation`), flips the config's
`active` byte to that slot in one map write, waits for an RCU grace period
(membarrier(MEMBARRIER_CMD_GLOBAL), so no BPF program still uses the old slot), and
only then deletes the old slot's entries.  A half-written policy is never visible.
`generation` is an opaque number the caller chooses per deployed policy (the lifecycle's
store id); audit events carry it so rule texts can be found later.

All writers serialise on /run/ipe-bpf.lock.  Layouts come from bpf/ipe_bpf.h through
ipe_bpf.policy.layout: nothing here restates a struct.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

from ..errors import KernelError
from ..policy.compiler import CompiledPolicy, encode
from ..policy.layout import Header, load_header
from ..policy.model import Op
from . import bpfsys, syscalls
from .pins import PIN_ROOT, control_lock, map_path

_MEMBARRIER_CMD_GLOBAL = 1


def _grace_period() -> None:
    """Wait until every BPF program that may have seen the old slot has finished."""
    ret = bpfsys.libc().syscall(syscalls.number("membarrier"), _MEMBARRIER_CMD_GLOBAL, 0, 0)
    if ret != 0 or os.cpu_count() == 1:
        time.sleep(0.05)  # membarrier unavailable (nohz_full) or a single CPU: be generous


@dataclass(frozen=True)
class KernelState:
    loaded: bool
    active_slot: int | None  # None: no policy active
    generation: int | None  # of the active policy
    enforcing: bool
    success_audit: bool
    flips: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Counters:
    allow: dict[str, int]
    deny: dict[str, int]
    audited: int
    dropped: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class DeviceState:
    dev: int  # kernel dev_t: major << 20 | minor
    has_roothash: bool
    alg: str
    roothash: str  # hex
    signature_valid: bool
    seeded: bool

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


@dataclass
class _Map:
    fd: int
    key_size: int
    value_size: int


@dataclass
class PinnedPolicyMaps:
    """Open file descriptors to the pinned maps; use as a context manager."""

    root: Path = PIN_ROOT
    header: Header = field(default_factory=load_header)
    _maps: dict[str, _Map] = field(default_factory=dict, init=False)

    def __enter__(self) -> "PinnedPolicyMaps":
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for m in self._maps.values():
            os.close(m.fd)
        self._maps.clear()

    def _map(self, name: str) -> _Map:
        m = self._maps.get(name)
        if m is None:
            path = map_path(name, self.root)
            if not path.exists():
                raise KernelError("ENOENT", "ipe-bpf is not loaded (run `ipe-bpf load`)")
            fd = bpfsys.obj_get(str(path))
            info = bpfsys.map_info(fd)
            m = self._maps[name] = _Map(fd, info.key_size, info.value_size)
        return m

    # ------------------------------------------------------------ config

    def _config(self) -> dict[str, object]:
        layout = self.header.struct("ipe_config")
        raw = bpfsys.lookup(self._map("ipe_config").fd, struct.pack("=I", 0), layout.size)
        assert raw is not None, "array maps always have index 0"
        return layout.unpack(raw)

    def _write_config(self, **changes: object) -> None:
        layout = self.header.struct("ipe_config")
        values = self._config()
        values.update(changes)
        bpfsys.update(self._map("ipe_config").fd, struct.pack("=I", 0), layout.pack(**values))  # type: ignore[arg-type]

    def set_enforce(self, on: bool) -> None:
        with control_lock():
            self._write_config(permissive=0 if on else 1)

    def set_success_audit(self, on: bool) -> None:
        with control_lock():
            self._write_config(success_audit=1 if on else 0)

    def deactivate(self) -> None:
        """Back to "no policy": everything allowed, nothing audited (used by tests)."""
        with control_lock():
            cfg = self._config()
            old = int(cfg["active"])  # type: ignore[arg-type]
            if old == 0:
                return
            self._write_config(active=0, flips=int(cfg["flips"]) + 1)  # type: ignore[arg-type]
            _grace_period()
            self._delete_slot(old - 1)

    def state(self) -> KernelState:
        cfg = self._config()
        active = int(cfg["active"])  # type: ignore[arg-type]
        slot = active - 1 if active else None
        generation = None
        if slot is not None:
            generation = int(self._defaults(slot)["generation"])  # type: ignore[arg-type]
        return KernelState(
            loaded=True,
            active_slot=slot,
            generation=generation,
            enforcing=not cfg["permissive"],
            success_audit=bool(cfg["success_audit"]),
            flips=int(cfg["flips"]),  # type: ignore[arg-type]
        )

    def _defaults(self, slot: int) -> dict[str, object]:
        layout = self.header.struct("ipe_policy_defaults")
        raw = bpfsys.lookup(self._map("ipe_defaults").fd, struct.pack("=I", slot), layout.size)
        assert raw is not None
        return layout.unpack(raw)

    # ------------------------------------------------------------ policy switch

    def _delete_slot(self, slot: int) -> int:
        """Delete every digests/rules entry of `slot` (byte 0 of both key structs)."""
        deleted = 0
        for name in ("ipe_rules", "ipe_digests"):
            m = self._map(name)
            doomed = [k for k in bpfsys.dump_keys(m.fd, m.key_size, m.value_size) if k[0] == slot]
            bpfsys.delete_many(m.fd, doomed)
            deleted += len(doomed)
        return deleted

    def install(self, compiled: CompiledPolicy, generation: int) -> None:
        """Make `compiled` the active policy, atomically (see the module doc)."""
        with control_lock():
            cfg = self._config()
            active = int(cfg["active"])  # type: ignore[arg-type]
            new_slot = 1 if active == 1 else 0
            self._delete_slot(new_slot)  # leftovers of an interrupted install
            enc = encode(compiled, new_slot, generation=generation)
            for name, entries in (("ipe_digests", enc.digests), ("ipe_rules", enc.rules)):
                m = self._map(name)
                bpfsys.update_many(m.fd, entries, m.key_size, m.value_size)
            for k, v in enc.defaults:
                bpfsys.update(self._map("ipe_defaults").fd, k, v)
            self._write_config(active=new_slot + 1, flips=int(cfg["flips"]) + 1)  # type: ignore[arg-type]
            if active:
                _grace_period()
                self._delete_slot(active - 1)

    # ------------------------------------------------------------ counters

    def counters(self) -> Counters:
        layout = self.header.struct("ipe_counters")
        ncpu = bpfsys.possible_cpus()
        stride = (layout.size + 7) // 8 * 8
        raw = bpfsys.lookup(self._map("ipe_counters").fd, struct.pack("=I", 0), stride * ncpu)
        assert raw is not None
        allow = [0] * len(Op)
        deny = [0] * len(Op)
        audited = dropped = 0
        for cpu in range(ncpu):
            c = layout.unpack(raw[cpu * stride : cpu * stride + layout.size])
            for i in range(len(Op)):
                allow[i] += c["allow"][i]  # type: ignore[index]
                deny[i] += c["deny"][i]  # type: ignore[index]
            audited += int(c["audited"])  # type: ignore[arg-type]
            dropped += int(c["dropped"])  # type: ignore[arg-type]
        return Counters(
            allow={op.name: allow[op] for op in Op},
            deny={op.name: deny[op] for op in Op},
            audited=audited,
            dropped=dropped,
        )

    def drops(self) -> int:
        return self.counters().dropped

    # ------------------------------------------------------------ dm-verity devices

    def devices(self) -> list[DeviceState]:
        layout = self.header.struct("ipe_bdev_state")
        m = self._map("ipe_devices")
        out = []
        for k in bpfsys.keys(m.fd, m.key_size):
            raw = bpfsys.lookup(m.fd, k, m.value_size)
            if raw is None:
                continue
            s = layout.unpack(raw)
            alg_len, dlen = int(s["alg_len"]), int(s["digest_len"])  # type: ignore[arg-type]
            out.append(
                DeviceState(
                    dev=struct.unpack("=I", k)[0],
                    has_roothash=bool(s["has_roothash"]),
                    alg=bytes(s["alg"])[:alg_len].decode("ascii", "replace"),  # type: ignore[arg-type]
                    roothash=bytes(s["digest"])[: min(dlen, self.header.constant("IPE_DIGEST_MAX"))].hex(),  # type: ignore[arg-type]
                    signature_valid=bool(s["sig_valid"]),
                    seeded=bool(s["seeded"]),
                )
            )
        return sorted(out, key=lambda d: d.dev)

    def seed_device(self, dev: int, alg: bytes, roothash: bytes, signature_valid: bool = False) -> None:
        """Record a dm-verity device that was set up before load (marked seeded)."""
        layout = self.header.struct("ipe_bdev_state")
        alg_max = self.header.constant("IPE_ALG_MAX")
        digest_max = self.header.constant("IPE_DIGEST_MAX")
        value = layout.pack(
            has_roothash=1,
            sig_valid=1 if signature_valid else 0,
            seeded=1,
            alg_len=min(len(alg), 255),
            digest_len=len(roothash) if len(roothash) <= digest_max else 255,
            alg=alg[:alg_max],
            digest=roothash[:digest_max],
        )
        m = self._map("ipe_devices")
        # BPF_NOEXIST: never overwrite what the kernel itself captured.
        try:
            bpfsys.update(m.fd, struct.pack("=I", dev), value, flags=1)
        except KernelError as exc:
            if exc.errno_name != "EEXIST":
                raise


def kernel_dev(major: int, minor: int) -> int:
    """The kernel's dev_t (what bdev->bd_dev holds), not userspace's st_dev encoding."""
    return (major << 20) | minor
