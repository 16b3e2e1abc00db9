"""Layouts of the structs shared with the BPF program, derived from bpf/ipe_bpf.h.

Nothing here restates a layout: `load_header()` parses the header and computes every
struct's field offsets, size and alignment with the C rules of the BPF target (each
scalar aligned to its own size, a struct to its widest member, trailing padding up to
that alignment). From a `StructLayout` you get a `struct` format, byte packing and
unpacking, and a ctypes Structure with the same layout.

The parser accepts a small, strict subset of C and rejects anything else with a
`HeaderError` naming the line, so a construct it does not understand can never be
skipped silently:

    /* comments */  // comments
    #ifndef NAME    #endif    #define NAME            (include guard only)
    #define NAME <int>        (decimal or 0x hex literal, or a NAME defined before)
    struct NAME { <type> NAME; <type> NAME[<int or NAME>]; ... };
    <type> := __u8 | __u16 | __u32 | __u64 | char

Byte order is the host's (BPF maps are host-endian).
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from functools import lru_cache
from types import MappingProxyType
from typing import Generic, TypeVar

from ..errors import IpeBpfError

__all__ = [
    "Field",
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


class HeaderError(IpeBpfError):
    """bpf/ipe_bpf.h uses a construct the layout parser does not accept."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__("EINVAL", message, line=line)


@dataclass(frozen=True)
class _CType:
    code: str  # struct module code
    size: int
    ctype: type  # ctypes scalar type


_TYPES: Mapping[str, _CType] = MappingProxyType(
    {
        "__u8": _CType("B", 1, ctypes.c_uint8),
        "__u16": _CType("H", 2, ctypes.c_uint16),
        "__u32": _CType("I", 4, ctypes.c_uint32),
        "__u64": _CType("Q", 8, ctypes.c_uint64),
        "char": _CType("B", 1, ctypes.c_char),
    }
)

FieldValue = int | bytes | tuple[int, ...]


@dataclass(frozen=True)
class Field:
    """One member: `ctype name[count]` (count None for a scalar) at `offset`."""

    name: str
    ctype: str
    count: int | None
    offset: int

    @property
    def elem_size(self) -> int:
        return _TYPES[self.ctype].size

    @property
    def size(self) -> int:
        return self.elem_size * (1 if self.count is None else self.count)

    @property
    def align(self) -> int:
        return self.elem_size

    @property
    def is_bytes(self) -> bool:
        """Arrays of one-byte elements are packed from / unpacked to `bytes`."""
        return self.count is not None and self.elem_size == 1

    @property
    def format(self) -> str:
        if self.count is None:
            return _TYPES[self.ctype].code
        if self.is_bytes:
            return f"{self.count}s"
        return f"{self.count}{_TYPES[self.ctype].code}"

    def zero(self) -> FieldValue:
        if self.count is None:
            return 0
        return b"" if self.is_bytes else (0,) * self.count

    def check(self, value: FieldValue) -> FieldValue:
        """Reject a value that does not fit (struct would silently truncate bytes)."""
        if self.is_bytes:
            if not isinstance(value, bytes | bytearray) or len(value) > self.size:
                raise ValueError(f"{self.name}: expected at most {self.size} bytes, got {value!r}")
            return bytes(value)
        if self.count is None:
            if not isinstance(value, int) or not 0 <= value < 1 << (8 * self.elem_size):
                raise ValueError(f"{self.name}: {value!r} does not fit in {self.ctype}")
            return value
        if not isinstance(value, tuple) or len(value) != self.count:
            raise ValueError(f"{self.name}: expected a tuple of {self.count} values")
        return value


