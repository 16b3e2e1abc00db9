"""The Python mirror of the BPF program's decision: the executable specification the C code follows.

`lookup_maps` decides one event from the byte-level maps exactly as the BPF program does (the
comment block below is what the C code mirrors step by step); `lookup` does it for a compiled
policy.  The unit tests prove it equal to the reference evaluator.
"""

from __future__ import annotations

from typing import NamedTuple

from .abi import Abi, Codecs
from .compiler import CompiledPolicy, KernelMaps
from .evaluate import Decision, Source
from .model import Action, BoolKey, Digest, FileAttributes, Op


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
#       bools = ((boot_verified      ? IPE_BOOL_BOOT_VERIFIED : 0)
#              | (dmverity_signature ? IPE_BOOL_DMV_SIGNATURE : 0)
#              | (fsverity_signature ? IPE_BOOL_FSV_SIGNATURE : 0)) & defaults.bool_mask
#       roothash_id = digest_id_of(IPE_DIGEST_DMVERITY, the bdev's root hash alg + bytes)
#       digest_id   = digest_id_of(IPE_DIGEST_FSVERITY, the inode's fs-verity alg + digest)
#     digest_id_of(kind, alg, value):
#       no such digest (no dm-verity bdev / no fs-verity)              -> 0
#       strlen(alg) > IPE_ALG_MAX or len(value) > IPE_DIGEST_MAX       -> 0 (no rule has it)
#       key = {slot, kind, alg_len = strlen(alg), len = len(value),
#              alg = alg bytes (no NUL, zero-padded), value = bytes (zero-padded)}
#       v = digests_map[key]: v.id, and v's rule (index, op, action); absent -> 0, no rule
#
#  3. best = none
#     for shape in 0, 1, 2, 3:                       (a bounded loop: unroll it)
#         if shape is one digest's (ROOTHASH: the root hash's, FSVERITY: the digest's) and
#            that digest's value holds a rule (v.index != IPE_NO_RULE):  (its only rule)
#             if v.op == op and (best is none or v.index < best.index): best = v's rule
#             continue                                (the rules map has no entry for it)
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
# At most: 1 defaults lookup, 2 digest lookups, 4 rule lookups per event (2 when both digests
# hold their one rule).
# ======================================================================================


class MapDecision(NamedTuple):
    """What the BPF program knows after deciding: the action, its source, the rule index."""

    action: int
    source: Source
    index: int | None


class _Named(NamedTuple):
    """A file's digest as the digests map knows it: its id (0: not named) and its one rule."""

    id: int
    rule: tuple[int, int, int] | None  # (index, op, action) kept with the digest


_UNNAMED = _Named(0, None)


def _file_digest(maps: KernelMaps, codecs: Codecs, slot: int, kind: int, digest: Digest | None) -> _Named:
    if digest is None or not maps.abi.representable(digest):
        return _UNNAMED
    key = codecs.digest_key(slot, kind, len(digest.alg), len(digest.value), digest.alg, digest.value)
    raw = maps.digests.get(key)
    if raw is None:
        return _UNNAMED
    v = codecs.digest_value_layout.unpack(raw)
    index, op, action = v["index"], v["op"], v["action"]
    assert isinstance(index, int) and isinstance(op, int) and isinstance(action, int)
    return _Named(int(v["id"]), None if index == maps.abi.no_rule else (index, op, action))  # type: ignore[arg-type]


def _file_bools(abi: Abi, attrs: FileAttributes) -> int:
    bits = abi.bool_bits
    return (
        (bits[BoolKey.BOOT_VERIFIED] if attrs.boot_verified else 0)
        | (bits[BoolKey.DMVERITY_SIGNATURE] if attrs.dmverity_signature else 0)
        | (bits[BoolKey.FSVERITY_SIGNATURE] if attrs.fsverity_signature else 0)
    )


def _best_rule(
    maps: KernelMaps, codecs: Codecs, slot: int, op: int, shapes: int, bools: int, roothash: _Named, digest: _Named
) -> tuple[int, int] | None:
    abi = maps.abi
    best: tuple[int, int] | None = None
    for shape in range(4):
        one = roothash if shape == abi.shape_roothash else digest if shape == abi.shape_fsverity else None
        if one is not None and one.id and one.rule is not None:
            index, rule_op, action = one.rule
            if rule_op == op and (best is None or index < best[0]):
                best = (index, action)
            continue
        if not shapes & (1 << shape):
            continue
        wants_roothash, wants_digest = shape & abi.shape_roothash, shape & abi.shape_fsverity
        if (wants_roothash and roothash.id == 0) or (wants_digest and digest.id == 0):
            continue
        key = codecs.rule_key(
            slot, op, shape, bools, roothash.id if wants_roothash else 0, digest.id if wants_digest else 0
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
    bool_mask = defaults["bool_mask"]
    assert isinstance(op_default, bytes) and isinstance(global_default, int) and isinstance(shapes, int)
    assert isinstance(bool_mask, int)
    if op == abi.op_unknown:
        if global_default != abi.default_none:
            return MapDecision(global_default, Source.GLOBAL_DEFAULT, None)
        return MapDecision(int(Action.ALLOW), Source.NONE, None)
    # Step 2
    bools, roothash, digest = 0, _UNNAMED, _UNNAMED
    if attrs.has_file:
        bools = _file_bools(abi, attrs) & bool_mask
        roothash = _file_digest(maps, codecs, slot, abi.digest_dmverity, attrs.dmverity_roothash)
        digest = _file_digest(maps, codecs, slot, abi.digest_fsverity, attrs.fsverity_digest)
    # Step 3
    best = _best_rule(maps, codecs, slot, op, shapes, bools, roothash, digest)
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
