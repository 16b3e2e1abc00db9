"""The policy compiler: a Policy becomes the kernel's O(1) decision tables (docs/design.md, section 3).

Tables (structs in bpf/ipe_bpf.h; every entry carries the slot it belongs to):

* digests map   `ipe_digest_key -> __u32 id`: every digest a rule can match gets an id > 0.
* rules map     `ipe_rule_key -> ipe_rule_value`: for a rule *shape* (which of dm-verity
  root hash / fs-verity digest the rule tests), the file's ids for that shape and the file's
  three boolean attributes, the lowest index of a rule of that shape that matches.
* defaults map  (array, index = slot) `ipe_policy_defaults`: per-op and global defaults and
  the bitmask of shapes that occur.

Each rule is normalised (boolean properties fold into required bit values; repeated digest
properties of one key must all be the same digest) and expanded over the values of the
booleans it leaves free, so a rule makes at most 2**3 = 8 rule entries and at most 2 digest
entries: the tables are O(number of rules), and a decision costs at most 2 digest lookups,
4 rule lookups and 1 defaults lookup whatever the policy size.

`lookup()` below is the executable specification of the BPF program's decision; its
comment block is what the C code mirrors step by step.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import NamedTuple

from ..errors import IpeBpfError
from .evaluate import Decision, Source
from .layout import Header, HeaderError, load_header
from .model import (
    POLICY_OPS,
    Action,
    BoolKey,
    BoolProperty,
    Digest,
    DigestKey,
    FileAttributes,
    Op,
    Policy,
    Rule,
)

__all__ = [
    "Abi",
    "CompileError",
    "CompiledPolicy",
    "Defaults",
    "DigestEntry",
    "EncodedMaps",
    "KernelMaps",
    "MapDecision",
    "NormalRule",
    "RuleKey",
    "RuleValue",
    "compile_policy",
    "encode",
    "lookup",
    "lookup_maps",
    "normalise",
]

_U32_MAX = 0xFFFF_FFFF


class CompileError(IpeBpfError):
    """The policy cannot be turned into kernel tables."""


# ---------------------------------------------------------------- the header's constants


@dataclass(frozen=True)
class Abi:
    """The constants of bpf/ipe_bpf.h the compiler and lookup use, checked against the model."""

    header: Header = field(repr=False)
    nr_ops: int
    op_unknown: int
    alg_max: int
    digest_max: int
    slots: int
    default_none: int
    digest_dmverity: int
    digest_fsverity: int
    shape_roothash: int
    shape_fsverity: int
    bool_bits: Mapping[BoolKey, int]

    @classmethod
    def from_header(cls, header: Header) -> "Abi":
        c = header.constant
        abi = cls(
            header=header,
            nr_ops=c("IPE_NR_OPS"),
            op_unknown=c("IPE_OP_UNKNOWN"),
            alg_max=c("IPE_ALG_MAX"),
            digest_max=c("IPE_DIGEST_MAX"),
            slots=c("IPE_SLOTS"),
            default_none=c("IPE_DEFAULT_NONE"),
            digest_dmverity=c("IPE_DIGEST_DMVERITY"),
            digest_fsverity=c("IPE_DIGEST_FSVERITY"),
            shape_roothash=c("IPE_SHAPE_ROOTHASH"),
            shape_fsverity=c("IPE_SHAPE_FSVERITY"),
            bool_bits=MappingProxyType(
                {
                    BoolKey.BOOT_VERIFIED: c("IPE_BOOL_BOOT_VERIFIED"),
                    BoolKey.DMVERITY_SIGNATURE: c("IPE_BOOL_DMV_SIGNATURE"),
                    BoolKey.FSVERITY_SIGNATURE: c("IPE_BOOL_FSV_SIGNATURE"),
                }
            ),
        )
        abi._check(header)
        return abi

    def _check(self, header: Header) -> None:
        c = header.constant
        problems = []
        if self.nr_ops != len(Op) or self.op_unknown != Op.UNKNOWN:
            problems.append("IPE_NR_OPS / IPE_OP_UNKNOWN disagree with model.Op")
        if c("IPE_ACTION_ALLOW") != Action.ALLOW or c("IPE_ACTION_DENY") != Action.DENY:
            problems.append("IPE_ACTION_* disagree with model.Action")
        if self.default_none in (Action.ALLOW, Action.DENY):
            problems.append("IPE_DEFAULT_NONE collides with an action")
        if sorted(self.bool_bits.values()) != [1, 2, 4]:
            problems.append("IPE_BOOL_* must be the bits 1, 2 and 4")
        if {self.shape_roothash, self.shape_fsverity} != {1, 2}:
            problems.append("IPE_SHAPE_* must be the bits 1 and 2")
        if self.digest_dmverity == self.digest_fsverity:
            problems.append("IPE_DIGEST_* must differ")
        if problems:
            raise HeaderError("; ".join(problems))

    @property
    def all_bools(self) -> int:
        return sum(self.bool_bits.values())

    @cached_property
    def codecs(self) -> "_Codecs":
        return _Codecs(self)

    def representable(self, digest: Digest) -> bool:
        """Whether a kernel digest key can hold `digest` (else it can never match one)."""
        return len(digest.alg) <= self.alg_max and len(digest.value) <= self.digest_max


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

    def file_bools(self, abi: Abi) -> Iterator[int]:
        """Every value of the file's boolean bits this rule accepts (2**free of them)."""
        for value in range(abi.all_bools + 1):
            if value & self.mask == self.bools:
                yield value


