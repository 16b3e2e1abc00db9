"""Hypothesis strategies for policies and file attributes, shared by the policy tests.

* `policies()`: valid Policy values (the parser's coverage rule holds) whose every byte
  string can be written in IPE policy text, so `parse(format(p)) == p` is a fair test.
  Rules draw their digests from a small per-policy pool, so properties repeat across
  rules and within a rule (duplicates and contradictions), and digests sometimes exceed
  the kernel's IPE_ALG_MAX / IPE_DIGEST_MAX (such a property can never match).
* `large_policies()`: thousands of rules, built from one drawn seed (fast to generate).
* `file_attributes(policy=None)`: attributes as the kernel can report them: digests within
  IPE_ALG_MAX / IPE_DIGEST_MAX. Given a policy, digests are often the policy's own, or a
  near miss (same bytes with the algorithm's case changed, one byte flipped, truncated).
"""

from __future__ import annotations

import random

from hypothesis import strategies as st

from ipe_bpf.policy.layout import load_header
from ipe_bpf.policy.model import (
    POLICY_OPS,
    Action,
    BoolKey,
    BoolProperty,
    Digest,
    DigestKey,
    DigestProperty,
    FileAttributes,
    Op,
    Policy,
    Property,
    Rule,
)

_HEADER = load_header()
ALG_MAX: int = _HEADER.constant("IPE_ALG_MAX")
DIGEST_MAX: int = _HEADER.constant("IPE_DIGEST_MAX")

# Bytes that may appear in a policy token: not space, tab, CR, LF, NUL or '#'. ':' is
# excluded from algorithm names (the digest value splits at the first ':').
_TOKEN_BYTES = bytes(b for b in range(1, 256) if b not in b" \t\r\n#")
_ALG_BYTES = bytes(b for b in _TOKEN_BYTES if b != ord(":"))
_REAL_ALGS = (
    b"sha256",
    b"sha512",
    b"sha384",
    b"sha3-256",
    b"blake2b-512",
    b"blake2s-256",
    b"sm3",
    b"rmd160",
    b"SHA256",
    b"Sha256",
)

actions = st.sampled_from(Action)
policy_ops = st.sampled_from(POLICY_OPS)


def alg_names(*, allow_long: bool = True) -> st.SearchStrategy[bytes]:
    """Digest algorithm names: real ones, case variants, odd bytes, empty, rarely too long."""
    odd = st.binary(max_size=ALG_MAX).map(lambda raw: bytes(_ALG_BYTES[b % len(_ALG_BYTES)] for b in raw))
    choices = [st.sampled_from(_REAL_ALGS), st.just(b""), odd]
    if allow_long:
        choices.append(st.sampled_from([b"x" * (ALG_MAX + 1), b"sha256-but-far-too-long"]))
    return st.one_of(*choices)


def digest_values(*, allow_long: bool = True) -> st.SearchStrategy[bytes]:
    """Digest bytes: empty, short, the usual 32 / 64 bytes, rarely longer than IPE_DIGEST_MAX."""
    choices = [
        st.just(b""),
        st.binary(min_size=1, max_size=4),
        st.binary(min_size=32, max_size=32),
        st.binary(min_size=DIGEST_MAX, max_size=DIGEST_MAX),
    ]
    if allow_long:
        choices.append(st.binary(min_size=DIGEST_MAX + 1, max_size=DIGEST_MAX + 8))
    return st.one_of(*choices)


def digests(*, allow_long: bool = True) -> st.SearchStrategy[Digest]:
    return st.builds(Digest, alg_names(allow_long=allow_long), digest_values(allow_long=allow_long))


def bool_properties() -> st.SearchStrategy[BoolProperty]:
    return st.builds(BoolProperty, st.sampled_from(BoolKey), st.booleans())


def digest_properties(pool: list[Digest]) -> st.SearchStrategy[DigestProperty]:
    return st.builds(DigestProperty, st.sampled_from(DigestKey), st.sampled_from(pool))


