"""A compiled policy's packed tables as a file: what the store keeps beside a deployed policy,
so that `activate`, `update` of the active policy and `load` at boot write maps without parsing or
compiling the text again.

The file is a cache, never the authority: it names the policy text it was compiled from (its
sha256) and the ABI it was packed for (a digest of the header's structs and constants), and
`read` returns None for any file that does not match both, whose arrays do not match their
CRC-32 (unless a signature covers them), or that is malformed, so the caller compiles the text
instead.

Layout: a magic line, one JSON line, then the four packed arrays (digest keys, digest values,
rule keys, rule values) by byte column: byte j of every entry, then byte j + 1, and so on.  A column
that holds one value throughout (a key's slot, kind, algorithm name, a sha256 digest's unused
half, an id's high byte) is that value in the JSON line, not bytes: a 100k-rule policy's 10.8 MB
of arrays are 4.2 MB here, which the target reads, hashes to check the signature, and writes
into the store; `read` puts the entries back together with one strided copy per column.

The same file, made by `ipe-bpf policy compile` on a build host and signed there, is a
*compiled policy*: `load_compiled` reads it for `policy deploy --compiled`, which then needs no
parsing or compiling on the target (docs/design.md, section 5).  It also lists the property keys the
policy tests, so that the target can refuse what its kernel cannot evaluate without the text.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import NamedTuple

from ..errors import PolicyError
from .abi import Abi
from .compiler import Defaults, Tables

__all__ = ["Compiled", "abi_fingerprint", "compile_text", "compiled_identity", "load_compiled", "read", "write"]

_MAGIC = b"ipe-bpf tables 1\n"
_FORMAT = 2  # the arrays by byte column; in the ABI fingerprint, so files of the packed layout read as another ABI
_STRUCTS = ("ipe_digest_key", "ipe_rule_key", "ipe_rule_value", "ipe_policy_defaults")


def _crc32(parts: tuple[bytes | memoryview, ...]) -> int:
    """A check against damage, not against an adversary (who could rewrite the policy store
    anyway): 0.3 s less than a sha256 of a 100k-rule policy's tables in the VM."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def abi_fingerprint(abi: Abi) -> str:
    """A digest of everything the packed bytes depend on: the structs' layouts and the constants."""
    h = abi.header
    described = repr((sorted(h.constants.items()), [h.struct(name) for name in _STRUCTS])) + f" format {_FORMAT}"
    return hashlib.sha256(described.encode()).hexdigest()


def _entry_sizes(abi: Abi) -> tuple[int, int, int, int]:
    """Bytes of an entry of each array: digest keys, digest values, rule keys, rule values."""
    h = abi.header
    return (h.struct("ipe_digest_key").size, abi.digest_value_size, h.struct("ipe_rule_key").size,
            h.struct("ipe_rule_value").size)


def _by_column(packed: bytes, size: int) -> tuple[list[int | None], list[bytes]]:
    """Each byte column of the `size`-byte entries in `packed`: its value if it has only one
    (None where it varies), and the columns that vary."""
    count = len(packed) // size
    spec: list[int | None] = []
    varying: list[bytes] = []
    for j in range(size):
        column = packed[j::size]
        if not count or column.count(column[:1]) == count:
            spec.append(column[0] if count else 0)
        else:
            spec.append(None)
            varying.append(column)
    return spec, varying


def _entries(spec: list[int | None], count: int, payload: memoryview, at: int) -> tuple[bytearray, int]:
    """The packed entries of one array from its column spec and the varying columns at `at`."""
    size = len(spec)
    out = bytearray(count * size)
    for j, value in enumerate(spec):
        if value is None:
            out[j::size] = payload[at : at + count]
            at += count
        elif value:
            out[j::size] = bytes((value,)) * count
    return out, at


def write(tables: Tables, content_digest: str, *, properties: frozenset[str] | None = None) -> bytes:
    """The file for `tables`, compiled from the policy text whose sha256 hex is `content_digest`
    (with `properties`, the property keys its rules test: a compiled policy)."""
    d = tables.defaults
    arrays = (tables.digest_keys, tables.digest_values, tables.rule_keys, tables.rule_values)
    specs, payload = [], []
    for packed, size in zip(arrays, _entry_sizes(tables.abi)):
        spec, varying = _by_column(packed, size)
        specs.append(spec)
        payload += varying
    meta = {
        "content": content_digest,
        "abi": abi_fingerprint(tables.abi),
        "name": tables.name.hex(),
        "version": list(tables.version),
        "counts": [tables.digest_count, tables.rule_count],
        "columns": specs,
        "crc32": _crc32(tuple(payload)),
        "defaults": [list(d.op_default), d.global_default, d.shapes, d.bool_mask],
    }
    if properties is not None:
        meta["properties"] = sorted(properties)
    return b"".join((_MAGIC, json.dumps(meta, separators=(",", ":")).encode(), b"\n", *payload))


