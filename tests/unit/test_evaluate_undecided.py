"""Signature states: one the kernel keeps none of is FALSE (KernelFeatures.as_evaluated, as
bpf/ipe_bpf.bpf.c reads them), one it keeps but the program has no record of for a file is
decided fail-closed (evaluate_undecided, as ipe_decide_all does): what the explain command and
the VM's differential tests expect."""

from __future__ import annotations

import pytest

from ipe_bpf.kernel.features import KernelFeatures
from ipe_bpf.kernel.pins import HOOKS
from ipe_bpf.policy.evaluate import evaluate, evaluate_undecided
from ipe_bpf.policy.model import Action, BoolKey, Digest, FileAttributes, Op
from ipe_bpf.policy.parser import parse_policy

ROOT = Digest(b"sha256", bytes(range(32)))
FSV = Digest(b"sha256", bytes(range(1, 33)))
DMV, FSS = BoolKey.DMVERITY_SIGNATURE, BoolKey.FSVERITY_SIGNATURE


def policy(*rules: str, default: str = "ALLOW"):  # type: ignore[no-untyped-def]
    text = "\n".join(["policy_name=u policy_version=0.0.1", f"DEFAULT action={default}", *rules])
    return parse_policy(text.encode())


def test_a_deny_that_hangs_on_an_unknown_state_wins() -> None:
    p = policy("op=EXECUTE dmverity_signature=TRUE action=DENY")
    attrs = FileAttributes(dmverity_roothash=ROOT)
    assert evaluate(p, Op.EXECUTE, attrs).action is Action.ALLOW  # known unsigned: allowed
    d = evaluate_undecided(p, Op.EXECUTE, attrs, frozenset({DMV}))
    assert d.action is Action.DENY and d.rule is p.rules[0]


def test_an_allow_that_hangs_on_an_unknown_state_is_not_taken() -> None:
    p = policy("op=EXECUTE fsverity_signature=TRUE action=ALLOW", default="DENY")
    attrs = FileAttributes(fsverity_digest=FSV, fsverity_signature=True)  # the truth, unknowable here
    assert evaluate(p, Op.EXECUTE, attrs).action is Action.ALLOW
    assert evaluate_undecided(p, Op.EXECUTE, attrs, frozenset({FSS})).action is Action.DENY


def test_a_state_no_rule_tests_changes_nothing() -> None:
    p = policy(f"op=EXECUTE fsverity_digest=sha256:{FSV.value.hex()} action=ALLOW", default="DENY")
    attrs = FileAttributes(fsverity_digest=FSV)
    assert evaluate_undecided(p, Op.EXECUTE, attrs, frozenset({FSS, DMV})) == evaluate(p, Op.EXECUTE, attrs)


def test_both_unknown_tries_them_together() -> None:
    p = policy("op=EXECUTE dmverity_signature=TRUE fsverity_signature=TRUE action=DENY")
    attrs = FileAttributes(dmverity_roothash=ROOT, fsverity_digest=FSV)
    assert evaluate_undecided(p, Op.EXECUTE, attrs, frozenset({DMV})).action is Action.ALLOW
    assert evaluate_undecided(p, Op.EXECUTE, attrs, frozenset({DMV, FSS})).action is Action.DENY


NO_HOOKS = tuple(h for h in HOOKS if not h.endswith("setintegrity"))
SIGNED = FileAttributes(dmverity_roothash=ROOT, dmverity_signature=True, fsverity_digest=FSV, fsverity_signature=True)


@pytest.mark.parametrize("hooks, dm_signature, want", [
    (HOOKS, False, SIGNED),  # 6.12: the hooks report both
    (NO_HOOKS, False, FileAttributes(dmverity_roothash=ROOT, fsverity_digest=FSV)),  # 6.1: keeps neither
    (NO_HOOKS, True, FileAttributes(dmverity_roothash=ROOT, dmverity_signature=True, fsverity_digest=FSV)),
])
def test_a_signature_state_the_kernel_keeps_none_of_is_false(hooks: tuple[str, ...], dm_signature: bool,
                                                            want: FileAttributes) -> None:
    found = KernelFeatures(hooks, "inode", None, True, dm_signature, True, False)
    assert found.as_evaluated(SIGNED) == want
    assert found.as_evaluated(FileAttributes()) == FileAttributes()


def test_on_6_1_a_signature_false_rule_matches_signed_files_and_is_not_fail_closed() -> None:
    p = policy("op=EXECUTE dmverity_signature=FALSE fsverity_signature=FALSE action=ALLOW", default="DENY")
    kernel_6_1 = KernelFeatures(NO_HOOKS, "inode", None, True, False, True, False)
    assert evaluate(p, Op.EXECUTE, SIGNED).action is Action.DENY  # where the kernel keeps them
    d = evaluate(p, Op.EXECUTE, kernel_6_1.as_evaluated(SIGNED))
    assert d.action is Action.ALLOW and d.rule is p.rules[0]


def test_a_digest_the_kernel_cannot_read_is_absent() -> None:
    no_fsverity = KernelFeatures(HOOKS, None, None, True, True, True, False)
    assert no_fsverity.as_evaluated(SIGNED) == FileAttributes(dmverity_roothash=ROOT, dmverity_signature=True)
