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

`CompiledPolicy.tables` packs them back to back (`Tables`: what install writes, and what
deploy keeps beside the policy, policy/tables_file.py); `encode()` splits them into map entries
for a slot, for ipe_bpf.policy.lookup, which decides events from them exactly as the BPF program
does; ipe_bpf.policy.abi holds the header's constants.  Rules the parser kept as DigestRows (the
canonical one-digest line of an allowlist) are compiled without making Rule objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from types import MappingProxyType
from typing import NamedTuple

from ..errors import IpeBpfError
from .abi import Abi
from .bulk import columns, without_gc
from .layout import Header, default_header
from .model import (
    POLICY_OPS,
    Action,
    BoolProperty,
    Digest,
    DigestKey,
    DigestProperty,
    DigestRow,
    Op,
    Policy,
    Rule,
    RuleList,
)

__all__ = [
    "CompileError",
    "CompiledPolicy",
    "Defaults",
    "DigestEntry",
    "EncodedMaps",
    "KernelMaps",
    "RuleKey",
    "RuleValue",
    "Tables",
    "compile_policy",
    "default_abi",
    "encode",
    "normalise",
]

_U32_MAX = 0xFFFF_FFFF


class CompileError(IpeBpfError):
    """The policy cannot be turned into kernel tables."""


# ---------------------------------------------------------------- normalisation


# What a rule requires of a file: (op, action, mask, bools, roothash, fs-verity digest).  `mask`
# are the IPE_BOOL_* bits it constrains and `bools` their required values (bits outside `mask`
# are 0); each digest is a digests-map entry (kind, alg, value), or None if not required.
_DigestEntry = tuple[int, bytes, bytes]
_Normal = tuple[int, int, int, int, "_DigestEntry | None", "_DigestEntry | None"]


@lru_cache(maxsize=None)
def _accepted_bools(all_bools: int, relevant: int, mask: int, bools: int) -> tuple[int, ...]:
    """Every value of the file's `relevant` boolean bits a rule of (mask, bools) accepts."""
    return tuple(v for v in range(all_bools + 1) if v & ~relevant == 0 and v & mask == bools)


def normalise(rule: Rule, abi: Abi) -> _Normal | None:
    """What `rule` requires of a file, or None if no file the kernel sees can match it: an
    UNKNOWN-op rule (such events see the global default only), key=TRUE with key=FALSE, two
    different digests of one kind (a file has one), or a digest no kernel key can hold."""
    if rule.op is Op.UNKNOWN:
        return None
    mask = bools = 0
    roothash: Digest | None = None
    fsverity: Digest | None = None
    for prop in rule.properties:
        key = prop.key
        if key is DigestKey.FSVERITY_DIGEST or key is DigestKey.DMVERITY_ROOTHASH:
            digest = prop.digest  # type: ignore[union-attr]
            seen = fsverity if key is DigestKey.FSVERITY_DIGEST else roothash
            if seen is not None and seen != digest:
                return None
            if key is DigestKey.FSVERITY_DIGEST:
                fsverity = digest
            else:
                roothash = digest
            continue
        bit = abi.bool_bit_of[key._name_]
        value = bit if prop.value else 0  # type: ignore[union-attr]
        if mask & bit and bools & bit != value:
            return None
        mask, bools = mask | bit, bools | value
    entries = []
    for kind, digest in ((abi.digest_dmverity, roothash), (abi.digest_fsverity, fsverity)):
        if digest is not None and not abi.representable(digest):
            return None
        entries.append(None if digest is None else (kind, digest.alg, digest.value))
    return int(rule.op), int(rule.action), mask, bools, entries[0], entries[1]


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
    """A policy's kernel tables, before they are given a slot and encoded.

    The compiler keeps plain tuples (digest (kind, alg, value) -> id; rule key -> (index,
    action)); `digests` and `rules` show them as named tuples.
    """

    digest_ids: Mapping[tuple[int, bytes, bytes], int] = field(repr=False)
    rule_entries: Mapping[tuple[int, int, int, int, int], tuple[int, int]] = field(repr=False)
    # digest id -> (index, op, action) of the one rule that names it and tests nothing else:
    # kept in the digests map, with no rule entries (struct ipe_digest_value)
    inline_rules: Mapping[int, tuple[int, int, int]] = field(repr=False)
    defaults: Defaults
    policy: Policy = field(repr=False, compare=False)
    abi: Abi = field(repr=False, compare=False)

    @cached_property
    def digests(self) -> Mapping[DigestEntry, int]:
        return MappingProxyType({DigestEntry(*e): i for e, i in self.digest_ids.items()})

    @cached_property
    def rules(self) -> Mapping[RuleKey, RuleValue]:
        return MappingProxyType({RuleKey(*k): RuleValue(*v) for k, v in self.rule_entries.items()})

    @cached_property
    def rule_texts(self) -> tuple[str, ...]:
        """Index -> the rule as kernel IPE's audit prints it (rule="..."); made when first asked."""
        return tuple(str(rule) for rule in self.policy.rules)

    @cached_property
    def tables(self) -> "Tables":
        """The map contents, packed (made once, on demand)."""
        return Tables.pack(self)

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


