"""The reference evaluator: IPE's decision semantics (docs/policy-language.md, section 4), in plain Python.

This is the definition the compiled kernel tables are proven against.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from .layout import abi_constant
from .model import (
    Action,
    BoolKey,
    BoolProperty,
    DigestKey,
    FileAttributes,
    Op,
    Policy,
    Property,
    Rule,
    default_text,
)


class Source(enum.Enum):
    """What made a decision; `number` is bpf/ipe_bpf.h's IPE_SOURCE_<NAME>."""

    RULE = "rule"
    OP_DEFAULT = "op_default"
    GLOBAL_DEFAULT = "global_default"
    NONE = "none"  # UNKNOWN op and no global default: allow

    @property
    def number(self) -> int:
        return abi_constant(f"IPE_SOURCE_{self.name}")

    @classmethod
    def of_number(cls, number: int) -> "Source | None":
        return next((source for source in cls if source.number == number), None)


@dataclass(frozen=True)
class Decision:
    action: Action
    source: Source
    rule: Rule | None = None
    op: Op = Op.EXECUTE

    @property
    def rule_text(self) -> str:
        """The `rule="..."` text of an IPE 1420 audit record."""
        if self.rule is not None:
            return str(self.rule)
        return default_text(self.op if self.source is Source.OP_DEFAULT else None, self.action)


def _bool_attribute(key: BoolKey, attrs: FileAttributes) -> bool:
    if key is BoolKey.BOOT_VERIFIED:
        return attrs.boot_verified
    if key is BoolKey.DMVERITY_SIGNATURE:
        return attrs.dmverity_signature
    return attrs.fsverity_signature


def property_holds(prop: Property, attrs: FileAttributes) -> bool:
    """Whether one property is true of the file (docs/policy-language.md, section 3)."""
    attrs = attrs.normalised()
    if isinstance(prop, BoolProperty):
        return _bool_attribute(prop.key, attrs) == prop.value
    found = attrs.dmverity_roothash if prop.key is DigestKey.DMVERITY_ROOTHASH else attrs.fsverity_digest
    return found is not None and found == prop.digest


def evaluate_undecided(policy: Policy, op: Op, attrs: FileAttributes,
                       unknown: frozenset[BoolKey] = frozenset()) -> Decision:
    """Decide as the program does when it has no record of some signature states of this one
    file (``unknown``: its kernel keeps them, but the file or device was set up before the
    program was loaded): the decision with them FALSE stands, unless making one or both TRUE
    turns it into a DENY, which then wins (fail-closed; tried in the order dmverity_signature,
    fsverity_signature, both, like bpf/ipe_bpf.bpf.c's ipe_decide_all).  A state the kernel keeps
    none of is FALSE, not unknown: kernel.features.KernelFeatures.as_evaluated."""
    unknown = unknown & {BoolKey.DMVERITY_SIGNATURE, BoolKey.FSVERITY_SIGNATURE}
    unset = {key.value: False for key in unknown}
    base = evaluate(policy, op, replace(attrs, **unset))
    if base.action is Action.DENY:
        return base
    for extra in ((BoolKey.DMVERITY_SIGNATURE,), (BoolKey.FSVERITY_SIGNATURE,),
                  (BoolKey.DMVERITY_SIGNATURE, BoolKey.FSVERITY_SIGNATURE)):
        if not set(extra) <= unknown:
            continue
        alt = evaluate(policy, op, replace(attrs, **{**unset, **{key.value: True for key in extra}}))
        if alt.action is Action.DENY:
            return alt
    return base


def first_failing_property(rule: Rule, attrs: FileAttributes) -> Property | None:
    """The first property of `rule` that is false of the file, or None if it matches."""
    for prop in rule.properties:
        if not property_holds(prop, attrs):
            return prop
    return None


def evaluate(policy: Policy, op: Op, attrs: FileAttributes) -> Decision:
    """Decide an event: first matching rule of the op, else the op default, else the global one."""
    if op is Op.UNKNOWN:
        if policy.global_default is None:
            return Decision(Action.ALLOW, Source.NONE, op=op)
        return Decision(policy.global_default, Source.GLOBAL_DEFAULT, op=op)
    for rule in policy.rules_for(op):
        if first_failing_property(rule, attrs) is None:
            return Decision(rule.action, Source.RULE, rule, op=op)
    op_default = policy.op_default(op)
    if op_default is not None:
        return Decision(op_default, Source.OP_DEFAULT, op=op)
    assert policy.global_default is not None, "the parser guarantees a default"
    return Decision(policy.global_default, Source.GLOBAL_DEFAULT, op=op)
