"""The canonical formatter is the parser's inverse: parse(format(p)) == p."""

from __future__ import annotations

from hypothesis import given, settings

from ipe_bpf.policy.model import Policy
from ipe_bpf.policy.parser import format_policy, parse_policy

from .strategies import policies


@settings(max_examples=300)
@given(policies(max_rules=20))
def test_parse_inverts_format(policy: Policy) -> None:
    text = format_policy(policy)
    parsed = parse_policy(text)
    assert parsed == policy
    assert [rule.line for rule in parsed.rules] == list(
        range(len(text.splitlines()) - len(policy.rules) + 1, len(text.splitlines()) + 1)
    )
    assert format_policy(parsed) == text