def _defaults(policy: Policy, abi: Abi, shapes: int, bool_mask: int) -> Defaults:
    def action_or_none(action: Action | None) -> int:
        return abi.default_none if action is None else int(action)

    # The op default of UNKNOWN is never consulted (lookup step 1); keep it NONE.
    op_default = tuple(
        abi.default_none if op == abi.op_unknown else action_or_none(policy.op_default(Op(op)))
        for op in range(abi.nr_ops)
    )
    return Defaults(op_default, action_or_none(policy.global_default), shapes, bool_mask)


@without_gc
def compile_policy(policy: Policy, *, header: Header | None = None) -> CompiledPolicy:
    """Compile `policy` into its kernel tables (header: bpf/ipe_bpf.h unless given)."""
    abi = _abi(header)
    _check_policy(policy, abi)
    items = policy.rules.rows() if isinstance(policy.rules, RuleList) else policy.rules
    # Rules the parser left as DigestRows test no boolean: only the others decide `relevant`.
    normals = {i: normalise(item, abi) for i, item in enumerate(items) if type(item) is not DigestRow}
    relevant = 0
    for normal in normals.values():
        relevant |= normal[2] if normal is not None else 0
    digests: dict[tuple[int, bytes, bytes], int] = {}
    rules: dict[tuple[int, int, int, int, int], tuple[int, int]] = {}
    claim = rules.setdefault  # rules come in index order: the first to claim a key is the lowest
    shape_bits = (0, abi.shape_fsverity, abi.shape_roothash, abi.shape_roothash | abi.shape_fsverity)
    shapes_seen = 0
    alg_max, digest_max, all_bools = abi.alg_max, abi.digest_max, abi.all_bools
    fsverity_key, fsverity_kind, dmverity_kind = DigestKey.FSVERITY_DIGEST, abi.digest_fsverity, abi.digest_dmverity
    digest_row_bools = _accepted_bools(all_bools, relevant, 0, 0) if relevant else (0,)
    # A digest row whose digest no rule named before is kept aside (id -> (index, op, action,
    # entry)); the next rule that names the digest first claims the row's entries, in index order.
    single: dict[int, tuple[int, int, int, tuple[int, int, int, int, int]]] = {}

    def claim_row(entry: tuple[int, int, int, int, int], index: int, action: int) -> None:
        """The entries of a rule of one digest and no boolean: one per value of the file's bools."""
        for file_bools in digest_row_bools:
            claim((entry[0], entry[1], file_bools, entry[3], entry[4]), (index, action))

    def claim_single(digest_id: int) -> None:
        index, _, action, entry = single.pop(digest_id)
        claim_row(entry, index, action)

    for index, item in enumerate(items):
        if type(item) is DigestRow:
            op, key, alg, value, action, _ = item
            if len(alg) > alg_max or len(value) > digest_max:
                continue  # no kernel digest key can hold it: never matches
            known = len(digests)
            if key is fsverity_key:
                digest_id = digests.setdefault((fsverity_kind, alg, value), known + 1)
                shape, entry = shape_bits[1], (op, shape_bits[1], 0, 0, digest_id)
            else:
                digest_id = digests.setdefault((dmverity_kind, alg, value), known + 1)
                shape, entry = shape_bits[2], (op, shape_bits[2], 0, digest_id, 0)
            shapes_seen |= 1 << shape
            if digest_id > known:  # named first here
                single[digest_id] = (index, op, action, entry)
                continue
            if digest_id in single:
                claim_single(digest_id)
            claim_row(entry, index, action)
            continue
        normal = normals[index]
        if normal is None:
            continue
        op, action, mask, bools, roothash, fsverity = normal
        known = len(digests)
        roothash_id = 0 if roothash is None else digests.setdefault(roothash, len(digests) + 1)
        digest_id = 0 if fsverity is None else digests.setdefault(fsverity, len(digests) + 1)
        shape = shape_bits[(roothash is not None) * 2 + (fsverity is not None)]
        shapes_seen |= 1 << shape
        if not mask and (roothash_id or digest_id) > known and not (roothash_id and digest_id):
            # a rule of one digest and no boolean, the digest named first: as a digest row
            single[roothash_id or digest_id] = (index, op, action, (op, shape, 0, roothash_id, digest_id))
            continue
        for named in (roothash_id, digest_id):
            if named in single:
                claim_single(named)
        for file_bools in _accepted_bools(all_bools, relevant, mask, bools):
            claim((op, shape, file_bools, roothash_id, digest_id), (index, action))
    if len(digests) > _U32_MAX:
        raise CompileError("E2BIG", "too many distinct digests for a __u32 id")
    return CompiledPolicy(
        digest_ids=MappingProxyType(digests),
        rule_entries=MappingProxyType(rules),
        inline_rules=MappingProxyType({i: (index, op, action) for i, (index, op, action, _) in single.items()}),
        defaults=_defaults(policy, abi, shapes_seen, relevant),
        policy=policy,
        abi=abi,
    )


