"""Policy text from grants (emit), dpkg's file lists, and learning rules from 1420 records."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ipe_bpf.policy.parser import format_rule
from ipe_bpf.errors import IpeBpfError, PolicyError
from ipe_bpf.generate import dpkg, learn
from ipe_bpf.generate.emit import bumped, comment, fsverity_grant, merged_text, policy_text
from ipe_bpf.generate.fsverity import file_digest
from ipe_bpf.generate.plan import Options
from ipe_bpf.kernel import measure
from ipe_bpf.policy.model import Digest, Op
from ipe_bpf.policy.parser import parse_policy

A, B = b"\xaa" * 32, b"\xbb" * 32


def grants() -> list:
    return [fsverity_grant(Op.EXECUTE, "sha256", B, "/usr/bin/b"),
            fsverity_grant(Op.EXECUTE, "sha256", A, "/usr/bin/z"),
            fsverity_grant(Op.EXECUTE, "sha256", A, "/usr/bin/a"),
            fsverity_grant(Op.KMODULE, "sha512", b"\x01" * 64, "/lib/modules/m.ko")]


def test_emit_is_deterministic_and_parses() -> None:
    one = policy_text("gen", "1.2.3", grants(), ["header"])
    two = policy_text("gen", "1.2.3", list(reversed(grants())), ["header"])
    assert one == two
    policy = parse_policy(one)
    assert [format_rule(r).decode() for r in policy.rules] == [
        f"op=EXECUTE fsverity_digest=sha256:{A.hex()} action=ALLOW",
        f"op=EXECUTE fsverity_digest=sha256:{B.hex()} action=ALLOW",
        f"op=KMODULE fsverity_digest=sha512:{'01' * 64} action=ALLOW",
    ]
    assert policy.op_default(Op.EXECUTE).name == "DENY"
    # one rule for the two files with digest A, each named in a comment above it
    assert b"# /usr/bin/a\n# /usr/bin/z\nop=EXECUTE fsverity_digest=sha256:" + A.hex().encode() in one


def test_comments_cannot_break_lines() -> None:
    assert comment("/tmp/a\nop=EXECUTE action=ALLOW\r") == b"# /tmp/a\\x0aop=EXECUTE action=ALLOW\\x0d\n"
    text = policy_text("gen", "0.0.1", [fsverity_grant(Op.EXECUTE, "sha256", A, "/x\nop=EXECUTE action=ALLOW")])
    assert len(parse_policy(text).rules) == 1


def test_bad_name_or_version_is_einval() -> None:
    with pytest.raises(PolicyError, match="EINVAL|name"):
        policy_text("two words", "0.0.1", [])
    with pytest.raises(PolicyError) as err:
        policy_text("gen", "1.2", [])
    assert err.value.errno_name == "EINVAL"


def test_merge_bumps_version_and_keeps_base_lines() -> None:
    base = b"# mine\npolicy_name=site policy_version=1.0.65535 # keep\nDEFAULT action=DENY\nop=EXECUTE boot_verified=TRUE action=ALLOW\n"
    out = merged_text(base, grants()[:1], ["learned"])
    policy = parse_policy(out)
    assert policy.version == (1, 1, 0)
    assert out.startswith(b"# mine\npolicy_name=site policy_version=1.1.0 # keep\nDEFAULT action=DENY\n")
    assert [format_rule(r).decode() for r in policy.rules][0] == "op=EXECUTE boot_verified=TRUE action=ALLOW"
    assert len(policy.rules) == 2
    assert bumped((1, 2, 3)) == (1, 2, 4)
    with pytest.raises(PolicyError):
        bumped((0xFFFF, 0xFFFF, 0xFFFF))


# ------------------------------------------------------------------ dpkg


def test_package_files_equal_dpkg_L() -> None:
    listed = subprocess.run(["dpkg", "-L", "coreutils"], capture_output=True, text=True, check=True).stdout
    assert dpkg.package_files("coreutils") == sorted(set(listed.splitlines()) - {"", "/."})


def _admindir(tmp_path: Path) -> Path:
    (tmp_path / "info").mkdir()
    (tmp_path / "status").write_text(
        "Package: tool\nStatus: install ok installed\nArchitecture: amd64\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\n\n"
        "Package: other\nStatus: install ok installed\nArchitecture: all\n")
    (tmp_path / "info/tool:amd64.list").write_text("/.\n/usr\n/usr/bin\n/usr/bin/tool\n/usr/bin/helper\n")
    (tmp_path / "info/gone.list").write_text("/usr/bin/gone\n")
    (tmp_path / "diversions").write_text("/usr/bin/helper\n/usr/bin/helper.distrib\nother\n"
                                         "/usr/bin/mine\n/usr/bin/mine.real\ntool\n")
    return tmp_path


def test_package_files_follow_diversions(tmp_path: Path) -> None:
    admin = _admindir(tmp_path)
    assert dpkg.package_files("tool", admin) == ["/usr", "/usr/bin", "/usr/bin/helper.distrib", "/usr/bin/tool"]
    assert dpkg.package_files("tool:amd64", admin) == dpkg.package_files("tool", admin)


@pytest.mark.parametrize("spec", ["gone", "absent", "tool:arm64"])
def test_package_not_installed_is_enoent(tmp_path: Path, spec: str) -> None:
    with pytest.raises(IpeBpfError) as err:
        dpkg.package_files(spec, _admindir(tmp_path))
    assert err.value.errno_name == "ENOENT" and spec in err.value.message


# ------------------------------------------------------------------ learn

DENY_TEXT = ('type=1420 audit(1733000000.120:7): ipe_op=EXECUTE ipe_hook=BPRM_CHECK enforcing=0 pid=9 '
             'comm="sh" path={path} dev="vdb" ino={ino} rule="DEFAULT op=EXECUTE action=DENY"')


def test_parse_records_text_json_and_hex_paths(tmp_path: Path) -> None:
    lines = [
        DENY_TEXT.format(path='"/usr/bin/ls"', ino=5),
        DENY_TEXT.format(path="2F746D702F6120620A", ino=6),  # "/tmp/a b\n": hex, as the kernel escapes it
        DENY_TEXT.format(path="?", ino="?").replace("dev=\"vdb\"", "dev=?"),
        DENY_TEXT.format(path='"/usr/bin/ok"', ino=7).replace("DEFAULT op=EXECUTE action=DENY", "op=EXECUTE boot_verified=TRUE action=ALLOW"),
        json.dumps({"type": 1420, "ipe_op": "KMODULE", "path": "/m.ko", "ino": 8, "rule": "DEFAULT action=DENY",
                    "action": "DENY", "path_is_name_only": False}),
        json.dumps({"type": 1420, "ipe_op": "EXECUTE", "path": "/ok", "ino": 9, "rule": "DEFAULT action=ALLOW", "action": "ALLOW"}),
        "type=1404 audit(1.0:1): enforcing=0 old_enforcing=1 auid=0 ses=1 enabled=1 old-enabled=1 lsm=ipe res=1",
        "not a record",
    ]
    got = learn.parse_records(lines)
    assert got == [learn.Denial("EXECUTE", b"/usr/bin/ls", 5), learn.Denial("EXECUTE", b"/tmp/a b\n", 6),
                   learn.Denial("EXECUTE", None, None), learn.Denial("KMODULE", b"/m.ko", 8)]


def _fake_verity(monkeypatch: pytest.MonkeyPatch, enabled: set[str]) -> None:
    """fs-verity on the files in `enabled` (this machine's /tmp cannot have it; the VM tests the ioctls)."""
    def digest(path: Path) -> Digest | None:
        return Digest(b"sha256", file_digest(path)) if str(path) in enabled else None

    monkeypatch.setattr(measure, "fsverity_digest", digest)


def test_learn_groups_by_digest_and_lists_what_it_cannot_learn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, a_copy, plain = tmp_path / "a", tmp_path / "a-copy", tmp_path / "plain"
    a.write_bytes(b"same")
    a_copy.write_bytes(b"same")
    plain.write_bytes(b"other")
    _fake_verity(monkeypatch, {str(a), str(a_copy)})
    lines = [DENY_TEXT.format(path=f'"{p}"', ino=os.stat(p).st_ino) for p in (a, a_copy, plain, a)]
    lines.append(DENY_TEXT.format(path='"/nonexistent/x"', ino=1))
    out = learn.learn(learn.parse_records(lines), Options())
    policy = parse_policy(out.text)
    assert [format_rule(r).decode() for r in policy.rules] == [f"op=EXECUTE fsverity_digest=sha256:{file_digest(a).hex()} action=ALLOW"]
    assert f"# {a}\n# {a_copy}\nop=EXECUTE".encode() in out.text
    assert [u.split(":")[0] for u in out.unlearnable] == [f"EXECUTE {plain}", "EXECUTE /nonexistent/x"]
    assert "--enable-verity" in out.unlearnable[0]


def test_learn_refuses_a_replaced_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = tmp_path / "a"
    a.write_bytes(b"x")
    _fake_verity(monkeypatch, {str(a)})
    out = learn.learn(learn.parse_records([DENY_TEXT.format(path=f'"{a}"', ino=os.stat(a).st_ino + 1)]), Options())
    assert not out.grants and "replaced since it was audited" in out.unlearnable[0]


def test_learn_merges_into_a_base_and_skips_what_it_allows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    _fake_verity(monkeypatch, {str(a), str(b)})
    base = (f"policy_name=site policy_version=0.0.1\nDEFAULT action=ALLOW\nDEFAULT op=EXECUTE action=DENY\n"
            f"op=EXECUTE fsverity_digest=sha256:{file_digest(a).hex()} action=ALLOW\n").encode()
    lines = [DENY_TEXT.format(path=f'"{p}"', ino=os.stat(p).st_ino) for p in (a, b)]
    out = learn.learn(learn.parse_records(lines), Options(), base)
    policy = parse_policy(out.text)
    assert policy.version == (0, 0, 2) and out.text.startswith(base.replace(b"0.0.1", b"0.0.2"))
    assert [format_rule(r).decode() for r in policy.rules][1:] == [f"op=EXECUTE fsverity_digest=sha256:{file_digest(b).hex()} action=ALLOW"]
    assert out.already == [f"EXECUTE {a}"]
