"""Policy text from grants: one rule per digest or volume, each under comments naming its files.

The output is deterministic (rules sorted by op and first file, files sorted, no dates), and
always checked with the project's own parser before it is returned.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import PolicyError
from ..policy.model import Action, Digest, DigestKey, DigestProperty, Op, Policy, Rule
from ..policy.parser import format_rule, parse_policy

_NAME = re.compile(rb"^[\x21-\x7e]+$")
_VERSION_TOKEN = re.compile(rb"(?<![^ \t])policy_version=\S+")


@dataclass(frozen=True)
class Grant:
    """Allow `op` for files with `prop`; `paths` name them, `notes` add comment lines."""

    op: Op
    prop: DigestProperty
    paths: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def rule(self) -> Rule:
        return Rule(self.op, (self.prop,), Action.ALLOW)


def fsverity_grant(op: Op, alg: str, digest: bytes, path: str, notes: tuple[str, ...] = ()) -> Grant:
    return Grant(op, DigestProperty(DigestKey.FSVERITY_DIGEST, Digest(alg.encode(), digest)), (path,), notes)


def volume_grant(op: Op, roothash: Digest, path: str, notes: tuple[str, ...] = ()) -> Grant:
    return Grant(op, DigestProperty(DigestKey.DMVERITY_ROOTHASH, roothash), (path,), notes)


def merge_grants(grants: Iterable[Grant]) -> list[Grant]:
    """One grant per (op, property): files and notes united and sorted; grants sorted."""
    merged: dict[tuple[Op, DigestProperty], tuple[set[str], set[str]]] = {}
    for g in grants:
        paths, notes = merged.setdefault((g.op, g.prop), (set(), set()))
        paths.update(g.paths)
        notes.update(g.notes)
    out = [Grant(op, prop, tuple(sorted(paths)), tuple(sorted(notes))) for (op, prop), (paths, notes) in merged.items()]
    return sorted(out, key=lambda g: (g.op, g.prop.key.value != "dmverity_roothash", g.paths, str(g.prop)))


def comment(text: str) -> bytes:
    """`# text`, with bytes that would end or confuse a policy line (CR, LF, controls) escaped."""
    raw = os.fsencode(text)
    out = bytearray(b"# ")
    for byte in raw:
        if byte == 0x5C:
            out += b"\\\\"
        elif byte < 0x20 or byte == 0x7F:
            out += b"\\x%02x" % byte
        else:
            out.append(byte)
    return bytes(out) + b"\n"


def grant_text(g: Grant) -> bytes:
    lines = [comment(path) for path in g.paths] + [comment(note) for note in g.notes]
    return b"".join(lines) + format_rule(g.rule) + b"\n"


def rules_text(grants: Iterable[Grant]) -> bytes:
    return b"\n".join(grant_text(g) for g in merge_grants(grants))


def check(text: bytes) -> Policy:
    """Parse what was generated; a failure here is a bug of the generator, said as such."""
    try:
        return parse_policy(text)
    except PolicyError as err:
        raise PolicyError(err.errno_name, f"generated policy does not parse: {err}") from None


def parse_version(value: str) -> tuple[int, int, int]:
    parts = value.split(".")
    if len(parts) != 3 or not all(p.isdigit() and int(p) <= 0xFFFF for p in parts):
        raise PolicyError("EINVAL", f"policy version {value!r} is not MAJOR.MINOR.PATCH (each 0..65535)")
    return int(parts[0]), int(parts[1]), int(parts[2])


def policy_text(name: str, version: str, grants: Iterable[Grant], header: Iterable[str] = (),
                ops: Iterable[Op] = (Op.EXECUTE,)) -> bytes:
    """A whole policy: header comments, `DEFAULT action=ALLOW`, DENY for each governed op, rules."""
    raw_name = name.encode()
    if not _NAME.match(raw_name):
        raise PolicyError("EINVAL", f"policy name {name!r} must be printable ASCII without spaces")
    parse_version(version)
    head = b"".join(comment(line) for line in header)
    defaults = b"".join(f"DEFAULT op={op.name} action=DENY\n".encode() for op in sorted(set(ops)))
    body = rules_text(grants)
    text = (head + f"policy_name={name} policy_version={version}\n".encode() + b"DEFAULT action=ALLOW\n"
            + defaults + (b"\n" + body if body else b""))
    check(text)
    return text


def bumped(version: tuple[int, int, int]) -> tuple[int, int, int]:
    major, minor, patch = version
    if patch < 0xFFFF:
        return major, minor, patch + 1
    if minor < 0xFFFF:
        return major, minor + 1, 0
    if major < 0xFFFF:
        return major + 1, 0, 0
    raise PolicyError("ERANGE", "policy version 65535.65535.65535 cannot be bumped")


def merged_text(base: bytes, grants: Iterable[Grant], header: Iterable[str] = ()) -> bytes:
    """`base` with its version bumped and the grants' rules appended (its own lines untouched)."""
    policy = check(base)
    version = "%d.%d.%d" % bumped(policy.version)
    lines = base.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.split(b"#", 1)[0].strip():
            lines[i] = _VERSION_TOKEN.sub(f"policy_version={version}".encode(), line, count=1)
            break
    text = b"".join(lines)
    if not text.endswith(b"\n"):
        text += b"\n"
    body = rules_text(grants)
    if body:
        text += b"\n" + b"".join(comment(line) for line in header) + (b"\n" if header else b"") + body
    check(text)
    return text