@dataclass(frozen=True)
class StructLayout:
    """A C struct's layout: its fields in declaration order, size and alignment."""

    name: str
    fields: tuple[Field, ...]
    size: int
    align: int

    @property
    def format(self) -> str:
        """A `struct` module format ('=' byte order, explicit 'x' padding) of exactly `size` bytes."""
        parts = ["="]
        at = 0
        for f in self.fields:
            if f.offset > at:
                parts.append(f"{f.offset - at}x")
            parts.append(f.format)
            at = f.offset + f.size
        if self.size > at:
            parts.append(f"{self.size - at}x")
        return "".join(parts)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"struct {self.name} has no field {name!r}")

    def packer(self, *names: str) -> Callable[..., bytes]:
        """A fast packer taking the values of `names` positionally; other fields are zero.

        Values are range-checked: a bytes value too long for its array, an int out of
        range for its type or a value of the wrong kind raises ValueError.
        """
        if len(set(names)) != len(names):
            raise ValueError("duplicate field names")
        fields = [self.field(n) for n in names]
        codec = struct.Struct(self.format)
        starts: dict[str, int] = {}
        template: list[int | bytes] = []
        for f in self.fields:
            starts[f.name] = len(template)
            zero = f.zero()
            template.extend(zero if isinstance(zero, tuple) else (zero,))
        scalars = [(i, starts[f.name]) for i, f in enumerate(fields) if not isinstance(f.zero(), tuple)]
        arrays = [(i, starts[f.name], f) for i, f in enumerate(fields) if isinstance(f.zero(), tuple)]
        limits = [(i, f.size, f.name) for i, f in enumerate(fields) if f.is_bytes]

        def pack(*values: FieldValue) -> bytes:
            if len(values) != len(fields):
                raise TypeError(f"expected {len(fields)} values, got {len(values)}")
            for i, size, name in limits:
                value = values[i]
                if not isinstance(value, bytes | bytearray) or len(value) > size:
                    raise ValueError(f"{self.name}.{name}: expected at most {size} bytes, got {value!r:.40}")
            args = template.copy()
            for i, at in scalars:
                args[at] = values[i]  # type: ignore[assignment]
            for i, at, f in arrays:
                args[at : at + (f.count or 0)] = f.check(values[i])  # type: ignore[assignment]
            try:
                return codec.pack(*args)
            except (struct.error, TypeError) as exc:
                raise ValueError(f"struct {self.name}: {exc}") from None

        return pack

    def pack(self, **values: FieldValue) -> bytes:
        """Pack named field values; fields not named are zero."""
        return self.packer(*values)(*values.values())

    def unpack(self, data: bytes) -> dict[str, FieldValue]:
        """Field values of `data` (one-byte arrays as raw bytes, zero padding included)."""
        if len(data) != self.size:
            raise ValueError(f"struct {self.name} is {self.size} bytes, got {len(data)}")
        flat = iter(struct.unpack(self.format, data))
        out: dict[str, FieldValue] = {}
        for f in self.fields:
            if f.count is None or f.is_bytes:
                out[f.name] = next(flat)
            else:
                out[f.name] = tuple(next(flat) for _ in range(f.count))
        return out

    def view(self, cls: "type[T]") -> "StructView[T]":
        """Typed access: `cls` is a dataclass with exactly this struct's fields (`pad*` left out)
        annotated `int` (scalars), `bytes` (byte arrays) or `tuple[int, ...]` (other arrays);
        HeaderError if the two disagree, so a changed header cannot go unnoticed."""
        return _view(self, cls)

    def ctype(self) -> type[ctypes.Structure]:
        """A ctypes Structure with this exact layout (explicit padding, `_pack_ = 1`)."""
        members: list[tuple[str, type]] = []
        at = 0
        for f in self.fields:
            if f.offset > at:
                members.append((f"_pad_at_{at}", ctypes.c_uint8 * (f.offset - at)))
            scalar = _TYPES[f.ctype].ctype
            members.append((f.name, scalar if f.count is None else scalar * f.count))
            at = f.offset + f.size
        if self.size > at:
            members.append((f"_pad_at_{at}", ctypes.c_uint8 * (self.size - at)))
        return type(self.name, (ctypes.Structure,), {"_pack_": 1, "_fields_": members})


T = TypeVar("T")


@dataclass(frozen=True)
class StructView(Generic[T]):
    """A struct read into and written from a frozen dataclass (see StructLayout.view)."""

    layout: StructLayout
    cls: type[T]
    names: tuple[str, ...]

    def unpack(self, data: bytes) -> T:
        values = self.layout.unpack(data)
        return self.cls(**{name: values[name] for name in self.names})

    def pack(self, value: T) -> bytes:
        return self.layout.pack(**{name: getattr(value, name) for name in self.names})


def _annotation(f: Field) -> str:
    if f.count is None:
        return "int"
    return "bytes" if f.is_bytes else "tuple[int, ...]"


def _view(layout: StructLayout, cls: type[T]) -> StructView[T]:
    wanted = {f.name: _annotation(f) for f in layout.fields if not f.name.startswith("pad")}
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    found = {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
             for f in dataclasses.fields(cls)}
    if found != wanted:
        raise HeaderError(f"{cls.__name__} does not match struct {layout.name}: it has {found}, "
                          f"the header has {wanted}")
    return StructView(layout, cls, tuple(wanted))


@dataclass(frozen=True)
class Header:
    """Every `#define NAME <int>` and every struct of the header."""

    constants: Mapping[str, int]
    structs: Mapping[str, StructLayout]

    def constant(self, name: str) -> int:
        try:
            return self.constants[name]
        except KeyError:
            raise KeyError(f"the header defines no constant {name}") from None

    def struct(self, name: str) -> StructLayout:
        try:
            return self.structs[name]
        except KeyError:
            raise KeyError(f"the header defines no struct {name}") from None


# ---------------------------------------------------------------- parsing

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_INT = r"0[xX][0-9a-fA-F]+|[0-9]+"
_TOKEN = re.compile(rf"\s*(?:({_IDENT})|({_INT})|([{{}}\[\];]))")
_DIRECTIVE = re.compile(rf"#\s*(\w+)(?:\s+({_IDENT}))?(?:\s+(\S+))?\s*$")


@dataclass(frozen=True)
class _Token:
    text: str
    line: int


def _strip_comments(text: str) -> str:
    """Blank out comments, keeping newlines so line numbers stay right."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise HeaderError("unterminated comment", text.count("\n", 0, i) + 1)
            out.append(re.sub(r"[^\n]", " ", text[i : end + 2]))
            i = end + 2
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            out.append(" " * (end - i))
            i = end
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


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
        at = 0
        while at < len(text):
            if text[at:].strip() == "":
                break
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
        if ctype not in _TYPES:
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
        align = _TYPES[ctype].size
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
