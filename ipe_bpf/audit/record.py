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
    """Decode a ring-buffer record; `rules` gives rule texts (else `rule#N`)."""
    view = _events()
    e = view.unpack(bytes(raw[: view.layout.size]))
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
