"""Warnings about policies the kernel accepts but that almost certainly say something else
than their author meant (docs/policy-language.md, section 5)."""

from __future__ import annotations

from dataclasses import dataclass

from .model import BoolProperty, DigestProperty, Policy, Rule


@dataclass(frozen=True)
class Finding:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def nul_truncation(data: bytes) -> Finding | None:
    """A NUL byte with policy text after it: the kernel stops at the NUL, dropping the rest."""
    at = data.find(b"\0")
    if at < 0 or not data[at + 1 :].strip(b"\0 \t\r\n"):
        return None
    before = data[:at]
    line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
    return Finding(line, f"a NUL byte ends the policy here: the kernel ignores the {len(data) - at - 1} "
                         f"bytes after it, rules included")


def never_matches(rule: Rule) -> str | None:
    """Why `rule` can match no file, or None."""
    bools: dict[object, bool] = {}
    digests: dict[object, object] = {}
    for prop in rule.properties:
        if isinstance(prop, BoolProperty):
            if bools.setdefault(prop.key, prop.value) != prop.value:
                return f"{prop.key.value}=TRUE and {prop.key.value}=FALSE"
        elif isinstance(prop, DigestProperty):
            if digests.setdefault(prop.key, prop.digest) != prop.digest:
                return f"two different {prop.key.value} values (a file has one)"
    return None


def lint(data: bytes, policy: Policy) -> list[Finding]:
    """Every warning for the policy text `data`, which parsed as `policy`."""
    found = [f for f in (nul_truncation(data),) if f is not None]
    for rule in policy.rules:
        why = never_matches(rule)
        if why is not None:
            found.append(Finding(rule.line, f"this rule can never match: {why}"))
    return sorted(found, key=lambda f: f.line)
