"""The policy lifecycle against a fake kernel target: every errno path of docs/design.md, section 5."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from cryptography import x509

from ipe_bpf.audit.policy_records import AuditIdentity, AuditLog
from ipe_bpf.audit.serials import SerialAllocator
from ipe_bpf.errors import IpeBpfError, KernelError, LifecycleError, PolicyError, SignatureError
from ipe_bpf.kernel.lifecycle import Lifecycle, PolicyTarget, policy_name
from ipe_bpf.kernel.store import PolicyStore

from .lifecycle_fixtures import FakeTarget, Signer, make_signer, policy_text

WHO = AuditIdentity(auid=0, ses=3)


@pytest.fixture(scope="module")
def signer() -> Signer:
    return make_signer("ipe-bpf lifecycle test signer")


@pytest.fixture(scope="module")
def stranger() -> Signer:
    return make_signer("nobody trusts me")


@pytest.fixture()
def trust(signer: Signer) -> list[x509.Certificate]:
    return [signer.cert]


@pytest.fixture()
def target() -> FakeTarget:
    return FakeTarget()


class Clock:
    def __init__(self) -> None:
        self.now = 1_732_100_000_000_000_000

    def __call__(self) -> int:
        self.now += 1_000_000  # 1 ms per call
        return self.now


def life_at(root: Path, target: PolicyTarget | None = None) -> Lifecycle:
    return Lifecycle(PolicyStore(root), target, identity=WHO, clock_ns=Clock())


@pytest.fixture()
def life(tmp_path: Path, target: FakeTarget) -> Lifecycle:
    return life_at(tmp_path / "state", target)


def errno_of(excinfo: pytest.ExceptionInfo[IpeBpfError]) -> str:
    return excinfo.value.errno_name


def store_snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "lock"}


def audit_types(life: Lifecycle) -> list[str]:
    return [line.split(" ", 1)[0] for line in AuditLog(life.store.audit_log_path).lines()]


# --------------------------------------------------------------------------------- deploy


def test_deploy_signed_stores_and_does_not_activate(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    blob = signer.sign(policy_text("prod", "1.2.0"))
    outcome = life.deploy(blob, trust)
    assert outcome.changed and not outcome.applied
    info = outcome.policy
    assert info is not None and info.name == b"prod" and info.version == (1, 2, 0)
    assert info.signed and "lifecycle test signer" in (info.signer or "")
    assert info.digest == hashlib.sha256(blob).hexdigest()
    assert not info.active and life.list().active is None
    assert target.calls == []  # deploying never touches the kernel
    assert audit_types(life) == ["type=1422"]
    assert f"policy_digest=sha256:{hashlib.sha256(blob).hexdigest().upper()}" in outcome.records[0]
    assert life.store.blob(life.state().find(b"prod")) == blob  # type: ignore[arg-type]


def test_deploy_plain_text_needs_allow_unsigned(life: Lifecycle, trust) -> None:
    with pytest.raises(SignatureError) as exc:
        life.deploy(policy_text(), trust, source="p.pol")
    assert errno_of(exc) == "EBADMSG" and exc.value.path == "p.pol"
    assert "--unsigned" in exc.value.message
    assert life.list().policies == ()
    outcome = life.deploy(policy_text(), trust, allow_unsigned=True)
    assert outcome.policy is not None and not outcome.policy.signed


def test_deploy_unsigned_allowed_still_verifies_signed_blobs(life: Lifecycle, stranger: Signer, trust) -> None:
    with pytest.raises(SignatureError) as exc:
        life.deploy(stranger.sign(policy_text()), trust, allow_unsigned=True)
    assert errno_of(exc) == "ENOKEY"


def test_deploy_untrusted_signer_is_enokey(life: Lifecycle, stranger: Signer, trust) -> None:
    with pytest.raises(SignatureError) as exc:
        life.deploy(stranger.sign(policy_text()), trust)
    assert errno_of(exc) == "ENOKEY"
    assert life.list().policies == ()


def test_deploy_tampered_blob_is_rejected(life: Lifecycle, signer: Signer, trust) -> None:
    blob = signer.sign(policy_text("prod", "1.0.0"))
    tampered = blob.replace(b"boot_verified=TRUE", b"boot_verified=FALS")
    assert tampered != blob
    with pytest.raises(SignatureError) as exc:
        life.deploy(tampered, trust)
    assert errno_of(exc) == "EKEYREJECTED"


def test_signature_is_checked_before_parsing(life: Lifecycle, stranger: Signer, signer: Signer, trust) -> None:
    bad = b"policy_name=prod policy_version=1.0.x\nDEFAULT action=ALLOW\n"
    with pytest.raises(SignatureError):  # untrusted AND unparsable: the signature wins
        life.deploy(stranger.sign(bad), trust)
    with pytest.raises(PolicyError) as exc:
        life.deploy(signer.sign(bad), trust, source="bad.p7s")
    assert errno_of(exc) == "EINVAL" and exc.value.line == 1 and exc.value.path == "bad.p7s"


def test_deploy_trust_path_is_loaded_only_for_signed_blobs(life: Lifecycle, tmp_path: Path, signer: Signer) -> None:
    missing = tmp_path / "no-such-trust"
    life.deploy(policy_text("test"), missing, allow_unsigned=True)  # no trust needed
    with pytest.raises(SignatureError) as exc:
        life.deploy(signer.sign(policy_text("prod")), missing)
    assert errno_of(exc) == "ENOENT"
    trust_dir = tmp_path / "trust"
    signer.write_cert(trust_dir)
    assert life.deploy(signer.sign(policy_text("prod")), trust_dir).changed


def test_deploy_eexist(life: Lifecycle, signer: Signer, trust) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    for version in ("1.0.0", "2.0.0", "0.9.0"):  # EEXIST comes before any version check
        with pytest.raises(LifecycleError) as exc:
            life.deploy(signer.sign(policy_text("prod", version)), trust)
        assert errno_of(exc) == "EEXIST"
        assert str(exc.value) == 'EEXIST: policy "prod" is already deployed (delete it or use update)'
    assert [p.version for p in life.list().policies] == [(1, 0, 0)]


def test_deploy_below_highest_ever_is_estale(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    life.deploy(signer.sign(policy_text("prod", "2.0.0")), trust)
    life.delete(b"prod")
    with pytest.raises(LifecycleError) as exc:
        life.deploy(signer.sign(policy_text("prod", "1.9.9")), trust)
    assert errno_of(exc) == "ESTALE" and "2.0.0" in exc.value.message
    life.deploy(signer.sign(policy_text("prod", "2.0.1")), trust)


def test_deploy_same_version_other_content_is_estale(life: Lifecycle, signer: Signer, trust) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    life.delete(b"prod")
    with pytest.raises(LifecycleError) as exc:
        life.deploy(signer.sign(policy_text("prod", "1.0.0", "op=KMODULE action=DENY\n")), trust)
    assert errno_of(exc) == "ESTALE"
    # The very same text (signed anew: ECDSA signatures differ each time) may come back.
    again = life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    assert again.policy is not None and again.policy.version == (1, 0, 0)


def test_generations_increase(life: Lifecycle, signer: Signer, trust) -> None:
    a = life.deploy(signer.sign(policy_text("a")), trust).policy
    b = life.deploy(signer.sign(policy_text("b")), trust).policy
    life.delete(b"b")
    c = life.deploy(signer.sign(policy_text("b")), trust).policy
    assert a and b and c and a.generation < b.generation < c.generation


# ------------------------------------------------------------------------------- activate


def test_activate_installs_and_audits(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.2.0")), trust)
    outcome = life.activate(b"prod")
    assert outcome.changed and outcome.applied
    assert outcome.policy is not None and outcome.policy.active
    assert target.policy_name == b"prod" and target.generation == outcome.policy.generation
    assert outcome.records[0].split(": ", 1)[1].startswith(
        "old_active_pol_name=? old_active_pol_version=? old_policy_digest=? "
        'new_active_pol_name="prod" new_active_pol_version=1.2.0 new_policy_digest=sha256:')
    assert audit_types(life) == ["type=1422", "type=1421"]


def test_activate_enoent(life: Lifecycle) -> None:
    with pytest.raises(LifecycleError) as exc:
        life.activate(b"ghost")
    assert errno_of(exc) == "ENOENT"


def test_activate_already_active_is_a_noop(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    life.deploy(signer.sign(policy_text("prod")), trust)
    life.activate(b"prod")
    calls, log = list(target.calls), audit_types(life)
    outcome = life.activate(b"prod")
    assert not outcome.changed and not outcome.applied and outcome.records == ()
    assert target.calls == calls and audit_types(life) == log


def test_activate_lower_version_than_active_is_einval(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    life.deploy(signer.sign(policy_text("prod", "2.0.0")), trust)
    life.deploy(signer.sign(policy_text("test", "1.9.0")), trust)
    life.deploy(signer.sign(policy_text("peer", "2.0.0")), trust)
    life.deploy(signer.sign(policy_text("next", "2.1.0")), trust)
    life.activate(b"prod")
    with pytest.raises(LifecycleError) as exc:  # any name: versions compare across names
        life.activate(b"test")
    assert errno_of(exc) == "EINVAL" and life.list().active.name == b"prod"  # type: ignore[union-attr]
    life.activate(b"peer")  # equal is fine
    old_digest = life.state().find(b"peer").digest.upper()  # type: ignore[union-attr]
    outcome = life.activate(b"next")
    assert f'old_active_pol_name="peer" old_active_pol_version=2.0.0 old_policy_digest=sha256:{old_digest}' in outcome.records[0]
    assert target.policy_name == b"next"


def test_deploy_activate_is_one_change_with_both_records(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    life.activate(b"prod")
    calls = len(target.calls)
    outcome = life.deploy(signer.sign(policy_text("next", "1.1.0")), trust, activate=True)
    assert outcome.changed and outcome.applied and outcome.policy is not None and outcome.policy.active
    assert target.calls[calls:] == [f"install {outcome.policy.generation}"] and target.policy_name == b"next"
    assert [r.split(" ", 1)[0] for r in outcome.records] == ["type=1422", "type=1421"]
    assert 'old_active_pol_name="prod" old_active_pol_version=1.0.0' in outcome.records[1]
    assert life.list().active.name == b"next"  # type: ignore[union-attr]
    later = FakeTarget()  # what `load` installs at the next boot is what deploy installed now
    assert life_at(life.store.root).apply_active(later) is not None
    assert later.installs[0] == target.installs[-1]


def test_deploy_activate_lower_version_than_active_deploys_nothing(life: Lifecycle, signer: Signer, trust,
                                                                   target: FakeTarget) -> None:
    life.deploy(signer.sign(policy_text("prod", "2.0.0")), trust)
    life.activate(b"prod")
    before, calls = store_snapshot(life.store.root), list(target.calls)
    with pytest.raises(LifecycleError) as exc:
        life.deploy(signer.sign(policy_text("old", "1.0.0")), trust, activate=True)
    assert errno_of(exc) == "EINVAL" and "greater than 1.0.0" in str(exc.value)
    assert store_snapshot(life.store.root) == before and target.calls == calls


def test_deploy_activate_kernel_refusal_deploys_nothing(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    before = store_snapshot(life.store.root)
    target.fail_with = OSError(28, "No space left on device")
    with pytest.raises(KernelError) as exc:
        life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust, activate=True)
    assert errno_of(exc) == "ENOSPC"
    assert store_snapshot(life.store.root) == before and life.list().policies == ()


def test_deploy_activate_unloaded_is_recorded_and_applied_at_load(tmp_path: Path, signer: Signer, trust) -> None:
    offline = life_at(tmp_path)
    outcome = offline.deploy(signer.sign(policy_text("prod")), trust, activate=True)
    assert outcome.changed and not outcome.applied and outcome.policy is not None and outcome.policy.active
    target = FakeTarget()
    installed = life_at(tmp_path).apply_active(target)
    assert installed is not None and installed.name == b"prod" and target.policy_name == b"prod"


def test_version_order_is_numeric_not_textual(life: Lifecycle, signer: Signer, trust) -> None:
    life.deploy(signer.sign(policy_text("a", "0.10.0")), trust)
    life.deploy(signer.sign(policy_text("b", "0.9.65535")), trust)
    life.activate(b"a")
    with pytest.raises(LifecycleError) as exc:
        life.activate(b"b")
    assert errno_of(exc) == "EINVAL"


def test_activate_unloaded_records_and_apply_active_installs(tmp_path: Path, signer: Signer, trust) -> None:
    offline = life_at(tmp_path)
    offline.deploy(signer.sign(policy_text("prod")), trust)
    offline.set_enforce(False)
    offline.set_success_audit(True)
    outcome = offline.activate(b"prod")
    assert outcome.changed and not outcome.applied and outcome.policy and outcome.policy.active
    target = FakeTarget()
    installed = life_at(tmp_path).apply_active(target)  # what `load` does
    assert installed is not None and installed.name == b"prod"
    assert target.calls == ["enforce 0", "success_audit 1", f"install {installed.generation}"]
    assert target.installs[0][0].name == b"prod"


def test_apply_active_without_policy_sets_modes_only(life: Lifecycle) -> None:
    target = FakeTarget()
    assert life.apply_active(target) is None
    assert target.calls == ["enforce 1", "success_audit 0"]


# --------------------------------------------------------------------------------- update


def test_update_enoent_comes_first(life: Lifecycle) -> None:
    with pytest.raises(LifecycleError) as exc:
        life.update(b"ghost", b"not even a policy", [], allow_unsigned=False)
    assert errno_of(exc) == "ENOENT"


def test_update_signature_and_parse_errors_before_name_check(life: Lifecycle, signer: Signer, stranger: Signer, trust) -> None:
    life.deploy(signer.sign(policy_text("prod")), trust)
    with pytest.raises(SignatureError) as sig:
        life.update(b"prod", stranger.sign(policy_text("other", "0.0.1")), trust)
    assert errno_of(sig) == "ENOKEY"
    with pytest.raises(PolicyError) as parse:
        life.update(b"prod", signer.sign(b"policy_name=other policy_version=1.2\nDEFAULT action=ALLOW\n"), trust)
    assert errno_of(parse) == "EBADMSG"


def test_update_other_name_is_einval_before_estale(life: Lifecycle, signer: Signer, trust) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    with pytest.raises(LifecycleError) as exc:
        life.update(b"prod", signer.sign(policy_text("other", "0.0.1")), trust)
    assert errno_of(exc) == "EINVAL"


@pytest.mark.parametrize("version", ["1.0.0", "0.9.9", "0.0.0"])
def test_update_not_greater_is_estale(life: Lifecycle, signer: Signer, trust, version: str) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    with pytest.raises(LifecycleError) as exc:
        life.update(b"prod", signer.sign(policy_text("prod", version, "op=KMODULE action=DENY\n")), trust)
    assert errno_of(exc) == "ESTALE"
    assert [p.version for p in life.list().policies] == [(1, 0, 0)]


def test_update_inactive(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    first = life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust).policy
    outcome = life.update(b"prod", signer.sign(policy_text("prod", "1.1.0")), trust)
    assert outcome.policy is not None and outcome.policy.version == (1, 1, 0)
    assert first is not None and outcome.policy.generation > first.generation
    assert not outcome.applied and target.calls == []
    assert [r.split(" ", 1)[0] for r in outcome.records] == ["type=1422"]
    assert len(life.list().policies) == 1


def test_update_active_switches_at_once(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    old_blob = signer.sign(policy_text("prod", "1.0.0"))
    life.deploy(old_blob, trust)
    life.activate(b"prod")
    new_blob = signer.sign(policy_text("prod", "1.1.0"))
    outcome = life.update(b"prod", new_blob, trust)
    assert outcome.applied and outcome.policy and outcome.policy.active
    assert target.generation == outcome.policy.generation
    assert target.installs[-1][0].version == (1, 1, 0)
    load, change = outcome.records
    assert load.startswith("type=1422 ") and change.startswith("type=1421 ")
    old_hex = hashlib.sha256(old_blob).hexdigest().upper()
    new_hex = hashlib.sha256(new_blob).hexdigest().upper()
    assert (f'old_active_pol_name="prod" old_active_pol_version=1.0.0 old_policy_digest=sha256:{old_hex} '
            f'new_active_pol_name="prod" new_active_pol_version=1.1.0 new_policy_digest=sha256:{new_hex} '
            "auid=0 ses=3 lsm=ipe res=1") in change


def test_update_reused_name_after_failed_update_keeps_old(life: Lifecycle, signer: Signer, trust) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    with pytest.raises(IpeBpfError):
        life.update(b"prod", signer.sign(b"garbage"), trust)
    assert life.list().policies[0].version == (1, 0, 0)


# --------------------------------------------------------------------------------- delete


def test_delete_enoent_eperm_and_reuse(life: Lifecycle, signer: Signer, trust) -> None:
    with pytest.raises(LifecycleError) as absent:
        life.delete(b"prod")
    assert errno_of(absent) == "ENOENT"
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    life.deploy(signer.sign(policy_text("other", "1.0.0")), trust)
    life.activate(b"prod")
    with pytest.raises(LifecycleError) as active:
        life.delete(b"prod")
    assert errno_of(active) == "EPERM"
    outcome = life.delete(b"other")
    assert outcome.policy is not None and outcome.policy.name == b"other"
    assert [p.name for p in life.list().policies] == [b"prod"]
    life.deploy(signer.sign(policy_text("other", "1.0.0")), trust)  # the name can be reused


def test_no_way_back_to_no_policy(life: Lifecycle, signer: Signer, trust) -> None:
    life.deploy(signer.sign(policy_text("prod")), trust)
    life.activate(b"prod")
    with pytest.raises(LifecycleError):
        life.delete(b"prod")
    assert not hasattr(life, "deactivate")
    assert life.list().active is not None


# ---------------------------------------------------------------------- enforce / audit


def test_set_enforce_audits_changes_only(life: Lifecycle, target: FakeTarget) -> None:
    same = life.set_enforce(True)  # default is enforcing, like ipe.enforce=1
    assert not same.changed and same.applied and same.records == ()
    off = life.set_enforce(False)
    assert off.changed and target.enforce is False
    assert off.records[0].endswith("enforcing=0 old_enforcing=1 auid=0 ses=3 enabled=1 old-enabled=1 lsm=ipe res=1")
    on = life.set_enforce(True)
    assert "enforcing=1 old_enforcing=0" in on.records[0]
    assert audit_types(life) == ["type=1404", "type=1404"]
    assert life.list().enforce is True


def test_set_success_audit_emits_no_record(life: Lifecycle, target: FakeTarget) -> None:
    outcome = life.set_success_audit(True)
    assert outcome.changed and outcome.records == () and target.success_audit is True
    assert life.list().success_audit is True and audit_types(life) == []


def test_audit_serials_increase(life: Lifecycle, signer: Signer, trust) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    life.activate(b"prod")
    life.update(b"prod", signer.sign(policy_text("prod", "1.0.1")), trust)
    life.set_enforce(False)
    serials = [int(line.split(":", 1)[1].split(")", 1)[0]) for line in AuditLog(life.store.audit_log_path).lines()]
    assert serials == [1, 2, 3, 4, 5]
    stamps = [line.split("(", 1)[1].split(":", 1)[0] for line in AuditLog(life.store.audit_log_path).lines()]
    assert all(len(s.split(".")[1]) == 3 for s in stamps)


def test_serials_come_from_the_per_boot_sequence_and_reach_the_spool(
        life: Lifecycle, signer: Signer, trust, tmp_path: Path) -> None:
    """Other ipe-bpf processes (the audit daemon, load) number from the same counter: the
    lifecycle's serials continue after theirs, and its lines are handed to the daemon's spool."""
    run = Path(os.environ["IPE_BPF_RUN_DIR"])
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    assert SerialAllocator.in_dir(run).allocate(40) == 2  # e.g. a batch of decisions
    life.activate(b"prod")
    serials = [int(line.split(":", 1)[1].split(")", 1)[0]) for line in AuditLog(life.store.audit_log_path).lines()]
    assert serials == [1, 42]
    assert (run / "spool.log").read_text().splitlines() == AuditLog(life.store.audit_log_path).lines()


# ------------------------------------------------------------------------ crash safety


def test_failing_install_on_activate_leaves_store_unchanged(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    life.deploy(signer.sign(policy_text("next", "1.1.0")), trust)
    life.activate(b"prod")
    before = store_snapshot(life.store.root)
    target.fail_with = KernelError("EIO", "map update failed")
    with pytest.raises(KernelError):
        life.activate(b"next")
    assert store_snapshot(life.store.root) == before
    assert life.list().active.name == b"prod"  # type: ignore[union-attr]


def test_failing_install_on_update_leaves_store_unchanged(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    life.activate(b"prod")
    before = store_snapshot(life.store.root)
    target.fail_with = OSError(28, "No space left on device")
    with pytest.raises(KernelError) as exc:
        life.update(b"prod", signer.sign(policy_text("prod", "2.0.0")), trust)
    assert errno_of(exc) == "ENOSPC"
    assert store_snapshot(life.store.root) == before
    target.fail_with = None
    # Rollback memory was not advanced either: 1.5.0 is still acceptable.
    assert life.update(b"prod", signer.sign(policy_text("prod", "1.5.0")), trust).applied


def test_failing_set_enforce_leaves_store_unchanged(life: Lifecycle, target: FakeTarget) -> None:
    target.fail_with = OSError(1, "Operation not permitted")
    with pytest.raises(KernelError) as exc:
        life.set_enforce(False)
    assert errno_of(exc) == "EPERM"
    assert life.list().enforce is True and audit_types(life) == []


@pytest.mark.parametrize("in_one_step", [False, True], ids=["activate", "deploy-activate"])
def test_failing_store_commit_rolls_the_kernel_back(life: Lifecycle, signer: Signer, trust, target: FakeTarget,
                                                   monkeypatch: pytest.MonkeyPatch, in_one_step: bool) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    following = signer.sign(policy_text("next", "1.1.0"))
    if not in_one_step:
        life.deploy(following, trust)
    life.activate(b"prod")
    prod_generation = target.generation

    def broken_commit(*args: object, **kwargs: object) -> None:
        raise LifecycleError("ENOSPC", "disk full")

    monkeypatch.setattr(life.store, "commit", broken_commit)
    with pytest.raises(LifecycleError):
        if in_one_step:
            life.deploy(following, trust, activate=True)
        else:
            life.activate(b"next")
    assert target.policy_name == b"prod" and target.generation == prod_generation
    assert [c.split()[0] for c in target.calls[-2:]] == ["install", "install"]


def test_crash_between_blob_and_state_write_keeps_old_state(life: Lifecycle, signer: Signer, trust,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    life.deploy(signer.sign(policy_text("prod", "1.0.0")), trust)
    import ipe_bpf.kernel.store as store_module

    real = store_module.write_atomic

    def crash_on_state(path: Path, data: bytes, mode: int = 0o644, **how: bool) -> None:
        if path.name == "state.json":
            raise OSError(5, "Input/output error")
        real(path, data, mode, **how)

    monkeypatch.setattr(store_module, "write_atomic", crash_on_state)
    with pytest.raises(LifecycleError) as exc:
        life.deploy(signer.sign(policy_text("other", "1.0.0")), trust)
    assert errno_of(exc) == "EIO"
    monkeypatch.setattr(store_module, "write_atomic", real)
    assert [p.name for p in life.list().policies] == [b"prod"]
    life.deploy(signer.sign(policy_text("third", "1.0.0")), trust)  # next commit collects the orphan blob
    assert len(list((life.store.root / "policies").glob("*.p7s"))) == 2


def test_tampered_stored_blob_is_refused(life: Lifecycle, signer: Signer, trust, target: FakeTarget) -> None:
    life.deploy(signer.sign(policy_text("prod")), trust)
    [blob] = (life.store.root / "policies").glob("*.p7s")
    blob.write_bytes(blob.read_bytes() + b"\n")
    with pytest.raises(LifecycleError) as exc:
        life.activate(b"prod")
    assert errno_of(exc) == "EUCLEAN" and target.calls == []


# --------------------------------------------------------------------------- persistence


def test_highest_version_survives_reboot(tmp_path: Path, signer: Signer, trust) -> None:
    before = life_at(tmp_path)
    before.deploy(signer.sign(policy_text("prod", "3.0.0")), trust)
    before.activate(b"prod")
    before.deploy(signer.sign(policy_text("spare", "3.0.0")), trust)
    before.activate(b"spare")
    before.delete(b"prod")
    after = life_at(tmp_path, FakeTarget())  # a new process after a reboot
    assert after.list().active.name == b"spare"  # type: ignore[union-attr]
    with pytest.raises(LifecycleError) as exc:
        after.deploy(signer.sign(policy_text("prod", "2.9.9")), trust)
    assert errno_of(exc) == "ESTALE"
    assert after.deploy(signer.sign(policy_text("prod", "3.0.0")), trust).changed


def test_generation_and_serial_continue_after_reboot(tmp_path: Path, signer: Signer, trust) -> None:
    first = life_at(tmp_path).deploy(signer.sign(policy_text("a")), trust)
    second = life_at(tmp_path).deploy(signer.sign(policy_text("b")), trust)
    assert first.policy and second.policy and second.policy.generation == first.policy.generation + 1
    assert second.records[0].split(":", 1)[1].startswith("2)")


def test_rule_texts_by_generation(life: Lifecycle, signer: Signer, trust) -> None:
    extra = "op=KMODULE dmverity_signature=FALSE action=DENY\n"
    old = life.deploy(signer.sign(policy_text("prod", "1.0.0", extra)), trust).policy
    assert old is not None
    assert life.rule_texts(old.generation) == (
        "op=EXECUTE boot_verified=TRUE action=ALLOW", "op=KMODULE dmverity_signature=FALSE action=DENY")
    new = life.update(b"prod", signer.sign(policy_text("prod", "1.0.1")), trust).policy
    assert new is not None
    assert life.rule_texts(new.generation) == ("op=EXECUTE boot_verified=TRUE action=ALLOW",)
    fresh = life_at(life.store.root)  # replaced policies still decode, from disk
    assert fresh.rule_texts(old.generation) is not None and len(fresh.rule_texts(old.generation) or ()) == 2
    assert fresh.rule_texts(9999) is None


def test_policy_name_from_argv_round_trips_raw_bytes() -> None:
    import os

    raw = b"caf\xe9\xff"
    assert policy_name(os.fsdecode(raw)) == raw


def test_raw_byte_names_work_end_to_end(life: Lifecycle, target: FakeTarget) -> None:
    name = b"n\xe9\xff\"x"
    text = b"policy_name=" + name + b" policy_version=1.0.0\nDEFAULT action=ALLOW\n"
    life.deploy(text, [], allow_unsigned=True)
    outcome = life.activate(name)
    assert b'new_active_pol_name="n\xe9\xff"x"' in outcome.records[0].encode("utf-8", "surrogateescape")
    raw_log = life.store.audit_log_path.read_bytes()
    assert b'policy_name="n\xe9\xff"x" policy_version=1.0.0' in raw_log
    assert life_at(life.store.root).list().active.name == name  # type: ignore[union-attr]


def test_fake_target_satisfies_protocol() -> None:
    assert isinstance(FakeTarget(), PolicyTarget)


def test_apply_active_boot_mode_is_recorded_without_1404(tmp_path: Path, signer: Signer, trust) -> None:
    life = life_at(tmp_path)
    life.deploy(signer.sign(policy_text("prod")), trust)
    life.activate(b"prod")
    target = FakeTarget()
    life.apply_active(target, enforce=False)  # `load --permissive`
    assert target.enforce is False and life.list().enforce is False
    assert "type=1404" not in audit_types(life)
    again = FakeTarget()
    life_at(tmp_path).apply_active(again, enforce=True)  # a plain `load` enforces again
    assert again.enforce is True and life.list().enforce is True
    assert again.calls[-1] == f"install {life.list().active.generation}"  # type: ignore[union-attr]


def test_rule_text_is_a_rule_lookup(life: Lifecycle, signer: Signer, trust) -> None:
    info = life.deploy(signer.sign(policy_text("prod")), trust).policy
    assert info is not None
    assert life.rule_text(info.generation, 0) == "op=EXECUTE boot_verified=TRUE action=ALLOW"
    assert life.rule_text(info.generation, 1) is None
    assert life.rule_text(info.generation, -1) is None
    assert life.rule_text(info.generation + 100, 0) is None


class Deactivatable(FakeTarget):
    def deactivate(self) -> None:
        self.calls.append("deactivate")
        self.installs.clear()


@pytest.mark.parametrize("operation", ["activate", "enforce", "success_audit"])
def test_failing_commit_undoes_exactly_the_kernel_change(tmp_path: Path, signer: Signer, trust,
                                                        monkeypatch: pytest.MonkeyPatch, operation: str) -> None:
    target = Deactivatable()
    life = life_at(tmp_path, target)
    life.deploy(signer.sign(policy_text("prod")), trust)

    def broken_commit(*args: object, **kwargs: object) -> None:
        raise LifecycleError("EROFS", "read-only file system")

    monkeypatch.setattr(life.store, "commit", broken_commit)
    with pytest.raises(LifecycleError):
        if operation == "activate":
            life.activate(b"prod")  # the first activation: back to no policy
        elif operation == "enforce":
            life.set_enforce(False)
        else:
            life.set_success_audit(True)
    expected = {
        "activate": ["install 1", "deactivate"],
        "enforce": ["enforce 0", "enforce 1"],
        "success_audit": ["success_audit 1", "success_audit 0"],
    }[operation]
    assert target.calls == expected and target.installs == []
