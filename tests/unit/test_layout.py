"""layout.py against a real C compiler: sizes, offsets, member types, constants, struct lists."""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
import textwrap
from pathlib import Path

import pytest

from ipe_bpf.policy.abi import Abi
from ipe_bpf.policy.layout import Header, HeaderError, default_header_path, load_header, parse_header

GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc not found: layouts cannot be checked against a C compiler")

REAL = default_header_path()

# Every padding rule at once: a u64 after a u8, arrays of wider types, trailing padding.
TRICKY = textwrap.dedent(
    """\
    #ifndef TRICKY_H
    #define TRICKY_H
    #define N 3 // a line comment
    #define M 0x5
    #define ALIAS M
    struct tricky {
    \t__u8 a;
    \t__u64 b;	/* 7 bytes of padding before */
    \t__u16 c[N];
    \tchar d;
    \t__u32 e;
    \tchar name[ALIAS];
    };
    struct tiny { __u16 x; __u8 y; };
    #endif
    """
)

PRELUDE = textwrap.dedent(
    """\
    #include <stdio.h>
    #include <stddef.h>
    #if __has_include(<linux/types.h>)
    #include <linux/types.h>
    #else
    typedef unsigned char __u8; typedef unsigned short __u16;
    typedef unsigned int __u32; typedef unsigned long long __u64;
    #endif
    """
)


def header_files() -> list[tuple[str, str]]:
    return [("ipe_bpf.h", REAL.read_text()), ("tricky.h", TRICKY)]


def c_type(ctype: str, count: int | None) -> str:
    return ctype if count is None else f"{ctype}[{count}]"


def probe_program(header_name: str, header: Header) -> str:
    """C that prints what the compiler thinks of every struct, member and constant Python found."""
    lines = [PRELUDE, f'#include "{header_name}"', "int main(void) {"]
    for s in header.structs.values():
        t = f"struct {s.name}"
        lines.append(f'printf("struct {s.name} %zu %zu\\n", sizeof({t}), _Alignof({t}));')
        for f in s.fields:
            member = f"(({t} *)0)->{f.name}"
            same_type = f"__builtin_types_compatible_p(__typeof__({member}), {c_type(f.ctype, f.count)})"
            lines.append(
                f'printf("field {s.name}.{f.name} %zu %zu %d\\n", offsetof({t}, {f.name}), sizeof({member}), {same_type});'
            )
        # A positional initializer with exactly the members Python knows: gcc rejects one too
        # many ("excess elements") and, with -Werror=missing-field-initializers, one too few.
        init = ", ".join("0" if f.count is None else "{0}" for f in s.fields)
        lines.append(f"{t} init_{s.name} = {{ {init} }}; (void)init_{s.name};")
    for name in header.constants:
        lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


