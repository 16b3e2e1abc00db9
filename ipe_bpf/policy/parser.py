"""IPE policy text parser: the grammar of Linux 6.12's security/ipe/policy_parser.c.

Every rule of docs/policy-language.md (sections 1-3) is reproduced, including its errno classes: syntax errors
are EBADMSG, a non-numeric version component or bad digest hex is EINVAL, a version
component above 65535 is ERANGE. The first failing line wins; the coverage check
(a global DEFAULT, or a DEFAULT for every op) runs last.
"""

from __future__ import annotations

import re

import difflib
from collections.abc import Iterator

from ..errors import PolicyError
from .bulk import without_gc
from .model import (
    POLICY_OPS,
    Action,
    BoolKey,
    BoolProperty,
    Digest,
    DigestKey,
    DigestProperty,
    DigestRow,
    Op,
    Policy,
    Property,
    Rule,
    RuleList,
)

_KERNEL_ISSPACE = frozenset(b"\t\n\v\f\r \xa0")
_TOKEN_SEPARATORS = b" \t"
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_U16_MAX = 0xFFFF
_U64_MAX = (1 << 64) - 1

_OPS = {f"op={op.name}".encode(): op for op in POLICY_OPS}
_ACTIONS = {f"action={act.name}".encode(): act for act in Action}
_BOOL_PROPERTIES = {
    f"{key.value}={word}".encode(): BoolProperty(key, word == "TRUE")
    for key in BoolKey
    for word in ("TRUE", "FALSE")
}
_DIGEST_PREFIXES = {f"{key.value}=".encode(): key for key in DigestKey}

# The line every allowlist is made of, written canonically (single spaces, no comment, a plain
# algorithm name, even-length hex): read in one match.  Any other line takes the general path,
# which gives the same rule for this one (tests/unit/test_fast_paths.py).
_ONE_DIGEST_RULE = re.compile(
    b"op=(" + b"|".join(op.name.encode() for op in POLICY_OPS) + b") ("
    + b"|".join(key.value.encode() for key in DigestKey) + b")=([0-9A-Za-z_-]+):([0-9a-fA-F]+) action=("
    + b"|".join(act.name.encode() for act in Action) + b")"
)
_OP_NAMES = {op.name.encode(): op for op in POLICY_OPS}
_ACTION_NAMES = {act.name.encode(): act for act in Action}
_DIGEST_KEYS = {key.value.encode(): key for key in DigestKey}


def _fail(errno_name: str, line: int, message: str) -> PolicyError:
    return PolicyError(errno_name, message, line=line)


_SHOWN_MAX = 64  # longest token echoed whole in an error message


def _show(token: bytes) -> str:
    """A token quoted for an error message, unprintable bytes escaped, long ones cut."""
    if len(token) <= _SHOWN_MAX:
        return repr(token.decode("latin-1"))
    return f"{token[:_SHOWN_MAX - 16].decode('latin-1')!r}... ({len(token)} bytes)"


_LINE_END = re.compile(rb"[\r\n]")


def _lines(text: bytes) -> Iterator[tuple[int, bytes]]:
    """(editor line number, line) for every line the kernel parses.

    The kernel splits on each CR and each LF; a CRLF pair counts as one line here so
    that numbers match what an editor shows.
    """
    if b"\r" not in text:
        return enumerate(text.split(b"\n"), 1)
    return _lines_with_cr(text)


def _lines_with_cr(text: bytes) -> Iterator[tuple[int, bytes]]:
    number = 1
    start = 0
    for match in _LINE_END.finditer(text):
        index = match.start()
        yield number, text[start:index]
        start = index + 1
        crlf_second_half = text[index] == 0x0A and index > 0 and text[index - 1] == 0x0D
        if not crlf_second_half:
            number += 1
    yield number, text[start:]


def _clean(line: bytes) -> bytes:
    """Drop a comment, then trailing bytes for which the kernel's isspace() holds."""
    line = line.split(b"#", 1)[0]
    end = len(line)
    while end > 0 and line[end - 1] in _KERNEL_ISSPACE:
        end -= 1
    return line[:end]


def _tokens(line: bytes) -> list[bytes]:
    """Split on space and tab only; empty pieces (runs of separators) are dropped."""
    return [t for t in line.replace(b"\t", b" ").split(b" ") if t]


def _parse_u16(component: bytes, line: int) -> int:
    """kstrtou16(s, 10): one optional '+', decimal digits only, value <= 65535.

    Like the kernel, a digit run that overflows 64 bits is ERANGE even when junk
    follows it; otherwise junk is EINVAL before the 16-bit range is checked.
    """
    digits = component[1:] if component.startswith(b"+") else component
    run = len(digits) - len(digits.lstrip(b"0123456789"))
    value = int(digits[:run]) if run else 0
    if value > _U64_MAX:
        raise _fail("ERANGE", line, f"version component {_show(component)} is out of range")
    if run == 0 or run != len(digits):
        raise _fail("EINVAL", line, f"version component {_show(component)} is not a decimal number")
    if value > _U16_MAX:
        raise _fail("ERANGE", line, f"version component {_show(component)} exceeds 65535")
    return value