def rules(pool: list[Digest], *, ops: st.SearchStrategy[Op] = policy_ops, max_properties: int = 5) -> st.SearchStrategy[Rule]:
    props: st.SearchStrategy[Property] = st.one_of(bool_properties(), digest_properties(pool))
    return st.builds(Rule, ops, st.lists(props, max_size=max_properties).map(tuple), actions)


def policy_names() -> st.SearchStrategy[bytes]:
    return st.binary(min_size=1, max_size=12).map(lambda raw: bytes(_TOKEN_BYTES[b % len(_TOKEN_BYTES)] for b in raw))


versions = st.tuples(*(st.integers(0, 0xFFFF) for _ in range(3)))


@st.composite
def defaults(draw: st.DrawFn) -> tuple[Action | None, tuple[tuple[Op, Action], ...]]:
    """A global default and per-op defaults that satisfy the parser's coverage rule."""
    global_default = draw(st.none() | actions)
    if global_default is None:
        covered = POLICY_OPS
    else:
        covered = tuple(draw(st.lists(policy_ops, unique=True, max_size=len(POLICY_OPS))))
    op_defaults = tuple(sorted(((op, draw(actions)) for op in covered), key=lambda pair: pair[0]))
    return global_default, op_defaults


@st.composite
def policies(
    draw: st.DrawFn,
    *,
    max_rules: int = 12,
    max_pool: int = 6,
    allow_long_digests: bool = True,
    ops: st.SearchStrategy[Op] | None = None,
) -> Policy:
    """Random valid policies (see the module doc).

    Unless `ops` is given, each policy's rules use one to three ops, so that one op's
    rules interact (first match, shapes) more often than in a spread over all seven.
    """
    pool = draw(st.lists(digests(allow_long=allow_long_digests), min_size=1, max_size=max_pool))
    if ops is None:
        ops = st.sampled_from(draw(st.lists(policy_ops, min_size=1, max_size=3, unique=True)))
    global_default, op_defaults = draw(defaults())
    return Policy(
        name=draw(policy_names()),
        version=draw(versions),
        global_default=global_default,
        op_defaults=op_defaults,
        rules=tuple(draw(st.lists(rules(pool, ops=ops), max_size=max_rules))),
    )


def _random_digest(rnd: random.Random) -> Digest:
    alg = rnd.choice((b"sha256", b"sha512"))
    return Digest(alg, rnd.randbytes(32 if alg == b"sha256" else 64))


def _random_digest_rule(rnd: random.Random, pool: list[Digest]) -> Rule:
    kind = rnd.random()
    props: list[Property] = []
    if kind < 0.9:
        props.append(DigestProperty(DigestKey.FSVERITY_DIGEST, rnd.choice(pool)))
    if kind >= 0.75:
        props.append(DigestProperty(DigestKey.DMVERITY_ROOTHASH, rnd.choice(pool)))
    for key in BoolKey:
        if rnd.random() < 0.1:
            props.append(BoolProperty(key, rnd.random() < 0.5))
    if rnd.random() < 0.05:
        props.append(rnd.choice(props))  # a duplicate
    rnd.shuffle(props)
    op = Op.EXECUTE if rnd.random() < 0.8 else rnd.choice(POLICY_OPS)
    return Rule(op, tuple(props), rnd.choice(list(Action)))


def _random_bool_rule(rnd: random.Random) -> Rule:
    """A rule on the three booleans only: it matches one file in eight."""
    props = tuple(BoolProperty(key, rnd.random() < 0.5) for key in BoolKey)
    return Rule(rnd.choice(POLICY_OPS), props, rnd.choice(list(Action)))


