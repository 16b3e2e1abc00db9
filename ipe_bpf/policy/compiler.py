"""The policy compiler: a Policy becomes the kernel's O(1) decision tables (docs/design.md, section 3).

Tables (structs in bpf/ipe_bpf.h; every entry carries the slot it belongs to):

* digests map   `ipe_digest_key -> __u32 id`: every digest a rule can match gets an id > 0.
* rules map     `ipe_rule_key -> ipe_rule_value`: for a rule *shape* (which of dm-verity
  root hash / fs-verity digest the rule tests), the file's ids for that shape and the file's
  boolean attributes (those the policy tests at all), the lowest index of a rule of that
  shape that matches.
* defaults map  (array, index = slot) `ipe_policy_defaults`: per-op and global defaults, the
  bitmask of shapes that occur and the boolean attributes some rule tests (`bool_mask`).

Each rule is normalised (boolean properties fold into required bit values; repeated digest
properties of one key must all be the same digest) and expanded over the values of the
booleans it leaves free among those the policy tests, so a rule makes at most 2**3 = 8 rule
entries (one when the policy tests no boolean, as a digest allowlist does) and at most 2
digest entries: the tables are O(number of rules), and a decision costs at most 2 digest
lookups, 4 rule lookups and 1 defaults lookup whatever the policy size.

`encode()` turns the tables into map entries for a slot; ipe_bpf.policy.lookup decides events
from them exactly as the BPF program does; ipe_bpf.policy.abi holds the header's constants.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from types import MappingProxyType
from typing import NamedTuple

from ..errors import IpeBpfError
from .abi import Abi
from .layout import Header, load_header
from .model import POLICY_OPS, Action, BoolProperty, Digest, DigestKey, DigestProperty, Op, Policy, Rule

__all__ = [
    "CompileError",
    "CompiledPolicy",
    "Defaults",
    "DigestEntry",
    "EncodedMaps",
    "KernelMaps",
    "NormalRule",
    "RuleKey",
    "RuleValue",
    "compile_policy",
    "encode",
    "normalise",
]

_U32_MAX = 0xFFFF_FFFF


class CompileError(IpeBpfError):
    """The policy cannot be turned into kernel tables."""


# ---------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class NormalRule:
    """A rule reduced to what it requires of the file.

    `mask` are the IPE_BOOL_* bits the rule constrains and `bools` their required values
    (bits outside `mask` are 0); `roothash` / `fsverity` the digest it requires, if any.
    """

    mask: int
    bools: int
    roothash: Digest | None
    fsverity: Digest | None

    def shape(self, abi: Abi) -> int:
        return (abi.shape_roothash if self.roothash is not None else 0) | (
            abi.shape_fsverity if self.fsverity is not None else 0
        )

    def file_bools(self, abi: Abi, relevant: int) -> tuple[int, ...]:
        """Every value of the file's `relevant` boolean bits this rule accepts (2**free of them)."""
        return _accepted_bools(abi.all_bools, relevant, self.mask, self.bools)


@lru_cache(maxsize=None)
def _accepted_bools(all_bools: int, relevant: int, mask: int, bools: int) -> tuple[int, ...]:
    return tuple(v for v in range(all_bools + 1) if v & ~relevant == 0 and v & mask == bools)


def normalise(rule: Rule, abi: Abi) -> NormalRule | None:
    """What `rule` requires of a file, or None if no file the kernel sees can match it."""
    if len(rule.properties) == 1 and isinstance(rule.properties[0], DigestProperty):
        prop = rule.properties[0]  # the digest allowlist's one-property rule, made fast
        if not abi.representable(prop.digest):
            return None
        if prop.key is DigestKey.FSVERITY_DIGEST:
            return NormalRule(0, 0, None, prop.digest)
        return NormalRule(0, 0, prop.digest, None)
    mask = bools = 0
    wanted: dict[DigestKey, set[Digest]] = {DigestKey.DMVERITY_ROOTHASH: set(), DigestKey.FSVERITY_DIGEST: set()}
    for prop in rule.properties:
        if isinstance(prop, BoolProperty):
            bit = abi.bool_bits[prop.key]
            value = bit if prop.value else 0
            if mask & bit and bools & bit != value:
                return None  # key=TRUE and key=FALSE
            mask, bools = mask | bit, bools | value
        else:
            wanted[prop.key].add(prop.digest)
    chosen: dict[DigestKey, Digest | None] = {}
    for key, digests in wanted.items():
        if len(digests) > 1:
            return None  # the file has one digest of each kind
        digest = next(iter(digests), None)
        if digest is not None and not abi.representable(digest):
            return None
        chosen[key] = digest
    return NormalRule(mask, bools, chosen[DigestKey.DMVERITY_ROOTHASH], chosen[DigestKey.FSVERITY_DIGEST])