def _parse_version(value: bytes, line: int) -> tuple[int, int, int]:
    parts: list[int] = []
    for component in value.split(b"."):
        if len(parts) == 3:
            raise _fail("EBADMSG", line, f"policy_version {_show(value)} has more than 3 components")
        parts.append(_parse_u16(component, line))
    if len(parts) != 3:
        raise _fail("EBADMSG", line, f"policy_version {_show(value)} needs 3 components")
    return parts[0], parts[1], parts[2]


def _parse_header(line: bytes, number: int) -> tuple[bytes, tuple[int, int, int]]:
    """`policy_name=<NAME> policy_version=<A>.<B>.<C>`, exactly, in this order."""
    expected = (b"policy_name=", b"policy_version=")
    name = b""
    version = (0, 0, 0)
    tokens = _tokens(line)
    for index, token in enumerate(tokens):
        if index >= len(expected):
            raise _fail("EBADMSG", number, f"unexpected token {_show(token)} after the policy header")
        prefix = expected[index]
        if not token.startswith(prefix) or len(token) == len(prefix):
            want = "policy_name=<name>" if index == 0 else "policy_version=<a>.<b>.<c>"
            raise _fail("EBADMSG", number, f"expected {want}, found {_show(token)}")
        if index == 0:
            name = token[len(prefix):]
        else:
            version = _parse_version(token[len(prefix):], number)
    if len(tokens) != len(expected):
        raise _fail("EBADMSG", number, "the header needs policy_name=<name> policy_version=<a>.<b>.<c>")
    return name, version


def _parse_digest(value: bytes, token: bytes, number: int) -> Digest:
    alg, colon, hex_text = value.partition(b":")
    if not colon:
        raise _fail("EBADMSG", number, f"digest {_show(token)} is not <alg>:<hex>")
    if len(hex_text) % 2 or not _HEX_DIGITS.issuperset(hex_text):
        raise _fail("EINVAL", number, f"digest {_show(token)} has invalid hex")
    return Digest(alg, bytes.fromhex(hex_text.decode("ascii")))


def _parse_property(token: bytes, number: int) -> Property:
    if token in _BOOL_PROPERTIES:
        return _BOOL_PROPERTIES[token]
    for prefix, key in _DIGEST_PREFIXES.items():
        if token.startswith(prefix) and len(token) > len(prefix):
            return DigestProperty(key, _parse_digest(token[len(prefix):], token, number))
    if token.startswith(b"op="):
        raise _fail("EBADMSG", number, f"a second op= ({_show(token)}): a line has one op")
    if token == b"DEFAULT":
        raise _fail("EBADMSG", number, "DEFAULT must be the first token of its line")
    raise _fail("EBADMSG", number, f"unknown property {_show(token)}{_did_you_mean(token, _PROPERTY_KEYS)}")


_PROPERTY_KEYS = (*(key.value for key in BoolKey), *(key.value for key in DigestKey))


def _did_you_mean(token: bytes, keys: tuple[str, ...]) -> str:
    """' (did you mean KEY?)' for a token whose key is a near miss of a known one."""
    key = token.split(b"=", 1)[0].decode("latin-1")
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close and close[0] != key else ""


class _Builder:
    """Accumulates rules and defaults line by line, enforcing one default per slot."""

    def __init__(self) -> None:
        self.global_default: Action | None = None
        self.op_defaults: dict[Op, Action] = {}
        self.rules: list[Rule | DigestRow] = []

    def add_line(self, line: bytes, number: int) -> None:
        tokens = _tokens(line)
        *body, last = tokens
        is_default = bool(body) and body[0] == b"DEFAULT"
        if is_default:
            body = body[1:]
        op: Op | None = None
        properties: list[Property] = []
        for token in body:
            if op is None:
                if token not in _OPS:
                    want = "op=<OP>" if is_default or token is not tokens[0] else "DEFAULT or op=<OP>"
                    hint = _did_you_mean(token, ("op", "DEFAULT", *_PROPERTY_KEYS))
                    raise _fail("EBADMSG", number, f"expected {want}, found {_show(token)}{hint}")
                op = _OPS[token]
            elif token in _ACTIONS:
                raise _fail("EBADMSG", number, f"{_show(token)} must be the last token of the line")
            else:
                properties.append(_parse_property(token, number))
        if last not in _ACTIONS:
            raise _fail("EBADMSG", number, f"a line must end in action=ALLOW or action=DENY, found {_show(last)}")
        action = _ACTIONS[last]
        if is_default:
            self._add_default(op, action, properties, number)
        elif op is None:
            raise _fail("EBADMSG", number, "a rule must start with op=<OP>")
        else:
            self.rules.append(Rule(op, tuple(properties), action, number))

    def _add_default(self, op: Op | None, action: Action, properties: list[Property], number: int) -> None:
        if properties:
            raise _fail("EBADMSG", number, f"DEFAULT takes no properties, found {str(properties[0])!r}")
        if op is None:
            if self.global_default is not None:
                raise _fail("EBADMSG", number, "a second global DEFAULT")
            self.global_default = action
        else:
            if op in self.op_defaults:
                raise _fail("EBADMSG", number, f"a second DEFAULT for op={op.name}")
            self.op_defaults[op] = action

    def covers_every_op(self) -> bool:
        return self.global_default is not None or all(op in self.op_defaults for op in POLICY_OPS)


