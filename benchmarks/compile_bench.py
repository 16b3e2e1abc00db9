#!/usr/bin/env python3
"""Compile time and table size of the policy compiler for 10, 1k and 100k rules.

A script, not a test:  python3 benchmarks/compile_bench.py [--sizes 10,1000,100000] [--seed N]

Policies mix the rule kinds a real deployment has: fs-verity digest allowlist entries
(60 %), dm-verity root hash rules, some requiring a signed volume (25 %), and boolean-only
rules over boot_verified / dmverity_signature / fsverity_signature (15 %), spread over
the ops with EXECUTE dominant. Reported per size: the time to compile and to encode one
slot as install writes them (packed; both also as process CPU time: wall time suffers on a busy machine), the number of map entries (digests, rules) and their key + value bytes, and the mean
time of one Python `lookup()` (the reference mirror, not the in-kernel cost).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipe_bpf.policy.compiler import compile_policy  # noqa: E402
from ipe_bpf.policy.lookup import lookup  # noqa: E402
from ipe_bpf.policy.model import (  # noqa: E402
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


def _digest(rnd: random.Random) -> Digest:
    if rnd.random() < 0.8:
        return Digest(b"sha256", rnd.randbytes(32))
    return Digest(b"sha512", rnd.randbytes(64))


def _op(rnd: random.Random) -> Op:
    return Op.EXECUTE if rnd.random() < 0.7 else rnd.choice(POLICY_OPS)


def _rule(rnd: random.Random, roothashes: list[Digest]) -> Rule:
    kind = rnd.random()
    props: list[Property] = []
    if kind < 0.60:
        props.append(DigestProperty(DigestKey.FSVERITY_DIGEST, _digest(rnd)))
        if rnd.random() < 0.2:
            props.append(BoolProperty(BoolKey.FSVERITY_SIGNATURE, True))
    elif kind < 0.85:
        props.append(DigestProperty(DigestKey.DMVERITY_ROOTHASH, rnd.choice(roothashes)))
        if rnd.random() < 0.5:
            props.append(BoolProperty(BoolKey.DMVERITY_SIGNATURE, True))
    else:
        for key in rnd.sample(list(BoolKey), rnd.randint(1, 3)):
            props.append(BoolProperty(key, rnd.random() < 0.7))
    return Rule(_op(rnd), tuple(props), Action.ALLOW if rnd.random() < 0.9 else Action.DENY)


def make_policy(count: int, seed: int) -> Policy:
    rnd = random.Random(seed)
    roothashes = [_digest(rnd) for _ in range(max(1, count // 50))]
    rules = tuple(_rule(rnd, roothashes) for _ in range(count))
    return Policy(b"bench", (1, 0, 0), Action.DENY, ((Op.POLICY, Action.ALLOW),), rules)


@dataclass(frozen=True)
class Row:
    rules: int
    compile_s: float
    compile_cpu_s: float
    encode_s: float
    encode_cpu_s: float
    digests: int
    rule_entries: int
    bytes: int
    lookup_us: float


def measure(count: int, seed: int) -> Row:
    policy = make_policy(count, seed)
    start, start_cpu = time.perf_counter(), time.process_time()
    compiled = compile_policy(policy)
    compiled_at, compiled_cpu = time.perf_counter(), time.process_time()
    tables = compiled.tables  # what install writes, packed
    encoded_at, encoded_cpu = time.perf_counter(), time.process_time()
    rnd = random.Random(seed + 1)
    digests = [p.digest for r in policy.rules for p in r.properties if isinstance(p, DigestProperty)] or [None]
    events = [
        FileAttributes(
            boot_verified=rnd.random() < 0.5,
            dmverity_roothash=rnd.choice(digests),
            fsverity_digest=rnd.choice(digests),
            fsverity_signature=rnd.random() < 0.5,
        )
        for _ in range(2000)
    ]
    lookup(compiled, Op.EXECUTE, events[0])  # builds the byte-level maps once
    lookup_start = time.perf_counter()
    for attrs in events:
        lookup(compiled, Op.EXECUTE, attrs)
    lookup_us = (time.perf_counter() - lookup_start) / len(events) * 1e6
    return Row(
        rules=count,
        compile_s=compiled_at - start,
        compile_cpu_s=compiled_cpu - start_cpu,
        encode_s=encoded_at - compiled_at,
        encode_cpu_s=encoded_cpu - compiled_cpu,
        digests=tables.digest_count,
        rule_entries=tables.rule_count,
        bytes=sum(map(len, (tables.digest_keys, tables.digest_values, tables.rule_keys, tables.rule_values))),
        lookup_us=lookup_us,
    )


def render(rows: list[Row]) -> str:
    head = f"{'rules':>8} {'compile s':>10} {'(cpu s)':>8} {'pack s':>9} {'(cpu s)':>8} {'digests':>8} {'rule ent.':>10} {'ent./rule':>9} {'bytes':>11} {'lookup us':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.rules:>8} {r.compile_s:>10.3f} {r.compile_cpu_s:>8.3f} {r.encode_s:>9.3f} {r.encode_cpu_s:>8.3f} {r.digests:>8} {r.rule_entries:>10}"
            f" {r.rule_entries / r.rules:>9.2f} {r.bytes:>11,} {r.lookup_us:>10.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,100000", help="comma-separated rule counts")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(render([measure(n, args.seed) for n in sizes]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
