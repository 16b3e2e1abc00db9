"""Every policy shipped in policies/ parses and says what its comments promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipe_bpf.policy.evaluate import evaluate
from ipe_bpf.policy.model import NO_FILE, Action, FileAttributes, Op
from ipe_bpf.policy.parser import parse_policy

POLICIES = sorted((Path(__file__).resolve().parents[2] / "policies").glob("*.pol"))


def test_there_are_examples() -> None:
    assert len(POLICIES) >= 5


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_example_parses(path: Path) -> None:
    policy = parse_policy(path.read_bytes())
    assert policy.name.decode() == path.stem.replace("-", "_")


def _load(name: str):
    return parse_policy((POLICIES[0].parent / name).read_bytes())


def test_boot_verified_example() -> None:
    policy = _load("boot-verified.pol")
    assert evaluate(policy, Op.EXECUTE, FileAttributes(boot_verified=True)).action is Action.ALLOW
    assert evaluate(policy, Op.EXECUTE, FileAttributes()).action is Action.DENY
    assert evaluate(policy, Op.EXECUTE, NO_FILE).action is Action.DENY


def test_lock_kernel_loads_example() -> None:
    policy = _load("lock-kernel-loads.pol")
    assert evaluate(policy, Op.KMODULE, NO_FILE).action is Action.DENY
    assert evaluate(policy, Op.KMODULE, FileAttributes(dmverity_signature=True)).action is Action.ALLOW
    assert evaluate(policy, Op.EXECUTE, FileAttributes()).action is Action.ALLOW