# ---------------------------------------------------------------- compiled tables


class DigestEntry(NamedTuple):
    """A digests-map key without its slot."""

    kind: int  # IPE_DIGEST_*
    alg: bytes
    value: bytes


class RuleKey(NamedTuple):
    """A rules-map key without its slot."""

    op: int
    shape: int
    bools: int
    roothash_id: int
    digest_id: int


class RuleValue(NamedTuple):
    index: int  # position in policy.rules
    action: int  # IPE_ACTION_*


@dataclass(frozen=True)
class Defaults:
    """The ipe_policy_defaults struct (generation is supplied at encode time)."""

    op_default: tuple[int, ...]  # per op number: IPE_ACTION_* or IPE_DEFAULT_NONE
    global_default: int  # IPE_ACTION_* or IPE_DEFAULT_NONE
    shapes: int  # bit s set: some rule entry has shape s
    bool_mask: int  # the IPE_BOOL_* bits some rule tests (rule keys carry only these)


@dataclass(frozen=True)
class CompiledPolicy:
    """A policy's kernel tables, before they are given a slot and encoded."""

    digests: Mapping[DigestEntry, int]
    rules: Mapping[RuleKey, RuleValue]
    defaults: Defaults
    policy: Policy = field(repr=False, compare=False)
    abi: Abi = field(repr=False, compare=False)

    @cached_property
    def rule_texts(self) -> tuple[str, ...]:
        """Index -> the rule as kernel IPE's audit prints it (rule="..."); made when first asked."""
        return tuple(str(rule) for rule in self.policy.rules)

    @cached_property
    def kernel_maps(self) -> "KernelMaps":
        """The slot-0 maps as bytes, as the kernel would hold them (built once, on demand)."""
        return KernelMaps.from_encoded(self.abi, encode(self, 0))


def _check_policy(policy: Policy, abi: Abi) -> None:
    uncovered = [op.name for op in POLICY_OPS if policy.op_default(op) is None]
    if policy.global_default is None and uncovered:
        raise CompileError("EBADMSG", f"no global DEFAULT and no DEFAULT for op {', '.join(uncovered)}")
    if len(policy.rules) > _U32_MAX:
        raise CompileError("E2BIG", f"{len(policy.rules)} rules do not fit a __u32 index")


def _digest_id(digests: dict[DigestEntry, int], entry: DigestEntry) -> int:
    found = digests.get(entry)
    if found is None:
        found = digests[entry] = len(digests) + 1
        if found > _U32_MAX:
            raise CompileError("E2BIG", "too many distinct digests for a __u32 id")
    return found


def _defaults(policy: Policy, abi: Abi, shapes: int, bool_mask: int) -> Defaults:
    def action_or_none(action: Action | None) -> int:
        return abi.default_none if action is None else int(action)

    # The op default of UNKNOWN is never consulted (lookup step 1); keep it NONE.
    op_default = tuple(
        abi.default_none if op == abi.op_unknown else action_or_none(policy.op_default(Op(op)))
        for op in range(abi.nr_ops)
    )
    return Defaults(op_default, action_or_none(policy.global_default), shapes, bool_mask)