def normalise(rule: Rule, abi: Abi) -> NormalRule | None:
    """What `rule` requires of a file, or None if no file the kernel sees can match it."""
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


@dataclass(frozen=True)
class CompiledPolicy:
    """A policy's kernel tables, before they are given a slot and encoded."""

    digests: Mapping[DigestEntry, int]
    rules: Mapping[RuleKey, RuleValue]
    defaults: Defaults
    rule_texts: tuple[str, ...]  # index -> the rule as kernel IPE's audit prints it (rule="...")
    policy: Policy = field(repr=False, compare=False)
    abi: Abi = field(repr=False, compare=False)

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


def _defaults(policy: Policy, abi: Abi, shapes: int) -> Defaults:
    def action_or_none(action: Action | None) -> int:
        return abi.default_none if action is None else int(action)

    # The op default of UNKNOWN is never consulted (lookup step 1); keep it NONE.
    op_default = tuple(
        abi.default_none if op == abi.op_unknown else action_or_none(policy.op_default(Op(op)))
        for op in range(abi.nr_ops)
    )
    return Defaults(op_default, action_or_none(policy.global_default), shapes)


def compile_policy(policy: Policy, *, header: Header | None = None) -> CompiledPolicy:
    """Compile `policy` into its kernel tables (header: bpf/ipe_bpf.h unless given)."""
    abi = Abi.from_header(load_header() if header is None else header)
    _check_policy(policy, abi)
    digests: dict[DigestEntry, int] = {}
    rules: dict[RuleKey, RuleValue] = {}
    shapes = 0
    for index, rule in enumerate(policy.rules):
        if rule.op is Op.UNKNOWN:
            continue  # never consulted: UNKNOWN events only see the global default
        normal = normalise(rule, abi)
        if normal is None:
            continue  # can never match: no entry
        roothash_id = digest_id = 0
        if normal.roothash is not None:
            roothash_id = _digest_id(digests, DigestEntry(abi.digest_dmverity, *_digest_parts(normal.roothash)))
        if normal.fsverity is not None:
            digest_id = _digest_id(digests, DigestEntry(abi.digest_fsverity, *_digest_parts(normal.fsverity)))
        shape = normal.shape(abi)
        shapes |= 1 << shape
        value = RuleValue(index, int(rule.action))
        for bools in normal.file_bools(abi):
            # Rules come in index order: the first one to claim a key is the lowest index.
            rules.setdefault(RuleKey(int(rule.op), shape, bools, roothash_id, digest_id), value)
    return CompiledPolicy(
        digests=MappingProxyType(digests),
        rules=MappingProxyType(rules),
        defaults=_defaults(policy, abi, shapes),
        rule_texts=tuple(str(rule) for rule in policy.rules),
        policy=policy,
        abi=abi,
    )


def _digest_parts(digest: Digest) -> tuple[bytes, bytes]:
    return digest.alg, digest.value


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