def run_gcc(tmp_path: Path, header_name: str, header_text: str, program: str) -> str:
    (tmp_path / header_name).write_text(header_text)
    source, binary = tmp_path / "probe.c", tmp_path / "probe"
    source.write_text(program)
    flags = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Werror=missing-field-initializers", f"-I{tmp_path}"]
    built = subprocess.run([GCC, *flags, "-o", str(binary), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout


def expected_lines(header: Header) -> list[str]:
    """What the probe prints if Python's derivation is right (with ctypes' view too)."""
    out = []
    for s in header.structs.values():
        ct = s.ctype()
        assert ctypes.sizeof(ct) == s.size == struct.calcsize(s.format)
        out.append(f"struct {s.name} {s.size} {s.align}")
        for f in s.fields:
            assert getattr(ct, f.name).offset == f.offset and getattr(ct, f.name).size == f.size
            out.append(f"field {s.name}.{f.name} {f.offset} {f.size} 1")
    out += [f"const {name} {value}" for name, value in header.constants.items()]
    return out


@needs_gcc
@pytest.mark.parametrize(("name", "text"), header_files(), ids=["ipe_bpf.h", "tricky.h"])
def test_layouts_match_gcc(tmp_path: Path, name: str, text: str) -> None:
    header = parse_header(text)
    printed = run_gcc(tmp_path, name, text, probe_program(name, header)).splitlines()
    assert printed == expected_lines(header)


def test_tricky_layout_by_hand() -> None:
    """Known answers, so the padding rules are pinned even where gcc is absent."""
    tricky = parse_header(TRICKY).struct("tricky")
    assert [(f.name, f.offset) for f in tricky.fields] == [("a", 0), ("b", 8), ("c", 16), ("d", 22), ("e", 24), ("name", 28)]
    assert (tricky.size, tricky.align) == (40, 8)
    assert parse_header(TRICKY).struct("tiny").size == 4
    assert dict(parse_header(TRICKY).constants) == {"N": 3, "M": 5, "ALIAS": 5}


def _macros(tmp_path: Path, header: Path | None) -> dict[str, str]:
    target = tmp_path / "empty.h"
    target.write_text("")
    out = subprocess.run([GCC, "-dM", "-E", str(header or target)], capture_output=True, text=True, check=True).stdout
    macros = {}
    for line in out.splitlines():
        _, name, *value = line.split(" ", 2)
        macros[name] = value[0] if value else ""
    return macros


@needs_gcc
def test_every_macro_of_the_header_is_a_constant(tmp_path: Path) -> None:
    builtin = _macros(tmp_path, None)
    mine = {k: v for k, v in _macros(tmp_path, REAL).items() if k not in builtin}
    guards = {k for k, v in mine.items() if v == ""}
    assert guards == {"IPE_BPF_H"}
    assert set(mine) - guards == set(load_header().constants)


def _dwarf_structs(obj: Path, header_name: str) -> dict[str, tuple[int, list[tuple[str, int, int]]]]:
    from elftools.elf.elffile import ELFFile

    def type_size(die) -> int:  # type: ignore[no-untyped-def]
        while "DW_AT_byte_size" not in die.attributes:
            if die.tag == "DW_TAG_array_type":
                count = 1
                for sub in die.iter_children():
                    if "DW_AT_count" in sub.attributes:
                        count *= sub.attributes["DW_AT_count"].value
                    else:
                        count *= sub.attributes["DW_AT_upper_bound"].value + 1
                return count * type_size(die.get_DIE_from_attribute("DW_AT_type"))
            die = die.get_DIE_from_attribute("DW_AT_type")
        return die.attributes["DW_AT_byte_size"].value

    found: dict[str, tuple[int, list[tuple[str, int, int]]]] = {}
    with obj.open("rb") as fh:
        dwarf = ELFFile(fh).get_dwarf_info()
        for cu in dwarf.iter_CUs():
            files = dwarf.line_program_for_CU(cu)["file_entry"]
            for die in cu.iter_DIEs():
                if die.tag != "DW_TAG_structure_type" or "DW_AT_decl_file" not in die.attributes:
                    continue
                if files[die.attributes["DW_AT_decl_file"].value - 1].name.decode() != header_name:
                    continue
                members = [
                    (
                        m.attributes["DW_AT_name"].value.decode(),
                        m.attributes["DW_AT_data_member_location"].value,
                        type_size(m.get_DIE_from_attribute("DW_AT_type")),
                    )
                    for m in die.iter_children()
                    if m.tag == "DW_TAG_member"
                ]
                found[die.attributes["DW_AT_name"].value.decode()] = (die.attributes["DW_AT_byte_size"].value, members)
    return found


@needs_gcc
@pytest.mark.parametrize(("name", "text"), header_files(), ids=["ipe_bpf.h", "tricky.h"])
def test_every_struct_and_member_matches_dwarf(tmp_path: Path, name: str, text: str) -> None:
    """gcc's own list of structs and members (debug info), not only the ones Python found."""
    (tmp_path / name).write_text(text)
    source, obj = tmp_path / "unit.c", tmp_path / "unit.o"
    source.write_text(PRELUDE + f'#include "{name}"\n')
    subprocess.run(
        [GCC, "-c", "-gdwarf-4", "-fno-eliminate-unused-debug-types", f"-I{tmp_path}", "-o", str(obj), str(source)],
        check=True,
    )
    header = parse_header(text)
    python_view = {
        s.name: (s.size, [(f.name, f.offset, f.size) for f in s.fields]) for s in header.structs.values()
    }
    assert _dwarf_structs(obj, name) == python_view


# ---------------------------------------------------------------- the parser is strict


@pytest.mark.parametrize(
    "bad",
    [
        "#include <linux/types.h>\n",
        "#define X (1 << 2)\n",
        "#define X 1U\n",
        "#define X 010\n",
        "#define X Y\n",
        "#define X 1\n#define X 2\n",
        "#define LONELY\n",
        "#ifndef G\n#define G\n",
        "#endif\n",
        "#if 1\n#endif\n",
        "#define X 1 \\\n",
        "struct s { int a; };\n",
        "struct s { __u8 a[Q]; };\n",
        "struct s { __u8 a[0]; };\n",
        "struct s { __u8 a; __u8 a; };\n",
        "struct s { __u8 a };\n",
        "struct s { __u8 a; }\n",
        "struct s { };\n",
        "struct s { __u8 a; };\nstruct s { __u8 b; };\n",
        "struct s { __u8 a : 3; };\n",
        "struct s { __u8 *a; };\n",
        "typedef __u8 byte;\n",
        "union u { __u8 a; };\n",
        "/* unterminated\n",
        "struct s { __u8 a; } __attribute__((packed));\n",
    ],
)
def test_unsupported_constructs_are_rejected(bad: str) -> None:
    with pytest.raises(HeaderError):
        parse_header(bad)


def test_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.h"
    path.write_text("#define A 1\n\nstruct s { float f; };\n")
    with pytest.raises(HeaderError) as info:
        load_header(path)
    assert info.value.line == 3 and str(path) in str(info.value)


# ---------------------------------------------------------------- packing


def test_pack_and_unpack() -> None:
    key = load_header().struct("ipe_digest_key")
    raw = key.pack(slot=1, kind=2, alg_len=6, len=3, alg=b"sha256", value=b"\x01\x02\x03")
    assert len(raw) == key.size
    fields = key.unpack(raw)
    assert fields["slot"] == 1 and fields["alg"] == b"sha256" + bytes(10)
    assert fields["value"] == b"\x01\x02\x03" + bytes(61)
    assert key.pack() == bytes(key.size)
    tricky = parse_header(TRICKY).struct("tricky")
    raw = tricky.pack(a=1, b=2**64 - 1, c=(1, 2, 3), e=7, name=b"ab")
    assert tricky.unpack(raw) == {"a": 1, "b": 2**64 - 1, "c": (1, 2, 3), "d": 0, "e": 7, "name": b"ab\0\0\0"}
    view = tricky.ctype().from_buffer_copy(raw)
    assert (view.a, view.b, list(view.c), view.e, view.name) == (1, 2**64 - 1, [1, 2, 3], 7, b"ab")


@pytest.mark.parametrize(
    "values",
    [{"alg": b"x" * 17}, {"value": bytes(65)}, {"slot": 256}, {"slot": -1}, {"alg": "sha256"}, {"nope": 1}],
)
def test_pack_rejects_what_does_not_fit(values: dict) -> None:
    with pytest.raises((ValueError, KeyError)):
        load_header().struct("ipe_digest_key").pack(**values)


def test_unpack_checks_the_size() -> None:
    with pytest.raises(ValueError):
        load_header().struct("ipe_rule_key").unpack(bytes(11))


# ---------------------------------------------------------------- header and model agree


def test_header_constants_agree_with_the_model() -> None:
    abi = Abi.from_header(load_header())
    assert abi.all_bools == 7


def test_a_header_that_disagrees_with_the_model_is_refused() -> None:
    text = REAL.read_text().replace("#define IPE_OP_UNKNOWN 7", "#define IPE_OP_UNKNOWN 6")
    assert text != REAL.read_text()
    with pytest.raises(HeaderError):
        Abi.from_header(parse_header(text))


def test_typed_views_round_trip_and_refuse_a_mismatch() -> None:
    import dataclasses

    from ipe_bpf.audit.record import Event
    from ipe_bpf.kernel.maps import BdevState, Config, RawCounters, SlotDefaults
    from ipe_bpf.policy.layout import HeaderError, default_header

    header = default_header()
    for name, cls in [("ipe_config", Config), ("ipe_policy_defaults", SlotDefaults), ("ipe_counters", RawCounters),
                      ("ipe_bdev_state", BdevState), ("ipe_event", Event)]:
        header.struct(name).view(cls)  # every view the code uses matches the header
    view = header.struct("ipe_config").view(Config)
    value = Config(active=2, permissive=1, success_audit=0, flips=9)
    assert view.unpack(view.pack(value)) == value
    assert len(view.pack(value)) == header.struct("ipe_config").size

    @dataclasses.dataclass(frozen=True)
    class Missing:
        active: int
        permissive: int
        flips: int

    @dataclasses.dataclass(frozen=True)
    class WrongType:
        active: int
        permissive: int
        success_audit: bytes
        flips: int

    for cls in (Missing, WrongType):
        with pytest.raises(HeaderError, match="does not match struct ipe_config"):
            header.struct("ipe_config").view(cls)


def test_pinned_maps_through_typed_views(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """install / state / set_enforce / counters / devices against in-memory maps (bpfsys faked)."""
    import struct as _struct

    from ipe_bpf.kernel import bpfsys, maps as maps_mod, pins
    from ipe_bpf.policy.compiler import compile_policy
    from ipe_bpf.policy.parser import parse_policy

    header = load_header()
    sizes = {"ipe_config": (4, header.struct("ipe_config").size), "ipe_defaults": (4, header.struct("ipe_policy_defaults").size),
             "ipe_rules": (4, 4), "ipe_digests": (4, 4), "ipe_counters": (4, header.struct("ipe_counters").size),
             "ipe_devices": (4, header.struct("ipe_bdev_state").size)}
    tables: dict[int, dict[bytes, bytes]] = {}
    fds: dict[str, int] = {}
    for i, (name, (k, v)) in enumerate(sizes.items()):
        (tmp_path / "maps").mkdir(exist_ok=True)
        (tmp_path / "maps" / name).touch()
        fds[name] = 10_000 + i  # fake descriptors, never closed for real
        tables[10_000 + i] = {}
    for name in ("ipe_config", "ipe_defaults"):
        for slot in range(1 if name == "ipe_config" else 2):
            tables[fds[name]][_struct.pack("=I", slot)] = bytes(sizes[name][1])
    cpus = 2
    counters = header.struct("ipe_counters")
    per_cpu = counters.pack(allow=tuple(range(8)), deny=(1,) * 8, audited=3, dropped=1, undecidable=2)
    tables[fds["ipe_counters"]][_struct.pack("=I", 0)] = per_cpu * cpus

    opened: set[tuple[str, bool]] = set()

    def obj_get(path: str, read_only: bool = False) -> int:
        name = path.rsplit("/", 1)[1]
        opened.add((name, read_only))
        return fds[name]

    monkeypatch.setattr(bpfsys, "obj_get", obj_get)
    monkeypatch.setattr(bpfsys, "map_info", lambda fd: bpfsys.MapInfo(1, fd, *next(sizes[n] for n, f in fds.items() if f == fd), 0, 0, ""))
    outer = {fds["ipe_rules"]: "rules", fds["ipe_digests"]: "digests", fds["ipe_config"]: "config"}
    events: list[tuple[str, ...]] = []

    def lookup(fd: int, key: bytes, size: int) -> bytes | None:
        if fd in (fds["ipe_rules"], fds["ipe_digests"]):
            events.append(("lookup", outer[fd], str(key[0])))
        return tables[fd].get(key)

    monkeypatch.setattr(bpfsys, "lookup", lookup)

    def update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
        if fd in outer:
            events.append(("put", outer[fd], str(key[0]), str(value == tables[fd].get(key))))
        tables[fd][key] = value

    def delete(fd: int, key: bytes) -> bool:
        events.append(("delete", outer.get(fd, "?"), str(key[0])))
        return tables[fd].pop(key, None) is not None

    monkeypatch.setattr(bpfsys, "update", update)
    def update_packed(fd: int, keys: bytes, values: bytes, k: int, v: int) -> None:
        tables[fd].update((bytes(keys[i * k : (i + 1) * k]), bytes(values[i * v : (i + 1) * v])) for i in range(len(keys) // k))

    monkeypatch.setattr(bpfsys, "update_packed", update_packed)
    monkeypatch.setattr(bpfsys, "delete", delete)
    monkeypatch.setattr(bpfsys, "keys", lambda fd, k: list(tables[fd]))
    made: list[tuple[str, int, int, int]] = []

    def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int, name: str) -> int:
        made.append((name, key_size, value_size, max_entries))
        tables[20_000 + len(made)] = {}
        return 20_000 + len(made)

    monkeypatch.setattr(bpfsys, "map_create", map_create)
    monkeypatch.setattr(bpfsys, "possible_cpus", lambda: cpus)
    monkeypatch.setattr(bpfsys, "map_fd_by_id", lambda map_id, read_only=False: map_id)  # fake ids are fds
    real_close = maps_mod.os.close
    monkeypatch.setattr(maps_mod.os, "close", lambda fd: None if fd in tables else real_close(fd))
    monkeypatch.setattr(maps_mod, "control_lock", lambda: pins.control_lock(tmp_path / "lock"))
    compiled = compile_policy(parse_policy(b"policy_name=p policy_version=1.0.0\nDEFAULT action=ALLOW\n"
                                           b"op=EXECUTE fsverity_digest=sha256:ab action=DENY\n"))
    with_rules = compile_policy(parse_policy(b"policy_name=q policy_version=1.0.0\nDEFAULT action=ALLOW\n"
                                             b"op=EXECUTE boot_verified=TRUE action=DENY\n"))
    assert compiled.tables.rule_count == 0 and with_rules.tables.rule_count > 0
    with maps_mod.PinnedPolicyMaps(tmp_path) as maps:
        assert maps.state().generation is None and maps.state().active_slot is None
        maps.install(compiled, 7)
        maps.set_enforce(False)
        state = maps.state()
        assert (state.active_slot, state.generation, state.enforcing, state.flips) == (0, 7, False, 1)
        events.clear()
        maps.install(compiled, 8)
        assert (maps.state().active_slot, maps.state().generation) == (1, 8)
        # the old slot is emptied only after the flip and a grace period: slot 1's digests table
        # put in its place a second time, which the kernel follows with synchronize_rcu(); the
        # policy has no rule entries, so no rules table (the slot's entry deleted instead, for
        # leftovers of an interrupted install); no lookups in the arrays of maps (each a grace
        # period on 6.1)
        switch_to_slot_1 = [("delete", "rules", "1"), ("put", "digests", "1", "False"), ("put", "config", "0", "False"),
                            ("put", "digests", "1", "True"), ("delete", "digests", "0"), ("delete", "rules", "0")]
        assert events == switch_to_slot_1
        events.clear()
        maps.install(with_rules, 9)
        maps.install(compiled, 10)
        assert events == [("put", "digests", "0", "False"), ("put", "rules", "0", "False"),
                          ("put", "config", "0", "False"), ("put", "digests", "0", "True"),
                          ("delete", "digests", "1"), ("delete", "rules", "1"), *switch_to_slot_1]
        # each install made a table per map with entries, sized to the policy; the old slot was emptied
        rule_size = (header.struct("ipe_rule_key").size, header.struct("ipe_rule_value").size)
        digest_table = (header.struct("ipe_digest_key").size, 12)
        assert made == [("ipe_digests0", *digest_table, 1), ("ipe_digests1", *digest_table, 1),
                        ("ipe_digests0", *digest_table, 1), ("ipe_rules0", *rule_size, with_rules.tables.rule_count),
                        ("ipe_digests1", *digest_table, 1)]
        (digests_fd,) = [_struct.unpack("=I", v)[0] for k, v in tables[fds["ipe_digests"]].items() if k == _struct.pack("=I", 1)]
        assert list(tables[fds["ipe_rules"]]) == [] and list(tables[fds["ipe_digests"]]) == [_struct.pack("=I", 1)]
        # the policy's one rule names one digest and nothing else: it is kept with the digest
        ((key, value),) = tables[digests_fd].items()
        assert key[0] == 1 and header.struct("ipe_digest_value").unpack(value) == {
            "id": 1, "index": 0, "op": 0, "action": 1, "pad": bytes(2)}
        got = maps.counters()
        assert got.allow["KMODULE"] == 2 * 2 and got.deny["EXECUTE"] == cpus and (got.audited, got.dropped, got.undecidable) == (6, 2, 4)
        state = header.struct("ipe_bdev_state").pack(has_roothash=1, sig_valid=1, alg_len=6, digest_len=32,
                                                      alg=b"sha256", digest=bytes(range(32)))
        tables[fds["ipe_devices"]][_struct.pack("=I", maps_mod.kernel_dev(253, 1))] = state  # as the hook writes it
        (device,) = maps.devices()
        assert (device.major, device.minor, device.alg, device.roothash, device.signature_valid) == (
            253, 1, "sha256", bytes(range(32)).hex(), True)
    # readers hold read-only fds; only what writes asks for a writable one
    assert {name for name, ro in opened if not ro} == {"ipe_config", "ipe_defaults", "ipe_rules", "ipe_digests"}
    assert {name for name, ro in opened if ro} == {"ipe_config", "ipe_defaults", "ipe_counters", "ipe_devices"}
