"""The policy model: what a parsed IPE policy says, as frozen values.

Names and digest algorithm names are kept as the exact bytes of the policy text
(IPE compares them byte-exactly and accepts any byte >= 0x80); `text()` renders
them for humans.

`str()` of a rule, a property or a digest is the ONE rendering of rule text: the kernel's
audit spelling (docs/audit-records.md), which `policy explain`, the audit records and the
compiled rule texts all show.  The policy-language spelling is `parser.format_policy`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from .layout import abi_constant


class Op(enum.IntEnum):
    """Operations a rule can govern; the value is the op number of bpf/ipe_bpf.h (IPE_OP_*)."""

    EXECUTE = abi_constant("IPE_OP_EXECUTE")
    FIRMWARE = abi_constant("IPE_OP_FIRMWARE")
    KMODULE = abi_constant("IPE_OP_KMODULE")
    KEXEC_IMAGE = abi_constant("IPE_OP_KEXEC_IMAGE")
    KEXEC_INITRAMFS = abi_constant("IPE_OP_KEXEC_INITRAMFS")
    POLICY = abi_constant("IPE_OP_POLICY")
    X509_CERT = abi_constant("IPE_OP_X509_CERT")
    UNKNOWN = abi_constant("IPE_OP_UNKNOWN")  # an unmapped kernel read/load id; never in a policy


POLICY_OPS: tuple[Op, ...] = tuple(op for op in Op if op is not Op.UNKNOWN)


class Action(enum.IntEnum):
    """A decision; the value is bpf/ipe_bpf.h's IPE_ACTION_*."""

    ALLOW = abi_constant("IPE_ACTION_ALLOW")
    DENY = abi_constant("IPE_ACTION_DENY")


class BoolKey(str, enum.Enum):
    """Boolean properties, written `key=TRUE` or `key=FALSE` (a str: hashed in C, the compiler's sets are big)."""

    BOOT_VERIFIED = "boot_verified"
    DMVERITY_SIGNATURE = "dmverity_signature"
    FSVERITY_SIGNATURE = "fsverity_signature"


class DigestKey(str, enum.Enum):
    """Digest properties, written `key=<alg>:<hex>` (a str, like BoolKey)."""

    DMVERITY_ROOTHASH = "dmverity_roothash"
    FSVERITY_DIGEST = "fsverity_digest"


def text(raw: bytes) -> str:
    """Render policy bytes (a name, an algorithm) for display."""
    return raw.decode("utf-8", "backslashreplace")


def untrusted(value: bytes) -> str:
    """The kernel's audit_log_untrustedstring(): quoted, or uppercase hex if it needs escaping."""
    if any(b == 0x22 or b < 0x21 or b > 0x7E for b in value):
        return value.hex().upper()
    return '"' + value.decode("ascii") + '"'


@dataclass(frozen=True)
class Digest:
    """An algorithm name (verbatim bytes) and the digest bytes."""

    alg: bytes
    value: bytes

    def __str__(self) -> str:
        """As the kernel's audit prints it: `"<alg>":<HEX>` (the name untrusted-encoded)."""
        return f"{untrusted(self.alg)}:{self.value.hex().upper()}"


@dataclass(frozen=True)
class BoolProperty:
    key: BoolKey
    value: bool

    def __str__(self) -> str:
        return f"{self.key.value}={'TRUE' if self.value else 'FALSE'}"


@dataclass(frozen=True)
class DigestProperty:
    key: DigestKey
    digest: Digest

    def __str__(self) -> str:
        return f"{self.key.value}={self.digest}"


Property = BoolProperty | DigestProperty


@dataclass(frozen=True)
class Rule:
    """`op=<OP> <props...> action=<ACT>`; `line` is where it stood (not compared)."""

    op: Op
    properties: tuple[Property, ...]
    action: Action
    line: int = field(default=0, compare=False)

    def __str__(self) -> str:
        """The rule as kernel IPE's audit reprints it (the `rule="..."` of a 1420 record)."""
        parts = [f"op={self.op.name}", *map(str, self.properties), f"action={self.action.name}"]
        return " ".join(parts)


