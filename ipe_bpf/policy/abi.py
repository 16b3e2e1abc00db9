"""The constants and map codecs of bpf/ipe_bpf.h the compiler and the lookup use.

`Abi.from_header` reads them and checks them against the model (op numbers, actions, the
bit layout of shapes and booleans); `Abi.codecs` packs map keys and values from the header's
struct layouts, so nothing here restates a layout.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from .layout import Header, HeaderError
from .model import Action, BoolKey, Digest, Op


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
    def digest_value_size(self) -> int:
        """Bytes of the digests map's value (struct ipe_digest_value)."""
        return self.header.struct("ipe_digest_value").size

    @property
    def no_rule(self) -> int:
        """IPE_NO_RULE: a digest value's rule index when the rules map holds its rules."""
        return self.header.constant("IPE_NO_RULE")

    @property
    def all_bools(self) -> int:
        return sum(self.bool_bits.values())

    @cached_property
    def bool_bit_of(self) -> Mapping[str, int]:
        """bool_bits by the key's enum name (str keys hash in C: the compiler asks per property)."""
        return {key.name: bit for key, bit in self.bool_bits.items()}

    @cached_property
    def codecs(self) -> "Codecs":
        return Codecs(self.header)

    def representable(self, digest: Digest) -> bool:
        """Whether a kernel digest key can hold `digest` (else it can never match one)."""
        return len(digest.alg) <= self.alg_max and len(digest.value) <= self.digest_max



class Codecs:
    """Packers for the map keys and values, all derived from the header."""

    def __init__(self, h: Header) -> None:
        self.digest_key = h.struct("ipe_digest_key").packer("slot", "kind", "alg_len", "len", "alg", "value")
        self.rule_key = h.struct("ipe_rule_key").packer("slot", "op", "shape", "bools", "roothash_id", "digest_id")
        self.rule_value_layout = h.struct("ipe_rule_value")
        self.defaults_layout = h.struct("ipe_policy_defaults")
        self.defaults = self.defaults_layout.packer("op_default", "global_default", "shapes", "bool_mask", "generation", "epoch")
        self.digest_value_layout = h.struct("ipe_digest_value")
        self.array_key = struct.Struct("=I")  # BPF array maps are indexed by a __u32