def compile_policy(policy: Policy, *, header: Header | None = None) -> CompiledPolicy:
    """Compile `policy` into its kernel tables (header: bpf/ipe_bpf.h unless given)."""
    abi = Abi.from_header(load_header() if header is None else header)
    _check_policy(policy, abi)
    digests: dict[DigestEntry, int] = {}
    rules: dict[RuleKey, RuleValue] = {}
    shapes = 0
    normals = [(index, rule, normalise(rule, abi)) for index, rule in enumerate(policy.rules)
               if rule.op is not Op.UNKNOWN]  # UNKNOWN events only ever see the global default
    relevant = 0
    for _, _, normal in normals:
        relevant |= normal.mask if normal is not None else 0
    claim = rules.setdefault  # rules come in index order: the first to claim a key is the lowest
    dmverity, fsverity, all_bools = abi.digest_dmverity, abi.digest_fsverity, abi.all_bools
    for index, rule, normal in normals:
        if normal is None:
            continue  # can never match: no entry
        roothash_id = digest_id = 0
        if normal.roothash is not None:
            roothash_id = _digest_id(digests, DigestEntry(dmverity, normal.roothash.alg, normal.roothash.value))
        if normal.fsverity is not None:
            digest_id = _digest_id(digests, DigestEntry(fsverity, normal.fsverity.alg, normal.fsverity.value))
        shape = normal.shape(abi)
        shapes |= 1 << shape
        value = RuleValue(index, int(rule.action))
        op = int(rule.op)
        for bools in _accepted_bools(all_bools, relevant, normal.mask, normal.bools):
            claim(RuleKey(op, shape, bools, roothash_id, digest_id), value)
    return CompiledPolicy(
        digests=MappingProxyType(digests),
        rules=MappingProxyType(rules),
        defaults=_defaults(policy, abi, shapes, relevant),
        policy=policy,
        abi=abi,
    )


# ---------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedMaps:
    """(key bytes, value bytes) for each map, ready for bpf_map_update_elem."""

    digests: list[tuple[bytes, bytes]]  # ipe_digest_key -> __u32 id
    rules: list[tuple[bytes, bytes]]  # ipe_rule_key -> ipe_rule_value
    defaults: list[tuple[bytes, bytes]]  # __u32 slot -> ipe_policy_defaults

    @property
    def entry_count(self) -> int:
        return len(self.digests) + len(self.rules) + len(self.defaults)

    @property
    def byte_size(self) -> int:
        """Key plus value bytes of every entry."""
        return sum(len(k) + len(v) for table in (self.digests, self.rules, self.defaults) for k, v in table)


def encode(compiled: CompiledPolicy, slot: int, *, generation: int = 0, epoch: int = 0) -> EncodedMaps:
    """The entries of every map for `compiled` written into `slot`."""
    abi = compiled.abi
    if not 0 <= slot < abi.slots:
        raise ValueError(f"slot must be in 0..{abi.slots - 1}, got {slot}")
    codecs = abi.codecs
    digests = [
        (codecs.digest_key(slot, e.kind, len(e.alg), len(e.value), e.alg, e.value), codecs.digest_id.pack(i))
        for e, i in compiled.digests.items()
    ]
    rules = [
        (codecs.rule_key(slot, *k), codecs.rule_value(v.index, v.action)) for k, v in compiled.rules.items()
    ]
    d = compiled.defaults
    defaults = [
        (
            codecs.array_key.pack(slot),
            codecs.defaults(bytes(d.op_default), d.global_default, d.shapes, d.bool_mask, generation, epoch),
        )
    ]
    return EncodedMaps(digests, rules, defaults)


@dataclass(frozen=True)
class KernelMaps:
    """The maps as the kernel holds them: bytes keys to bytes values (any slots)."""

    digests: Mapping[bytes, bytes]
    rules: Mapping[bytes, bytes]
    defaults: Mapping[bytes, bytes]
    abi: Abi = field(repr=False)

    @classmethod
    def from_encoded(cls, abi: Abi, *encoded: EncodedMaps) -> "KernelMaps":
        """Maps holding the entries of the given EncodedMaps (e.g. both slots)."""
        tables: tuple[dict[bytes, bytes], ...] = ({}, {}, {})
        for e in encoded:
            for table, entries in zip(tables, (e.digests, e.rules, e.defaults)):
                table.update(entries)
        return cls(*(MappingProxyType(t) for t in tables), abi=abi)