class _Codecs:
    """Packers for the map keys and values, all derived from the header."""

    def __init__(self, abi: Abi) -> None:
        h = abi.header
        self.digest_key = h.struct("ipe_digest_key").packer("slot", "kind", "alg_len", "len", "alg", "value")
        self.rule_key = h.struct("ipe_rule_key").packer("slot", "op", "shape", "bools", "roothash_id", "digest_id")
        self.rule_value_layout = h.struct("ipe_rule_value")
        self.rule_value = self.rule_value_layout.packer("index", "action")
        self.defaults_layout = h.struct("ipe_policy_defaults")
        self.defaults = self.defaults_layout.packer("op_default", "global_default", "shapes", "generation")
        # A digest id has the type of the rule key's id fields.
        self.digest_id = struct.Struct("=" + h.struct("ipe_rule_key").field("roothash_id").format)
        self.array_key = struct.Struct("=I")  # BPF array maps are indexed by a __u32


def encode(compiled: CompiledPolicy, slot: int, *, generation: int = 0) -> EncodedMaps:
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
            codecs.defaults(bytes(d.op_default), d.global_default, d.shapes, generation),
        )
    ]
    return EncodedMaps(digests, rules, defaults)


# ---------------------------------------------------------------- lookup (the BPF mirror)

# ======================================================================================
# THE DECISION, STEP BY STEP (the BPF program does exactly this, in this order)
#
# Inputs: slot (the active slot from the config word), op (0..6, or IPE_OP_UNKNOWN = 7 for
# an unmapped kernel read/load id) and the file of the event, or none.
# Every key struct is zero-initialised in full before its fields are set (`= {}` then
# assignments, or __builtin_memset), so unused array bytes are 0 and hashes match.
#
#  1. defaults = defaults_map[slot]                      (array lookup, key __u32 slot)
#     if op == IPE_OP_UNKNOWN:
#         if defaults.global_default != IPE_DEFAULT_NONE -> decide(global_default, GLOBAL)
#         else                                           -> decide(ALLOW, NONE)
#
#  2. The file's attributes:
#     no file (anonymous memory, kernel_load_data):  bools = 0, roothash_id = 0, digest_id = 0
#     otherwise:
#       bools = (boot_verified      ? IPE_BOOL_BOOT_VERIFIED : 0)
#             | (dmverity_signature ? IPE_BOOL_DMV_SIGNATURE : 0)
#             | (fsverity_signature ? IPE_BOOL_FSV_SIGNATURE : 0)
#       roothash_id = digest_id_of(IPE_DIGEST_DMVERITY, the bdev's root hash alg + bytes)
#       digest_id   = digest_id_of(IPE_DIGEST_FSVERITY, the inode's fs-verity alg + digest)
#     digest_id_of(kind, alg, value):
#       no such digest (no dm-verity bdev / no fs-verity)              -> 0
#       strlen(alg) > IPE_ALG_MAX or len(value) > IPE_DIGEST_MAX       -> 0 (no rule has it)
#       key = {slot, kind, alg_len = strlen(alg), len = len(value),
#              alg = alg bytes (no NUL, zero-padded), value = bytes (zero-padded)}
#       digests_map[key] if present else 0                             (__u32)
#
#  3. best = none
#     for shape in 0, 1, 2, 3:                       (a bounded loop: unroll it)
#         if !(defaults.shapes & (1 << shape))                          continue
#         if (shape & IPE_SHAPE_ROOTHASH) and roothash_id == 0          continue
#         if (shape & IPE_SHAPE_FSVERITY) and digest_id == 0            continue
#         key = {slot, op, shape, bools,
#                roothash_id if shape & IPE_SHAPE_ROOTHASH else 0,
#                digest_id   if shape & IPE_SHAPE_FSVERITY else 0}
#         v = rules_map[key]
#         if v and (best is none or v.index < best.index): best = v
#
#  4. if best:                                            -> decide(best.action, RULE best.index)
#     if defaults.op_default[op] != IPE_DEFAULT_NONE      -> decide(op_default[op], OP_DEFAULT)
#     if defaults.global_default != IPE_DEFAULT_NONE      -> decide(global_default, GLOBAL)
#     else (the compiler never produces this)             -> decide(ALLOW, NONE)
#
# At most: 1 defaults lookup, 2 digest lookups, 4 rule lookups per event.
# ======================================================================================


