"""Decode one ring-buffer record (struct ipe_event of bpf/ipe_bpf.h) into an AccessRecord."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from ..policy.evaluate import Source
from ..policy.layout import StructView, abi_constant, default_header
from ..policy.model import Action, Op, Rule, default_text



class Hook(enum.IntEnum):
    """The LSM hook of a decision (`ipe_hook=`); the value is bpf/ipe_bpf.h's IPE_HOOK_*."""

    BPRM_CHECK = abi_constant("IPE_HOOK_BPRM_CHECK")
    MMAP = abi_constant("IPE_HOOK_MMAP")
    MPROTECT = abi_constant("IPE_HOOK_MPROTECT")
    KERNEL_READ = abi_constant("IPE_HOOK_KERNEL_READ")
    KERNEL_LOAD = abi_constant("IPE_HOOK_KERNEL_LOAD")


class PathKind(enum.IntEnum):
    """What the record's path holds; the value is bpf/ipe_bpf.h's IPE_PATH_*."""

    NONE = abi_constant("IPE_PATH_NONE")  # no file: path=? dev=? ino=?
    FULL = abi_constant("IPE_PATH_FULL")  # the file's d_path()
    NAME = abi_constant("IPE_PATH_NAME")  # only the file's name

RuleLookup = Callable[[int, int], "Rule | str | None"]
"""(generation, rule index) -> the rule (or its text), or None if unknown."""


@dataclass(frozen=True)
class AccessRecord:
    """One audited decision: the fields of IPE's 1420 AUDIT_IPE_ACCESS record and more."""

    timestamp: float  # wall clock seconds
    op: str
    hook: str
    enforcing: bool
    action: str
    source: str
    rule_index: int | None
    generation: int
    pid: int
    comm: bytes
    path: bytes | None  # None: no file
    path_is_name_only: bool
    dev: bytes | None
    ino: int | None
    rule: str  # the rule="..." text
    # the subject, as the kernel's accompanying SYSCALL (1300) record gives it
    uid: int | None = None
    auid: int | None = None  # 4294967295: unset
    ses: int | None = None  # 4294967295: unset
    exe: bytes | None = None  # None: a kernel thread


@dataclass(frozen=True)
class Event:
    """struct ipe_event of bpf/ipe_bpf.h, as the ring buffer carries it."""

    boot_ns: int
    generation: int
    ino: int
    pid: int
    rule_index: int
    uid: int
    auid: int
    ses: int
    op: int
    hook: int
    enforcing: int
    action: int
    source: int
    path_kind: int
    path_len: int
    exe_kind: int
    kind: int
    exe_len: int
    comm: bytes
    dev: bytes
    path: bytes
    exe: bytes


@lru_cache(maxsize=1)
def _events() -> StructView[Event]:
    return default_header().struct("ipe_event").view(Event)


def event_size() -> int:
    return _events().layout.size


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _boot_to_wall(boot_ns: int) -> float:
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - boot_ns / 1e9)


def rule_text(op: Op | None, action: Action, source: str, index: int | None, found: "Rule | str | None") -> str:
    """The `rule="..."` text of a decision: a default's, else the rule found for `index`."""
    if source == "op_default":
        return default_text(op, action)
    if source in ("global_default", "none"):
        return default_text(None, action)
    if found is not None:
        return str(found)
    return f"rule#{index}"


def decode(raw: bytes, rules: RuleLookup | None = None) -> AccessRecord:
    """Decode a decision record; `rules` gives rule texts (else `rule#N`).  ValueError for a
    seal record (decode_any takes both)."""
    e = _unpack(raw)
    if e.kind != abi_constant("IPE_KIND_DECISION"):
        raise ValueError(f"ring-buffer record of kind {e.kind}, not a decision")
    return _decision(e, rules)


def decode_any(raw: bytes, rules: RuleLookup | None = None) -> "AccessRecord | SealRecord":
    """A decision (AccessRecord) or a refused attempt against the seal (SealRecord)."""
    e = _unpack(raw)
    if e.kind == abi_constant("IPE_KIND_SEAL"):
        return _seal(e)
    return _decision(e, rules)


def _unpack(raw: bytes) -> Event:
    view = _events()
    return view.unpack(bytes(raw[: view.layout.size]))


def _decision(e: Event, rules: RuleLookup | None) -> AccessRecord:
    op_member = Op(e.op) if e.op in Op._value2member_map_ else None
    op = op_member.name if op_member is not None else f"OP{e.op}"
    hook = Hook(e.hook).name if e.hook in Hook._value2member_map_ else f"HOOK{e.hook}"
    action_member = Action(e.action)
    source = (Source.of_number(e.source) or Source.NONE).value
    index = e.rule_index if source == "rule" else None
    has_file = e.path_kind != PathKind.NONE
    found = rules(e.generation, index) if (rules is not None and index is not None) else None
    return AccessRecord(
        timestamp=_boot_to_wall(e.boot_ns),
        op=op,
        hook=hook,
        enforcing=bool(e.enforcing),
        action=action_member.name,
        source=source,
        rule_index=index,
        generation=e.generation,
        pid=e.pid,
        comm=_cstr(e.comm),
        path=e.path[: e.path_len] if has_file else None,
        path_is_name_only=e.path_kind == PathKind.NAME,
        dev=_cstr(e.dev) if has_file else None,
        ino=e.ino if has_file else None,
        rule=rule_text(op_member, action_member, source, index, found),
        uid=e.uid,
        auid=e.auid,
        ses=e.ses,
        exe=e.exe[: e.exe_len] if e.exe_kind != PathKind.NONE else None,
    )