@without_gc
def parse_policy(data: bytes) -> Policy:
    """Parse policy text (the signed payload or a plain file) into a Policy.

    Raises PolicyError with the errno name and the 1-based line of the first failure.
    """
    if not data:
        raise PolicyError("EBADMSG", "the policy is empty")
    text = data.split(b"\0", 1)[0]
    header: tuple[bytes, tuple[int, int, int]] | None = None
    builder = _Builder()
    fast, rules = _ONE_DIGEST_RULE.fullmatch, builder.rules
    for number, raw in _lines(text):
        if header is not None and (match := fast(raw)) is not None:  # inline: it runs per line
            op, key, alg, hex_text, action = match.groups()
            if not len(hex_text) & 1:  # odd: the general path names the error
                rules.append(DigestRow((_OP_NAMES[op], _DIGEST_KEYS[key], alg, bytes.fromhex(hex_text.decode()),
                                        _ACTION_NAMES[action], number)))
                continue
        line = _clean(raw)
        if not line:
            continue
        if header is None:
            header = _parse_header(line, number)
        else:
            builder.add_line(line, number)
    if header is None:
        raise PolicyError("EBADMSG", "no policy header (policy_name=<name> policy_version=<a>.<b>.<c>)")
    if not builder.covers_every_op():
        raise PolicyError("EBADMSG", "no global DEFAULT and not every op has a DEFAULT")
    return Policy(
        name=header[0],
        version=header[1],
        global_default=builder.global_default,
        op_defaults=tuple(sorted(builder.op_defaults.items())),
        rules=RuleList(builder.rules),
    )


def format_policy(policy: Policy) -> bytes:
    """The canonical text of a policy: header, defaults, then rules in file order."""
    lines = [b"policy_name=" + policy.name + b" policy_version=" + policy.version_text.encode()]
    if policy.global_default is not None:
        lines.append(f"DEFAULT action={policy.global_default.name}".encode())
    for op, action in policy.op_defaults:
        lines.append(f"DEFAULT op={op.name} action={action.name}".encode())
    lines.extend(format_rule(rule) for rule in policy.rules)
    return b"\n".join(lines) + b"\n"


def format_rule(rule: Rule) -> bytes:
    parts = [f"op={rule.op.name}".encode()]
    for prop in rule.properties:
        if isinstance(prop, BoolProperty):
            parts.append(str(prop).encode())
        else:
            parts.append(f"{prop.key.value}=".encode() + prop.digest.alg + b":" + prop.digest.value.hex().encode())
    parts.append(f"action={rule.action.name}".encode())
    return b" ".join(parts)


def format_text(data: bytes) -> bytes:
    """`data` with every policy line in canonical form, comments and line order kept.

    The policy must parse (PolicyError otherwise).  Line ends become LF; what follows a NUL
    byte (which the kernel ignores) is dropped.
    """
    policy = parse_policy(data)
    rules = {rule.line: rule for rule in policy.rules}
    out: list[bytes] = []
    seen_header = False
    for number, raw in _lines(data.split(b"\0", 1)[0].replace(b"\r\n", b"\n")):
        code, hash_mark, comment = raw.partition(b"#")
        tokens = _tokens(_clean(code))
        if not tokens:
            line = b""
        elif not seen_header:
            line, seen_header = b"policy_name=" + policy.name + b" policy_version=" + policy.version_text.encode(), True
        elif number in rules:
            line = format_rule(rules[number])
        else:
            line = b" ".join(tokens)  # a DEFAULT line: its tokens, single-spaced
        if hash_mark:
            line += (b"  " if line else b"") + b"#" + _clean(comment)
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return b"\n".join(out) + b"\n"