class MapDecision(NamedTuple):
    """What the BPF program knows after deciding: the action, its source, the rule index."""

    action: int
    source: Source
    index: int | None


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


def _file_digest_id(maps: KernelMaps, codecs: _Codecs, slot: int, kind: int, digest: Digest | None) -> int:
    if digest is None or not maps.abi.representable(digest):
        return 0
    key = codecs.digest_key(slot, kind, len(digest.alg), len(digest.value), digest.alg, digest.value)
    raw = maps.digests.get(key)
    return 0 if raw is None else codecs.digest_id.unpack(raw)[0]


def _file_bools(abi: Abi, attrs: FileAttributes) -> int:
    bits = abi.bool_bits
    return (
        (bits[BoolKey.BOOT_VERIFIED] if attrs.boot_verified else 0)
        | (bits[BoolKey.DMVERITY_SIGNATURE] if attrs.dmverity_signature else 0)
        | (bits[BoolKey.FSVERITY_SIGNATURE] if attrs.fsverity_signature else 0)
    )


def _best_rule(
    maps: KernelMaps, codecs: _Codecs, slot: int, op: int, shapes: int, ids: tuple[int, int, int]
) -> tuple[int, int] | None:
    abi = maps.abi
    bools, roothash_id, digest_id = ids
    best: tuple[int, int] | None = None
    for shape in range(4):
        if not shapes & (1 << shape):
            continue
        wants_roothash, wants_digest = shape & abi.shape_roothash, shape & abi.shape_fsverity
        if (wants_roothash and roothash_id == 0) or (wants_digest and digest_id == 0):
            continue
        key = codecs.rule_key(
            slot, op, shape, bools, roothash_id if wants_roothash else 0, digest_id if wants_digest else 0
        )
        raw = maps.rules.get(key)
        if raw is None:
            continue
        found = codecs.rule_value_layout.unpack(raw)
        index, action = found["index"], found["action"]
        assert isinstance(index, int) and isinstance(action, int)
        if best is None or index < best[0]:
            best = (index, action)
    return best


def lookup_maps(maps: KernelMaps, slot: int, op: int, attrs: FileAttributes) -> MapDecision:
    """Decide one event from the byte-level maps, exactly as the BPF program does (above)."""
    abi = maps.abi
    if not 0 <= op < abi.nr_ops:
        raise ValueError(f"op must be in 0..{abi.nr_ops - 1}, got {op}")
    codecs = abi.codecs
    # Step 1
    defaults = codecs.defaults_layout.unpack(maps.defaults[codecs.array_key.pack(slot)])
    op_default, global_default, shapes = defaults["op_default"], defaults["global_default"], defaults["shapes"]
    assert isinstance(op_default, bytes) and isinstance(global_default, int) and isinstance(shapes, int)
    if op == abi.op_unknown:
        if global_default != abi.default_none:
            return MapDecision(global_default, Source.GLOBAL_DEFAULT, None)
        return MapDecision(int(Action.ALLOW), Source.NONE, None)
    # Step 2
    if not attrs.has_file:
        ids = (0, 0, 0)
    else:
        ids = (
            _file_bools(abi, attrs),
            _file_digest_id(maps, codecs, slot, abi.digest_dmverity, attrs.dmverity_roothash),
            _file_digest_id(maps, codecs, slot, abi.digest_fsverity, attrs.fsverity_digest),
        )
    # Step 3
    best = _best_rule(maps, codecs, slot, op, shapes, ids)
    # Step 4
    if best is not None:
        return MapDecision(best[1], Source.RULE, best[0])
    if op_default[op] != abi.default_none:
        return MapDecision(op_default[op], Source.OP_DEFAULT, None)
    if global_default != abi.default_none:
        return MapDecision(global_default, Source.GLOBAL_DEFAULT, None)
    return MapDecision(int(Action.ALLOW), Source.NONE, None)


def lookup(compiled: CompiledPolicy, op: Op, attrs: FileAttributes) -> Decision:
    """The kernel's decision for an event, computed from the encoded slot-0 maps."""
    found = lookup_maps(compiled.kernel_maps, 0, int(op), attrs)
    rule = None if found.index is None else compiled.policy.rules[found.index]
    return Decision(Action(found.action), found.source, rule, op=Op(op))