class SealAttempt(enum.IntEnum):
    """What a refused attempt tried (bpf/ipe_bpf.h IPE_SEAL_*; docs/seal.md)."""

    MAP_WRITE = abi_constant("IPE_SEAL_MAP_WRITE")
    LINK_WRITE = abi_constant("IPE_SEAL_LINK_WRITE")
    PROG_LOAD = abi_constant("IPE_SEAL_PROG_LOAD")
    UNLINK = abi_constant("IPE_SEAL_UNLINK")
    UMOUNT = abi_constant("IPE_SEAL_UMOUNT")
    MOUNT = abi_constant("IPE_SEAL_MOUNT")


class Refusal(enum.IntEnum):
    """Why a program was refused (bpf/ipe_bpf.h IPE_REFUSE_*)."""

    LSM = abi_constant("IPE_REFUSE_LSM")
    FMOD_RET = abi_constant("IPE_REFUSE_FMOD_RET")
    OVERRIDE_RETURN = abi_constant("IPE_REFUSE_OVERRIDE")
    TARGETS_IPE_BPF = abi_constant("IPE_REFUSE_TARGET")
    MAP_ELEM_ITERATOR = abi_constant("IPE_REFUSE_MAP_ITER")
    USES_IPE_BPF_MAP = abi_constant("IPE_REFUSE_USES_MAP")


BPF_COMMANDS = {2: "BPF_MAP_UPDATE_ELEM", 3: "BPF_MAP_DELETE_ELEM", 21: "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
                22: "BPF_MAP_FREEZE", 25: "BPF_MAP_LOOKUP_AND_DELETE_BATCH", 26: "BPF_MAP_UPDATE_BATCH",
                27: "BPF_MAP_DELETE_BATCH", 29: "BPF_LINK_UPDATE", 34: "BPF_LINK_DETACH"}


@dataclass(frozen=True)
class SealRecord:
    """An attempt the seal refused with EPERM: what, on what, and who (docs/seal.md)."""

    timestamp: float  # wall clock seconds
    attempt: str  # SealAttempt name, lower case: map_write, link_write, prog_load, unlink, umount, mount
    detail: str  # the bpf() command, why a program was refused, or the mount flags
    object_id: int | None  # map, link or program id, or mount id
    target: bytes | None  # the map's, program's or file's name, or the mount point's
    pid: int
    comm: bytes
    uid: int
    auid: int
    ses: int
    exe: bytes | None


def _seal_detail(attempt: int, detail: int) -> str:
    if attempt in (SealAttempt.MAP_WRITE, SealAttempt.LINK_WRITE):
        return BPF_COMMANDS.get(detail, f"bpf_cmd_{detail}")
    if attempt == SealAttempt.PROG_LOAD:
        return Refusal(detail).name.lower() if detail in Refusal._value2member_map_ else f"reason_{detail}"
    if attempt in (SealAttempt.UMOUNT, SealAttempt.MOUNT):
        return f"flags=0x{detail:x}"
    return "-"


def _seal(e: Event) -> SealRecord:
    attempt = SealAttempt(e.op).name.lower() if e.op in SealAttempt._value2member_map_ else f"attempt_{e.op}"
    return SealRecord(
        timestamp=_boot_to_wall(e.boot_ns),
        attempt=attempt,
        detail=_seal_detail(e.op, e.rule_index),
        object_id=e.ino if e.op != SealAttempt.UNLINK else None,
        target=e.path[: e.path_len] if e.path_kind != PathKind.NONE else None,
        pid=e.pid,
        comm=_cstr(e.comm),
        uid=e.uid,
        auid=e.auid,
        ses=e.ses,
        exe=e.exe[: e.exe_len] if e.exe_kind != PathKind.NONE else None,
    )


def rules_from_policies(policies: dict[int, object]) -> RuleLookup:
    """A RuleLookup over {generation: Policy or CompiledPolicy}."""

    def find(generation: int, index: int) -> "Rule | str | None":
        p = policies.get(generation)
        if p is None:
            return None
        rules = getattr(p, "rules", None)
        if rules is None:
            rules = getattr(getattr(p, "policy", None), "rules", None)
        if rules is None or not isinstance(index, int) or not 0 <= index < len(rules):
            return None
        return rules[index]

    return find