@lru_cache(maxsize=1)
def default_abi() -> Abi:
    """The Abi of bpf/ipe_bpf.h, made once per process."""
    return Abi.from_header(default_header())


def _abi(header: Header | None) -> Abi:
    return default_abi() if header is None else Abi.from_header(header)


# ---------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Tables:
    """A compiled policy's map contents, packed back to back, with slot 0 in every key: what
    `install` writes (after `slotted`), and what the store keeps beside a deployed policy so
    that activating it at once or at boot needs no parsing or compiling (policy/tables_file.py).
    """

    digest_keys: bytes  # count x struct ipe_digest_key
    digest_values: bytes  # count x __u32 id
    rule_keys: bytes  # count x struct ipe_rule_key
    rule_values: bytes  # count x struct ipe_rule_value
    defaults: Defaults
    name: bytes  # the policy's, to name it in errors and tests
    version: tuple[int, int, int]
    abi: Abi = field(repr=False, compare=False)

    @classmethod
    @without_gc
    def pack(cls, compiled: CompiledPolicy) -> "Tables":
        h, abi = compiled.abi.header, compiled.abi
        digest_ids = compiled.digest_ids
        kinds, algs, values = columns(digest_ids, 3)
        digest_keys = h.struct("ipe_digest_key").pack_columns(len(digest_ids), {
            "kind": kinds, "alg_len": list(map(len, algs)), "len": list(map(len, values)), "alg": algs, "value": values})
        inline, none = compiled.inline_rules, (abi.no_rule, 0, 0)
        ids = list(digest_ids.values())
        indexes_, ops_, actions_ = columns([inline.get(i, none) for i in ids], 3)
        digest_values = h.struct("ipe_digest_value").pack_columns(len(ids), {
            "id": ids, "index": indexes_, "op": ops_, "action": actions_})
        entries = compiled.rule_entries
        ops, shapes, bools, roothash_ids, digest_ids_ = columns(entries, 5)
        indexes, actions = columns(entries.values(), 2)
        rule_keys = h.struct("ipe_rule_key").pack_columns(len(entries), {
            "op": ops, "shape": shapes, "bools": bools, "roothash_id": roothash_ids, "digest_id": digest_ids_})
        rule_values = h.struct("ipe_rule_value").pack_columns(len(entries), {"index": indexes, "action": actions})
        policy = compiled.policy
        return cls(digest_keys, digest_values, rule_keys, rule_values, compiled.defaults, policy.name, policy.version,
                   abi)

    @property
    def digest_count(self) -> int:
        return len(self.digest_values) // self.abi.digest_value_size

    @property
    def rule_count(self) -> int:
        return len(self.rule_values) // self.abi.header.struct("ipe_rule_value").size

    def slotted(self, slot: int) -> tuple[bytes, bytes]:
        """(digest keys, rule keys) with `slot` in every key (slot 0: the arrays themselves)."""
        if not 0 <= slot < self.abi.slots:
            raise ValueError(f"slot must be in 0..{self.abi.slots - 1}, got {slot}")
        if slot == 0:
            return self.digest_keys, self.rule_keys
        out = []
        for keys, name in ((self.digest_keys, "ipe_digest_key"), (self.rule_keys, "ipe_rule_key")):
            layout = self.abi.header.struct(name)
            buf = bytearray(keys)
            buf[layout.field("slot").offset :: layout.size] = bytes([slot]) * (len(keys) // layout.size)
            out.append(buf)
        return out[0], out[1]

    def defaults_entry(self, slot: int, *, generation: int = 0, epoch: int = 0) -> tuple[bytes, bytes]:
        d, codecs = self.defaults, self.abi.codecs
        return (codecs.array_key.pack(slot),
                codecs.defaults(bytes(d.op_default), d.global_default, d.shapes, d.bool_mask, generation, epoch))


def _split(data: bytes, size: int) -> list[bytes]:
    data = bytes(data)
    return [data[i : i + size] for i in range(0, len(data), size)]


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
    """The entries of every map for `compiled` written into `slot`, one pair per entry."""
    tables = compiled.tables
    digest_keys, rule_keys = tables.slotted(slot)
    h = compiled.abi.header
    digests = list(zip(_split(digest_keys, h.struct("ipe_digest_key").size),
                       _split(tables.digest_values, compiled.abi.digest_value_size)))
    rules = list(zip(_split(rule_keys, h.struct("ipe_rule_key").size),
                     _split(tables.rule_values, h.struct("ipe_rule_value").size)))
    return EncodedMaps(digests, rules, [tables.defaults_entry(slot, generation=generation, epoch=epoch)])


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