def read(data: bytes, content_digest: str, abi: Abi, *, signed: bool = False) -> Tables | None:
    """The tables in `data` if they were compiled from `content_digest` for `abi`, else None.
    `signed`: a verified signature covers `data`, which makes the CRC-32 a second check of
    the same bytes (15 ms of a 100k-rule signed deploy in the VM): it is skipped."""
    found = _meta(data)
    if found is None:
        return None
    meta, end = found
    try:
        if meta["content"] != content_digest or meta["abi"] != abi_fingerprint(abi):
            return None
        digests, rules = (int(n) for n in meta["counts"])
        specs = [[None if v is None else int(v) for v in spec] for spec in meta["columns"]]
        op_default, global_default, shapes, bool_mask = meta["defaults"]
        defaults = Defaults(tuple(int(a) for a in op_default), int(global_default), int(shapes), int(bool_mask))
        name, version = bytes.fromhex(meta["name"]), tuple(int(v) for v in meta["version"])
    except (ValueError, KeyError, TypeError):
        return None
    counts = (digests, digests, rules, rules)
    if (len(version) != 3 or min(counts) < 0 or [len(spec) for spec in specs] != list(_entry_sizes(abi))
            or any(v is not None and not 0 <= v <= 255 for spec in specs for v in spec)):
        return None
    payload = memoryview(data)[end + 1 :]
    if len(payload) != sum(n * spec.count(None) for n, spec in zip(counts, specs)):
        return None
    if not signed and _crc32((payload,)) != meta.get("crc32"):
        return None  # damaged on disk
    arrays, at = [], 0
    for spec, count in zip(specs, counts):
        entries, at = _entries(spec, count, payload, at)
        arrays.append(entries)
    return Tables(*arrays, defaults=defaults, name=name, version=version, abi=abi)  # type: ignore[arg-type]


def compile_text(content: bytes) -> tuple[bytes, Tables, int]:
    """`ipe-bpf policy compile`: the compiled policy of a policy text (unsigned), its tables and
    its rule count.  Parse errors as `parse_policy` raises them."""
    from .compiler import compile_policy
    from .model import property_keys
    from .parser import parse_policy

    policy = parse_policy(content)
    tables = compile_policy(policy).tables
    data = write(tables, hashlib.sha256(content).hexdigest(), properties=property_keys(policy.rules))
    return data, tables, len(policy.rules)


class Compiled(NamedTuple):
    """A compiled policy read for deploy: its tables (None if packed for another ABI) and the
    property keys its rules test."""

    tables: Tables | None
    properties: frozenset[str]


def load_compiled(data: bytes, content_digest: str, abi: Abi, *, signed: bool = False) -> Compiled:
    """The compiled policy in `data` (`ipe-bpf policy compile`), made from the policy text whose
    sha256 hex is `content_digest`.  EBADMSG if it is no compiled policy or is damaged, EINVAL if
    it was compiled from another text; packed for another ABI: `tables` is None.  `signed`: `data`
    is the content of a verified signature (see `read`)."""
    found = _meta(data)
    meta = found[0] if found is not None else {}
    if not isinstance(meta.get("properties"), list):
        raise PolicyError("EBADMSG", "not a compiled policy (make one with `ipe-bpf policy compile`)")
    if meta.get("content") != content_digest:
        raise PolicyError("EINVAL", f"compiled from another policy text (sha256 {str(meta.get('content'))[:16]}…, "
                                    f"not {content_digest[:16]}…): compile this policy")
    properties = frozenset(str(p) for p in meta["properties"])
    if meta.get("abi") != abi_fingerprint(abi):
        return Compiled(None, properties)
    tables = read(data, content_digest, abi, signed=signed)
    if tables is None:
        raise PolicyError("EBADMSG", "the compiled policy is damaged (its tables do not match their CRC-32 or sizes)")
    return Compiled(tables, properties)


def compiled_identity(data: bytes) -> tuple[bytes, tuple[int, ...], str] | None:
    """(policy name, version, sha256 hex of its text) of a compiled policy, None for other bytes."""
    found = _meta(data)
    meta = found[0] if found is not None else {}
    try:
        name, version = bytes.fromhex(meta["name"]), tuple(int(v) for v in meta["version"])
        return (name, version, str(meta["content"])) if len(version) == 3 else None
    except (KeyError, TypeError, ValueError):
        return None


def _meta(data: bytes) -> tuple[dict, int] | None:
    """The JSON line of a tables file and where it ends, or None if `data` is no tables file."""
    if not data.startswith(_MAGIC):
        return None
    end = data.find(b"\n", len(_MAGIC))
    try:
        meta = json.loads(data[len(_MAGIC) : end])
    except ValueError:
        return None
    return (meta, end) if end > 0 and isinstance(meta, dict) else None
