"""Exec decisions by fs-verity digest, modes, audit records and counters (real kernel)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from ipe_bpf.audit.render import ipe_fields, ipe_text
from ipe_bpf.kernel import pins

from .kernel_fixtures import FSV, Kernel, expected_hooks, get_kernel, ipe, kernel, measure, policy, sh  # noqa: F401

EACCES = 13


def test_loaded_and_loader_process_gone(kernel: Kernel) -> None:
    # The loader was SIGKILLed after pinning: the links must still be there.
    assert pins.is_loaded()
    assert sorted(p.name for p in pins.link_paths()) == expected_hooks()


def test_no_policy_allows_everything_and_audits_nothing(ipe: Kernel) -> None:
    with ipe.maps() as maps:
        maps.set_success_audit(True)
    assert ipe.exec_status(ipe.bad) == 0
    assert ipe.drain() == []


def test_exec_denied_by_fsverity_digest_and_modified_copy_differs(ipe: Kernel) -> None:
    assert ipe.good_digest != ipe.bad_digest
    gen = ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"))
    assert ipe.exec_status(ipe.good) == 0
    assert ipe.exec_status(ipe.bad) == EACCES
    assert ipe.exec_status(ipe.plain) == 0
    recs = ipe.audit_for(ipe.bad)
    assert recs, "a DENY must be audited"
    r = recs[0]
    assert (r.op, r.hook, r.action, r.source, r.rule_index, r.generation, r.enforcing) == (
        "EXECUTE", "BPRM_CHECK", "DENY", "rule", 0, gen, True)
    assert r.path == str(ipe.bad).encode() and not r.path_is_name_only
    assert r.dev == b"loop0" or r.dev.startswith(b"loop")
    assert r.ino == ipe.bad.stat().st_ino


def test_exec_allowed_by_fsverity_digest_under_default_deny_for_execute(ipe: Kernel) -> None:
    # Only EXECUTE of things the helper runs is affected; the helper itself is allowed too.
    ipe.activate(policy(
        f"op=EXECUTE fsverity_digest={ipe.attack_digest} action=ALLOW",
        f"op=EXECUTE fsverity_digest={ipe.good_digest} action=ALLOW",
        f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY",
    ))
    assert ipe.exec_status(ipe.good) == 0
    assert ipe.exec_status(ipe.bad) == EACCES


def test_same_file_flips_with_the_policy(ipe: Kernel) -> None:
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.good_digest} action=DENY"))
    assert ipe.exec_status(ipe.good) == EACCES
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.good_digest} action=ALLOW"))
    assert ipe.exec_status(ipe.good) == 0


def test_a_decision_made_before_fs_verity_is_enabled_is_not_reused(ipe: Kernel) -> None:
    """The program caches decisions per inode: turning fs-verity on afterwards must count.
    The same policy throughout; the file is decided (allowed, plain), gets fs-verity, and the
    next decision sees its digest."""
    target = FSV / "later-verity"
    target.unlink(missing_ok=True)
    target.write_bytes(ipe.good.read_bytes() + b"later")
    target.chmod(0o755)
    digest_copy = FSV / "later-verity-digest"  # its digest, measured on a twin
    digest_copy.unlink(missing_ok=True)
    digest_copy.write_bytes(target.read_bytes())
    sh("fsverity", "enable", digest_copy)
    digest = measure(digest_copy)
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={digest} action=DENY"))
    for _ in range(3):
        assert ipe.exec_status(target) == 0  # plain: no digest, allowed (and cached)
    sh("fsverity", "enable", target)
    assert ipe.exec_status(target) == EACCES
    assert ipe.exec_status(target) == EACCES  # and the new decision is what is cached


def test_op_default_and_global_default_sources(ipe: Kernel) -> None:
    ipe.activate(policy(
        f"op=EXECUTE fsverity_digest={ipe.good_digest} action=ALLOW",
        extra_defaults="DEFAULT op=KMODULE action=DENY",
    ))
    with ipe.maps() as maps:
        maps.set_success_audit(True)
    assert ipe.exec_status(ipe.good) == 0
    bprm = [r for r in ipe.audit_for(ipe.good) if r.hook == "BPRM_CHECK"]
    assert bprm and bprm[0].source == "rule" and bprm[0].action == "ALLOW"
    alg, hexdigest = ipe.good_digest.split(":")  # reprinted the kernel's way: "alg":HEX
    assert bprm[0].rule == f'op=EXECUTE fsverity_digest="{alg}":{hexdigest.upper()} action=ALLOW'
    assert ipe.exec_status(ipe.plain) == 0
    plain = [r for r in ipe.audit_for(ipe.plain) if r.hook == "BPRM_CHECK"]
    assert plain and plain[0].source == "global_default" and plain[0].rule == "DEFAULT action=ALLOW"


def test_permissive_allows_but_audits_with_enforcing_0(ipe: Kernel) -> None:
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"))
    with ipe.maps() as maps:
        maps.set_enforce(False)
        assert not maps.state().enforcing
    assert ipe.exec_status(ipe.bad) == 0
    recs = [r for r in ipe.audit_for(ipe.bad) if r.hook == "BPRM_CHECK"]
    assert recs and recs[0].action == "DENY" and not recs[0].enforcing
    assert " enforcing=0 " in ipe_fields(recs[0])


def test_success_audit_records_allows(ipe: Kernel) -> None:
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"))
    assert ipe.exec_status(ipe.good) == 0
    assert ipe.audit_for(ipe.good) == []
    with ipe.maps() as maps:
        maps.set_success_audit(True)
    assert ipe.exec_status(ipe.good) == 0
    recs = ipe.audit_for(ipe.good)
    hooks = {r.hook for r in recs}
    assert "BPRM_CHECK" in hooks and "MMAP" in hooks  # the ELF loader maps the binary's code
    assert all(r.action == "ALLOW" for r in recs)


_FIELDS = re.compile(
    r'^type=1420 audit\(\d+\.\d{3}:\d+\): ipe_op=EXECUTE ipe_hook=BPRM_CHECK enforcing=1 pid=\d+ '
    r'comm="attack" path="(?P<path>[^"]+)" dev="(?P<dev>[^"]+)" ino=(?P<ino>\d+) '
    r'rule="op=EXECUTE fsverity_digest="sha256":[0-9A-F]{64} action=DENY"$'
)


def test_audit_record_format_matches_spec(ipe: Kernel) -> None:
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"))
    assert ipe.exec_status(ipe.bad) == EACCES
    recs = [r for r in ipe.audit_for(ipe.bad) if r.hook == "BPRM_CHECK"]
    line = ipe_text(recs[0], 1)
    m = _FIELDS.match(line)
    assert m, line
    assert m["path"] == str(ipe.bad) and int(m["ino"]) == ipe.bad.stat().st_ino


def test_cli_status_and_audit_tail_json(ipe: Kernel) -> None:
    gen = ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"))
    assert ipe.exec_status(ipe.bad) == EACCES
    out = subprocess.run(["python3", "-m", "ipe_bpf", "audit", "tail", "--json"],
                         capture_output=True, text=True, check=True).stdout
    docs = [json.loads(line) for line in out.splitlines()]
    assert any(d["path"] == str(ipe.bad) and d["ipe_hook"] == "BPRM_CHECK" and d["generation"] == gen
               for d in docs)
    status = json.loads(subprocess.run(["python3", "-m", "ipe_bpf", "status", "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert status["loaded"] and status["generation"] == gen and status["enforcing"]
    assert status["counters"]["deny"]["EXECUTE"] >= 1
    assert status["counters"]["dropped"] == 0


def _status_memory() -> dict:
    out = subprocess.run(["python3", "-m", "ipe_bpf", "status", "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["map_memory"]


def test_cli_status_reports_map_memory_that_grows_and_shrinks_with_the_policy(ipe: Kernel) -> None:
    import random

    ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY",
                        "op=KEXEC_IMAGE boot_verified=TRUE action=ALLOW"))
    small = _status_memory()
    rules = small["maps"]["ipe_rules"]
    # the tables are made per policy, sized to it: one digest, a handful of rule entries
    assert small["maps"]["ipe_digests"]["max_entries"] == 1 and 1 <= rules["max_entries"] <= 8
    assert rules["key_size"] == 12 and rules["value_size"] == 8
    assert small["total"] == sum(m["memlock"] for m in small["maps"].values())
    rng = random.Random(7)
    ipe.activate(policy(*(f"op=EXECUTE fsverity_digest=sha256:{rng.getrandbits(256):064x} action=DENY"
                          for _ in range(20_000))))
    big = _status_memory()
    ipe.activate(policy())  # leave a small policy behind: the big tables go
    after = _status_memory()
    text = subprocess.run(["python3", "-m", "ipe_bpf", "status"], capture_output=True, text=True, check=True).stdout
    assert "map memory: " in text and "ipe_rules " in text and "ipe_digests " in text
    digests = [m["maps"]["ipe_digests"] for m in (small, big, after)]
    assert digests[1]["max_entries"] == 20_000, big
    assert big["maps"]["ipe_rules"]["max_entries"] == 0, big  # each rule lives with its digest: no rules table
    assert digests[1]["memlock"] - digests[0]["memlock"] >= 20_000 * 84, (small, big)  # at least the keys
    assert digests[2]["memlock"] < digests[1]["memlock"] // 100, (big, after)
    assert big["total"] < 64 << 20, big  # plausible: what 20k digests need, no fixed capacity


def test_enforce_and_success_audit_cli(ipe: Kernel) -> None:
    from ipe_bpf.kernel.store import PolicyStore

    log = PolicyStore.default().audit_log_path
    before = log.read_text().count("type=1404") if log.exists() else 0
    try:
        for args in (["enforce", "off"], ["success-audit", "on"]):
            subprocess.run(["python3", "-m", "ipe_bpf", *args], check=True)
        with ipe.maps() as maps:
            st = maps.state()
        assert not st.enforcing and st.success_audit
        assert log.read_text().count("type=1404") == before + 1
        assert "enforcing=0 old_enforcing=1" in log.read_text().splitlines()[-1]
        ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"))
        assert ipe.exec_status(ipe.bad) == 0  # permissive: allowed, and audited as a denial
        assert any(r.action == "DENY" and not r.enforcing for r in ipe.audit_for(ipe.bad))
    finally:  # the store keeps these settings for the next `load`: put them back
        for args in (["enforce", "on"], ["success-audit", "off"]):
            subprocess.run(["python3", "-m", "ipe_bpf", *args], check=True)


@pytest.mark.requires("overlay_verity")
def test_overlayfs_file_is_judged_by_its_real_inode(ipe: Kernel) -> None:
    from pathlib import Path

    from .kernel_fixtures import SCRATCH, sh

    lower, upper, work, merged = (SCRATCH / "ovl" / d for d in ("lower", "upper", "work", "merged"))
    if not Path("/sys/kernel/btf/overlay").exists():
        sh("modprobe", "overlay")
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    # the lower layer is the fs-verity scratch fs itself (its files keep their verity)
    if not os.path.ismount(merged):
        sh("mount", "-t", "overlay", "overlay", "-o",
           f"lowerdir={ipe.bad.parent},upperdir={upper},workdir={work}", merged)
    via_overlay = merged / ipe.bad.name
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"))
    assert ipe.exec_status(merged / ipe.good.name) == 0
    assert ipe.exec_status(via_overlay) == EACCES
    recs = [r for r in ipe.drain() if r.hook == "BPRM_CHECK" and r.path == str(via_overlay).encode()]
    assert recs and recs[0].dev == b"overlay"


def test_full_ring_buffer_drops_records_and_never_blocks_or_denies(ipe: Kernel) -> None:
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"))
    with ipe.maps() as maps:
        maps.set_success_audit(True)
        before = maps.drops()
    # nobody reads the ring buffer meanwhile: ~8 audited decisions per exec overflow it
    statuses = [ipe.exec_status(ipe.good) for _ in range(150)]
    assert set(statuses) == {0}
    assert ipe.exec_status(ipe.bad) == EACCES
    with ipe.maps() as maps:
        after = maps.drops()
    assert after > before


def test_doctor_reports_a_ready_machine_and_what_this_kernel_can_evaluate(kernel: Kernel) -> None:
    """Every fatal check passes; per property, doctor says what the kernel's BTF shows: the
    signature properties need the setintegrity hooks (6.12+; without them doctor and status
    say they are always FALSE), the rest every line has."""
    r = subprocess.run(["python3", "-m", "ipe_bpf", "doctor", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert all(c["ok"] for c in checks.values() if c["fatal"]), checks
    loader = os.environ.get("IPE_BPF_LOADER") or "core"
    assert checks["loader"]["detail"].startswith(f"{loader}:"), checks["loader"]
    hooks = Path("/proc/kallsyms").read_text()
    has_hooks = "bpf_lsm_bdev_setintegrity" in hooks and "bpf_lsm_inode_setintegrity" in hooks
    for prop in ("boot_verified", "dmverity_roothash", "fsverity_digest"):
        assert checks[f"property {prop}"]["ok"], checks[f"property {prop}"]
    for prop in ("dmverity_signature", "fsverity_signature"):
        check = checks[f"property {prop}"]
        assert check["ok"] == has_hooks, check
        assert check["detail"].startswith("always FALSE on this kernel: kernel keeps no") != has_hooks, check
    assert checks["hooks"]["ok"] == has_hooks
    status = json.loads(subprocess.run(["python3", "-m", "ipe_bpf", "status", "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert sorted(status["always_false"]) == ([] if has_hooks else ["dmverity_signature", "fsverity_signature"])
    assert all(checks[f"op {op}"]["ok"] for op in ("EXECUTE", "KMODULE", "FIRMWARE")), checks


def test_deploy_refuses_a_property_this_kernel_cannot_evaluate_unless_allowed(kernel: Kernel, tmp_path: Path) -> None:
    """Through the CLI: where the kernel keeps no signature state (6.1), deploying a policy that
    tests fsverity_signature fails with EOPNOTSUPP naming the property, the release and FALSE;
    --allow-unevaluable deploys it with a warning naming the rule's line.  Elsewhere it deploys."""
    hooks = Path("/proc/kallsyms").read_text()
    kept = "bpf_lsm_inode_setintegrity" in hooks
    path = tmp_path / "unevaluable.pol"
    path.write_text(policy("op=EXECUTE fsverity_signature=TRUE action=DENY", name="unevaluable"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["python3", "-m", "ipe_bpf", *args], capture_output=True, text=True)

    try:
        first = cli("policy", "deploy", "--unsigned", str(path))
        if kept:
            assert first.returncode == 0 and "always FALSE" not in first.stderr, first.stderr
            return
        assert first.returncode == 1, first.stderr
        assert first.stderr.startswith("deploy: EOPNOTSUPP: ") and "fsverity_signature" in first.stderr
        assert os.uname().release in first.stderr and "evaluate as FALSE" in first.stderr
        second = cli("policy", "deploy", "--unsigned", "--allow-unevaluable", str(path))
        assert second.returncode == 0, second.stderr
        assert "fsverity_signature is always FALSE" in second.stderr and "line 3 " in second.stderr
    finally:
        cli("policy", "delete", "unevaluable")