class DigestRow(tuple):
    """A one-digest rule as the parser found it, before it becomes a Rule: the compiler
    reads it as is (100k-rule allowlists make no objects they do not need)."""

    __slots__ = ()  # made as DigestRow((op, key, alg, value, action, line)): no Python-level __new__

    def rule(self) -> Rule:
        op, key, alg, value, action, line = self
        return Rule(op, (DigestProperty(key, Digest(alg, value)),), action, line)


class RuleList(Sequence[Rule]):
    """A policy's rules in file order, each a Rule or a DigestRow that becomes one when read.

    Equal to (and hashed like) the tuple of its Rules, so a Policy compares the same however
    it was made.  `rows()` gives the items as they are, for the compiler's fast path.
    """

    __slots__ = ("_items", "_pending")

    def __init__(self, items: list[Rule | DigestRow]) -> None:
        self._items = items
        self._pending = any(type(item) is DigestRow for item in items)

    def rows(self) -> Sequence[Rule | DigestRow]:
        return self._items

    def _all(self) -> list[Rule | DigestRow]:
        if self._pending:
            self._items = [item.rule() if type(item) is DigestRow else item for item in self._items]
            self._pending = False
        return self._items

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Rule: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Rule, ...]: ...
    def __getitem__(self, index: int | slice) -> Rule | tuple[Rule, ...]:
        if isinstance(index, slice):
            return tuple(self._all()[index])  # type: ignore[arg-type]
        item = self._items[index]
        return item.rule() if type(item) is DigestRow else item  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Rule]:
        return iter(self._all())  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (RuleList, tuple)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"RuleList({tuple(self)!r})"


def property_keys(rules: Sequence[Rule]) -> frozenset[str]:
    """The property keys (`fsverity_digest`, ...) the rules use."""
    items = rules.rows() if isinstance(rules, RuleList) else rules
    keys: set[BoolKey | DigestKey] = {item[1] for item in items if type(item) is DigestRow}
    keys.update(prop.key for item in items if type(item) is not DigestRow for prop in item.properties)
    return frozenset(key.value for key in keys)


def default_text(op: Op | None, action: Action) -> str:
    """The `rule="..."` text of a decision by a default: per-op (`op` given) or global."""
    if op is None:
        return f"DEFAULT action={action.name}"
    return f"DEFAULT op={op.name} action={action.name}"


@dataclass(frozen=True)
class Policy:
    """A whole policy: header, defaults and every rule in file order."""

    name: bytes
    version: tuple[int, int, int]
    global_default: Action | None
    op_defaults: tuple[tuple[Op, Action], ...]  # sorted by op
    rules: Sequence[Rule]  # a tuple, or the parser's RuleList

    @property
    def version_text(self) -> str:
        return "%d.%d.%d" % self.version

    @property
    def version_key(self) -> int:
        """The kernel's ordering key: (major << 32) | (minor << 16) | patch."""
        a, b, c = self.version
        return (a << 32) | (b << 16) | c

    def op_default(self, op: Op) -> Action | None:
        return dict(self.op_defaults).get(op)

    def rules_for(self, op: Op) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.op is op)


@dataclass(frozen=True)
class FileAttributes:
    """What the kernel knows about the file behind an event.

    `has_file=False` is an event with no file (anonymous memory, kernel_load_data):
    every positive property is then false, whatever the other fields say.
    """

    has_file: bool = True
    boot_verified: bool = False
    dmverity_roothash: Digest | None = None
    dmverity_signature: bool = False
    fsverity_digest: Digest | None = None
    fsverity_signature: bool = False

    def normalised(self) -> "FileAttributes":
        return self if self.has_file else NO_FILE


NO_FILE = FileAttributes(has_file=False)


def policy_to_dict(policy: Policy) -> dict[str, object]:
    """A JSON-ready view of a policy (names as text, digests as alg:hex)."""
    return {
        "name": text(policy.name),
        "version": policy.version_text,
        "global_default": policy.global_default.name if policy.global_default is not None else None,
        "op_defaults": {op.name: action.name for op, action in policy.op_defaults},
        "rules_per_op": {op.name: len(policy.rules_for(op)) for op in POLICY_OPS},
        "rules": [
            {"line": rule.line, "op": rule.op.name, "action": rule.action.name,
             "properties": [str(p) for p in rule.properties], "text": str(rule)}
            for rule in policy.rules
        ],
    }
