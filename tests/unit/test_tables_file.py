"""The compiled tables deploy keeps beside a policy: activate and boot install them without
parsing; a file that does not fit (other text, other ABI, damaged) is never used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ipe_bpf.audit.policy_records import AuditIdentity
from ipe_bpf.kernel.lifecycle import Lifecycle
from ipe_bpf.kernel.store import PolicyStore
from ipe_bpf.policy import parser, tables_file
from ipe_bpf.policy.compiler import compile_policy, default_abi
from ipe_bpf.policy.parser import parse_policy

from .lifecycle_fixtures import FakeTarget

DIGESTS = [hashlib.sha256(bytes([i])).hexdigest() for i in range(40)]
TEXT = ("policy_name=app policy_version=1.0.0\nDEFAULT action=DENY\n"
        + "".join(f"op=EXECUTE fsverity_digest=sha256:{d} action=ALLOW\n" for d in DIGESTS)
        + "op=KMODULE boot_verified=TRUE action=ALLOW\n").encode()
CONTENT = hashlib.sha256(TEXT).hexdigest()


@pytest.fixture()
def life(tmp_path: Path) -> Lifecycle:
    return Lifecycle(PolicyStore(tmp_path / "state"), FakeTarget(), identity=AuditIdentity(auid=0, ses=1),
                     clock_ns=lambda: 1_700_000_000_000_000_000)


def tables_path(life: Lifecycle) -> Path:
    (path,) = (life.store.root / "policies").glob("*.tables")
    return path


def installed(life: Lifecycle):  # type: ignore[no-untyped-def]
    target = life.target
    assert isinstance(target, FakeTarget)
    return target.installs[-1][0]


def forbid_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(data: bytes) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(parser, "parse_policy", refuse)


def test_activate_installs_the_kept_tables_without_parsing(life: Lifecycle, monkeypatch: pytest.MonkeyPatch) -> None:
    life.deploy(TEXT, (), allow_unsigned=True)
    forbid_parsing(monkeypatch)
    life.activate(b"app")
    assert installed(life) == compile_policy(parse_policy(TEXT)).tables  # the module's own, unpatched
    assert installed(life).name == b"app" and installed(life).version == (1, 0, 0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "other abi", "missing"])
def test_tables_that_do_not_fit_are_compiled_again(life: Lifecycle, monkeypatch: pytest.MonkeyPatch,
                                                   damage: str) -> None:
    life.deploy(TEXT, (), allow_unsigned=True)
    path = tables_path(life)
    data = path.read_bytes()
    if damage == "flip":
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    elif damage == "truncate":
        path.write_bytes(data[:-12])
    elif damage == "magic":
        path.write_bytes(b"x" + data[1:])
    elif damage == "other abi":
        monkeypatch.setattr(tables_file, "abi_fingerprint", lambda abi: "0" * 64)
    else:
        path.unlink()
    parsed: list[bytes] = []
    real = parser.parse_policy
    monkeypatch.setattr(parser, "parse_policy", lambda data: parsed.append(data) or real(data))
    life.activate(b"app")
    assert parsed == [TEXT]
    assert installed(life) == compile_policy(real(TEXT)).tables


def test_read_refuses_tables_of_other_text() -> None:
    tables = compile_policy(parse_policy(TEXT)).tables
    data = tables_file.write(tables, CONTENT)
    assert tables_file.read(data, CONTENT, default_abi()) == tables
    assert tables_file.read(data, "0" * 64, default_abi()) is None


def test_the_crc_checks_unsigned_tables_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged payload is refused unless `signed` (a verified signature covers the bytes, and
    the CRC-32 of 4 MB is not computed a second time)."""
    tables = compile_policy(parse_policy(TEXT)).tables
    data = tables_file.write(tables, CONTENT)
    damaged = data[:-1] + bytes([data[-1] ^ 1])
    assert tables_file.read(damaged, CONTENT, default_abi()) is None
    assert tables_file.read(damaged, CONTENT, default_abi(), signed=True) is not None
    monkeypatch.setattr(tables_file.zlib, "crc32", lambda *a: pytest.fail("CRC computed for signed tables"))
    assert tables_file.read(data, CONTENT, default_abi(), signed=True) == tables


