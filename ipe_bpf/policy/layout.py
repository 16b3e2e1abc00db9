"""The structs and constants shared with the BPF program, read from bpf/ipe_bpf.h.

Nothing here restates a layout: `load_header()` parses the header and computes every
struct's field offsets, size and alignment with the C rules of the BPF target (each
scalar aligned to its own size, a struct to its widest member, trailing padding up to
that alignment); the resulting values (`StructLayout`, `Header`, typed views) are defined in
`ipe_bpf.policy.structs`.

The parser accepts a small, strict subset of C and rejects anything else with a
`HeaderError` naming the line, so a construct it does not understand can never be
skipped silently:

    /* comments */  // comments
    #ifndef NAME    #endif    #define NAME            (include guard only)
    #define NAME <int>        (decimal or 0x hex literal, or a NAME defined before)
    struct NAME { <type> NAME; <type> NAME[<int or NAME>]; ... };
    <type> := __u8 | __u16 | __u32 | __u64 | char
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from .structs import TYPES, Field, FieldValue, Header, HeaderError, StructLayout, StructView

__all__ = [
    "Field",
    "FieldValue",
    "Header",
    "HeaderError",
    "StructLayout",
    "StructView",
    "abi_constant",
    "default_header",
    "default_header_path",
    "load_header",
    "parse_header",
]

# ---------------------------------------------------------------- parsing

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_INT = r"0[xX][0-9a-fA-F]+|[0-9]+"
_TOKEN = re.compile(rf"\s*(?:({_IDENT})|({_INT})|([{{}}\[\];]))")
_DIRECTIVE = re.compile(rf"#\s*(\w+)(?:\s+({_IDENT}))?(?:\s+(\S+))?\s*$")


class _Token(NamedTuple):  # not a dataclass: the header is parsed on every start (20 ms in the VM)
    text: str
    line: int


_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*|/\*", re.DOTALL)


def _strip_comments(text: str) -> str:
    """Blank out comments, keeping newlines so line numbers stay right."""

    def blank(m: re.Match[str]) -> str:
        if m.group() == "/*":
            raise HeaderError("unterminated comment", text.count("\n", 0, m.start()) + 1)
        return re.sub(r"[^\n]", " ", m.group())

    return _COMMENT.sub(blank, text)


def _int_value(text: str, constants: Mapping[str, int], line: int) -> int:
    if re.fullmatch(r"0[0-9]+", text):
        raise HeaderError(f"octal literals are not supported: {text!r}", line)
    if re.fullmatch(_INT, text):
        return int(text, 0)
    if text in constants:
        return constants[text]
    raise HeaderError(f"not an integer literal or known constant: {text!r}", line)


def _directive(line_text: str, line: int, constants: dict[str, int], guards: list[str]) -> None:
    m = _DIRECTIVE.match(line_text)
    if m is None:
        raise HeaderError(f"unsupported preprocessor line: {line_text.strip()!r}", line)
    word, name, value = m.groups()
    if word == "ifndef" and name and value is None:
        guards.append(name)
    elif word == "endif" and name is None and value is None:
        if not guards:
            raise HeaderError("#endif without #ifndef", line)
        guards.pop()
    elif word == "define" and name and value is None:
        if name not in guards:
            raise HeaderError(f"#define {name} without a value is only allowed as the include guard", line)
    elif word == "define" and name and value is not None:
        if name in constants:
            raise HeaderError(f"{name} defined twice", line)
        constants[name] = _int_value(value, constants, line)
    else:
        raise HeaderError(f"unsupported preprocessor line: {line_text.strip()!r}", line)


def _tokens(code: Sequence[tuple[int, str]]) -> list[_Token]:
    out: list[_Token] = []
    for line, text in code:
        at, end = 0, len(text.rstrip())
        while at < end:
            m = _TOKEN.match(text, at)
            if m is None:
                raise HeaderError(f"unsupported syntax near {text[at:].strip()!r}", line)
            out.append(_Token(m.group(m.lastindex or 0), line))
            at = m.end()
    return out


class _Cursor:
    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._at = 0

    def done(self) -> bool:
        return self._at >= len(self._tokens)

    def line(self) -> int | None:
        if self._tokens:
            return self._tokens[min(self._at, len(self._tokens) - 1)].line
        return None

    def take(self, expected: str | None = None) -> str:
        if self.done():
            raise HeaderError("unexpected end of header", self.line())
        token = self._tokens[self._at]
        if expected is not None and token.text != expected:
            raise HeaderError(f"expected {expected!r}, got {token.text!r}", token.line)
        self._at += 1
        return token.text

    def peek(self) -> str | None:
        return None if self.done() else self._tokens[self._at].text

    def ident(self) -> str:
        line = self.line()
        text = self.take()
        if not re.fullmatch(_IDENT, text):
            raise HeaderError(f"expected a name, got {text!r}", line)
        return text


def _parse_struct(cur: _Cursor, constants: Mapping[str, int]) -> StructLayout:
    cur.take("struct")
    name = cur.ident()
    cur.take("{")
    members: list[tuple[str, str, int | None]] = []
    while cur.peek() != "}":
        line = cur.line()
        ctype = cur.take()
        if ctype not in TYPES:
            raise HeaderError(f"unsupported member type {ctype!r} in struct {name}", line)
        member = cur.ident()
        count: int | None = None
        if cur.peek() == "[":
            cur.take("[")
            count = _int_value(cur.take(), constants, line or 0)
            if count <= 0:
                raise HeaderError(f"{name}.{member}: array size must be positive", line)
            cur.take("]")
        cur.take(";")
        if member in {m[0] for m in members}:
            raise HeaderError(f"struct {name}: member {member} declared twice", line)
        members.append((member, ctype, count))
    cur.take("}")
    cur.take(";")
    if not members:
        raise HeaderError(f"struct {name} has no members", cur.line())
    return _lay_out(name, members)


def _lay_out(name: str, members: Sequence[tuple[str, str, int | None]]) -> StructLayout:
    fields: list[Field] = []
    at = 0
    for member, ctype, count in members:
        align = TYPES[ctype].size
        at = -(-at // align) * align
        f = Field(member, ctype, count, at)
        fields.append(f)
        at += f.size
    align = max(f.align for f in fields)
    size = -(-at // align) * align
    return StructLayout(name, tuple(fields), size, align)


def parse_header(text: str) -> Header:
    """Parse the header's constants and structs (see the module doc for the accepted subset)."""
    constants: dict[str, int] = {}
    structs: dict[str, StructLayout] = {}
    guards: list[str] = []
    code: list[tuple[int, str]] = []
    for number, line_text in enumerate(_strip_comments(text).split("\n"), start=1):
        if line_text.rstrip().endswith("\\"):
            raise HeaderError("line continuations are not supported", number)
        if line_text.lstrip().startswith("#"):
            _directive(line_text.strip(), number, constants, guards)
        else:
            code.append((number, line_text))
    if guards:
        raise HeaderError(f"#ifndef {guards[-1]} is never closed")
    cur = _Cursor(_tokens(code))
    while not cur.done():
        line = cur.line()
        if cur.peek() != "struct":
            raise HeaderError(f"expected a struct definition, got {cur.peek()!r}", line)
        layout = _parse_struct(cur, constants)
        if layout.name in structs:
            raise HeaderError(f"struct {layout.name} defined twice", line)
        structs[layout.name] = layout
    return Header(MappingProxyType(constants), MappingProxyType(structs))


def default_header_path() -> Path:
    """bpf/ipe_bpf.h of the source tree, or of the installed package."""
    from ..bpf_files import HEADER, bpf_file

    return bpf_file(HEADER)


@lru_cache(maxsize=1)
def default_header() -> Header:
    """The source tree's header, parsed once per process."""
    return load_header()


def abi_constant(name: str) -> int:
    """A `#define` of the default header: how Python reads every number it shares with C."""
    return default_header().constant(name)


def load_header(path: Path | None = None) -> Header:
    """Read and parse the shared header (the source tree's bpf/ipe_bpf.h by default)."""
    path = default_header_path() if path is None else path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HeaderError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return parse_header(text)
    except HeaderError as exc:
        raise exc.located(str(path)) from None