@st.composite
def large_policies(draw: st.DrawFn, *, min_rules: int = 2000, max_rules: int = 5000) -> Policy:
    """Policies with thousands of rules, mostly fs-verity / dm-verity digest rules.

    Digests repeat across rules; a few boolean-only rules stand at random places and a
    few more at the end (the usual "boot_verified=TRUE action=ALLOW" tail), so that
    deep digest rules still decide many events.
    """
    rnd = random.Random(draw(st.integers(0, 2**64 - 1)))  # one seed, not thousands of draws
    count = draw(st.integers(min_rules, max_rules))
    pool = [_random_digest(rnd) for _ in range(max(1, count * 3 // 4))]
    rules = [_random_digest_rule(rnd, pool) for _ in range(count - 8)]
    for _ in range(3):
        rules.insert(rnd.randrange(len(rules) + 1), _random_bool_rule(rnd))
    rules += [_random_bool_rule(rnd) for _ in range(5)]
    global_default, op_defaults = draw(defaults())
    return Policy(
        name=b"large",
        version=(1, 0, 0),
        global_default=global_default,
        op_defaults=op_defaults,
        rules=tuple(rules),
    )


def policy_digests(policy: Policy) -> list[Digest]:
    """Every digest the policy names, in order of first appearance."""
    seen: dict[Digest, None] = {}
    for rule in policy.rules:
        for prop in rule.properties:
            if isinstance(prop, DigestProperty):
                seen.setdefault(prop.digest)
    return list(seen)


def _flip_byte(digest: Digest, at: int) -> Digest:
    if not digest.value:
        return Digest(digest.alg, b"\x00")
    i = at % len(digest.value)
    value = digest.value[:i] + bytes([digest.value[i] ^ 0x01]) + digest.value[i + 1 :]
    return Digest(digest.alg, value)


def _near(digest: Digest) -> st.SearchStrategy[Digest]:
    """The digest itself or a near miss of it."""
    return st.one_of(
        st.just(digest),
        st.just(digest),
        st.just(Digest(digest.alg.swapcase(), digest.value)),
        st.integers(0, 255).map(lambda at: _flip_byte(digest, at)),
        st.just(Digest(digest.alg, digest.value[:-1])),
        st.just(Digest(digest.alg + b"-", digest.value)),
    )


def _representable(digest: Digest | None) -> Digest | None:
    if digest is None or len(digest.alg) > ALG_MAX or len(digest.value) > DIGEST_MAX:
        return None
    return digest


def _file_digests(policy: Policy | None) -> st.SearchStrategy[Digest | None]:
    own = policy_digests(policy) if policy is not None else []
    choices: list[st.SearchStrategy[Digest | None]] = [st.none(), digests(allow_long=False)]
    if own:
        choices += [st.sampled_from(own).flatmap(_near)] * 3
    return st.one_of(*choices).map(_representable)


def _aimed_at(rule: Rule) -> dict[str, object]:
    """Attribute values that satisfy `rule`'s properties (the last one wins on a conflict)."""
    fields: dict[str, object] = {}
    for prop in rule.properties:
        if isinstance(prop, BoolProperty):
            fields[prop.key.value] = prop.value
        else:
            fields[prop.key.value] = _representable(prop.digest)
    return fields


@st.composite
def file_attributes(draw: st.DrawFn, policy: Policy | None = None) -> FileAttributes:
    """What the kernel can report about an event's file (see the module doc).

    Given a policy with rules, half the draws aim at one of its rules: the attributes
    satisfy that rule (unless its properties conflict), before one random field may be
    redrawn. About one in eight draws is an event with no file; its other fields are
    random anyway (a correct consumer ignores them).
    """
    fields: dict[str, object] = {
        "boot_verified": draw(st.booleans()),
        "dmverity_roothash": draw(_file_digests(policy)),
        "dmverity_signature": draw(st.booleans()),
        "fsverity_digest": draw(_file_digests(policy)),
        "fsverity_signature": draw(st.booleans()),
    }
    if policy is not None and policy.rules and draw(st.booleans()):
        fields.update(_aimed_at(draw(st.sampled_from(policy.rules))))
        if draw(st.booleans()):
            name = draw(st.sampled_from(sorted(fields)))
            fields[name] = draw(st.booleans() if name.endswith(("verified", "signature")) else _file_digests(policy))
    return FileAttributes(has_file=draw(st.integers(0, 7)) != 0, **fields)  # type: ignore[arg-type]