def test_apply_active_at_boot_uses_the_kept_tables(life: Lifecycle, monkeypatch: pytest.MonkeyPatch) -> None:
    life.deploy(TEXT, (), allow_unsigned=True)
    life.activate(b"app")
    fresh = FakeTarget()
    forbid_parsing(monkeypatch)
    life.apply_active(fresh)
    assert fresh.installs[-1][0] == installed(life)


def test_the_tables_go_with_their_policy(life: Lifecycle) -> None:
    life.deploy(TEXT, (), allow_unsigned=True)
    assert tables_path(life).exists()
    life.delete(b"app")
    assert list((life.store.root / "policies").glob("*.tables")) == []


def test_columns_that_never_change_are_not_stored_and_every_entry_comes_back() -> None:
    """sha256 and sha512 fs-verity digests, a dm-verity root hash: each array by byte column,
    where a column holding one value throughout is that value in the header, not bytes."""
    sha512 = [hashlib.sha512(i.to_bytes(2, "big")).hexdigest() for i in range(300)]
    text = ("policy_name=mix policy_version=1.0.0\nDEFAULT action=DENY\n"
            + "".join(f"op=EXECUTE fsverity_digest=sha256:{hashlib.sha256(i.to_bytes(2, 'big')).hexdigest()} action=ALLOW\n"
                      for i in range(700))
            + "".join(f"op=EXECUTE fsverity_digest=sha512:{d} action=ALLOW\n" for d in sha512)
            + f"op=KMODULE dmverity_roothash=sha256:{DIGESTS[0]} action=ALLOW\n").encode()
    tables = compile_policy(parse_policy(text)).tables
    data = tables_file.write(tables, CONTENT)
    back = tables_file.read(data, CONTENT, default_abi())
    assert back == tables and back.digest_count == 1001 and back.rule_count == tables.rule_count


def test_a_sha256_digest_policy_takes_under_half_its_packed_size() -> None:
    text = ("policy_name=big policy_version=1.0.0\nDEFAULT action=DENY\n"
            + "".join(f"op=EXECUTE fsverity_digest=sha256:{hashlib.sha256(i.to_bytes(2, 'big')).hexdigest()} "
                      f"action=ALLOW\n" for i in range(2000))).encode()
    tables = compile_policy(parse_policy(text)).tables
    packed = sum(map(len, (tables.digest_keys, tables.digest_values, tables.rule_keys, tables.rule_values)))
    # of each rule's 108 packed bytes, the digest's 32 and the ids' and indexes' low bytes vary
    assert len(tables_file.write(tables, CONTENT)) < 0.42 * packed


def test_empty_tables_and_bad_column_headers() -> None:
    empty = compile_policy(parse_policy(b"policy_name=e policy_version=1.0.0\nDEFAULT action=ALLOW\n")).tables
    assert tables_file.read(tables_file.write(empty, CONTENT), CONTENT, default_abi()) == empty
    data = tables_file.write(compile_policy(parse_policy(TEXT)).tables, CONTENT)
    head, _, payload = data.partition(b"\n")[2].partition(b"\n")
    meta = json.loads(head)
    for bad in (256, -1, "x"):
        broken = json.loads(head)
        broken["columns"][0][0] = bad
        assert tables_file.read(data.replace(head, json.dumps(broken).encode()), CONTENT, default_abi()) is None
    short = json.loads(head)
    short["columns"][2] = short["columns"][2][:-1]
    assert tables_file.read(data.replace(head, json.dumps(short).encode()), CONTENT, default_abi()) is None
    assert meta["counts"] == [40, 1] and payload  # each digest's one rule kept with it: the boot_verified rule
