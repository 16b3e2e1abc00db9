"""C struct layouts as values: fields, offsets, sizes, packing, and typed dataclass views.

`ipe_bpf.policy.layout` computes these from bpf/ipe_bpf.h; nothing here knows the header.
Byte order is the host's (BPF maps are host-endian).
"""

from __future__ import annotations

import ctypes
import dataclasses
import struct
from array import array
from itertools import repeat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Generic, TypeVar

from ..errors import IpeBpfError

__all__ = ["Field", "FieldValue", "Header", "HeaderError", "StructLayout", "StructView", "TYPES"]


class HeaderError(IpeBpfError):
    """bpf/ipe_bpf.h uses a construct the layout parser does not accept."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__("EINVAL", message, line=line)


@dataclass(frozen=True)
class _CType:
    code: str  # struct module code
    size: int
    ctype: type  # ctypes scalar type


TYPES: Mapping[str, _CType] = MappingProxyType(
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
        return TYPES[self.ctype].size

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
            return TYPES[self.ctype].code
        if self.is_bytes:
            return f"{self.count}s"
        return f"{self.count}{TYPES[self.ctype].code}"

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


def _column_bytes(struct_name: str, f: Field, column: Sequence[int] | Sequence[bytes]) -> tuple[bytes, int]:
    """One field's values packed back to back, and the width of each."""
    where = f"{struct_name}.{f.name}"
    if f.is_bytes:
        size = f.size
        try:
            if max(map(len, column), default=0) > size:  # type: ignore[arg-type]
                raise ValueError(f"{where}: expected at most {size} bytes")
            padded = map(bytes.ljust, column, repeat(size), repeat(b"\0"))  # type: ignore[arg-type]
            return b"".join(padded), size
        except TypeError:
            raise ValueError(f"{where}: expected bytes") from None
    if f.count is not None:
        raise ValueError(f"{where}: an array of {f.ctype} is not packed by column")
    code = TYPES[f.ctype].code
    try:
        packed = array(code, column)  # type: ignore[arg-type]
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    if packed.itemsize != f.elem_size:
        raise ValueError(f"{where}: this Python's array {code!r} is {packed.itemsize} bytes, not {f.elem_size}")
    return packed.tobytes(), f.elem_size


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

    def pack_columns(self, count: int, columns: Mapping[str, Sequence[int] | Sequence[bytes]]) -> bytes:
        """`count` structs back to back, each named field taken from its column (an int per
        struct, or bytes for a byte array), the other bytes zero.

        The work per struct is C's (array packing and strided slice copies), which is what
        makes a million-entry table quick to build.  Values are range-checked like `packer`'s.
        """
        out = bytearray(self.size * count)
        for name, column in columns.items():
            f = self.field(name)
            if len(column) != count:
                raise ValueError(f"{self.name}.{name}: {len(column)} values for {count} structs")
            data, width = _column_bytes(self.name, f, column)
            for j in range(width):
                out[f.offset + j :: self.size] = data[j::width]
        return bytes(out)

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
            scalar = TYPES[f.ctype].ctype
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
