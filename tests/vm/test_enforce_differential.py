"""Differential: the kernel's decisions equal the reference evaluator's on generated policies.

A fixed set of real files with known attributes (fs-verity digests measured with
`fsverity measure`, dm-verity root hashes from `veritysetup format`) is executed under
many random policies; with success_audit on, every BPRM_CHECK decision is audited, and
its action, source and rule index must be what ipe_bpf.policy.evaluate says.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from ipe_bpf.audit.record import AccessRecord
from ipe_bpf.kernel.features import running_kernel
from ipe_bpf.policy.evaluate import Source, evaluate
from ipe_bpf.policy.model import Digest, FileAttributes, Op
from ipe_bpf.policy.parser import parse_policy

from .kernel_fixtures import ALLOW_ALL, Kernel, get_kernel, ipe, kernel  # noqa: F401

POLICIES = 40


def _digest(text: str) -> Digest:
    alg, _, hexed = text.partition(":")
    return Digest(alg.encode(), bytes.fromhex(hexed))


def _files(k: Kernel) -> dict[Path, FileAttributes]:
    def dmv(vol):  # type: ignore[no-untyped-def]
        return Digest(b"sha256", bytes.fromhex(vol.roothash))

    return {
        k.good: FileAttributes(fsverity_digest=_digest(k.good_digest)),
        k.bad: FileAttributes(fsverity_digest=_digest(k.bad_digest)),
        k.plain: FileAttributes(),
        k.hooked_volume.mount / "prog": FileAttributes(dmverity_roothash=dmv(k.hooked_volume)),
        k.early_volume.mount / "prog": FileAttributes(dmverity_roothash=dmv(k.early_volume)),
    }


def exec_under(ipe: Kernel, text: str, files: Iterable[Path]) -> list[AccessRecord]:
    """Activate `text`, exec every file, go back to allow-all: the records of those execs."""
    try:
        ipe.activate(text)
        ipe.drain()
        for path in files:
            ipe.exec_status(path)
    finally:
        ipe.activate(ALLOW_ALL)
    return ipe.drain()


def _random_policy(rng: random.Random, k: Kernel, n: int) -> str:
    fsv = [k.good_digest, k.bad_digest, "sha256:" + "ab" * 32, "sha512:" + "cd" * 64]
    dmv = [f"sha256:{k.hooked_volume.roothash}", f"sha256:{k.early_volume.roothash}", "sha256:" + "ef" * 32]
    lines = [f"policy_name=diff{n} policy_version=0.0.1",
             f"op=EXECUTE fsverity_digest={k.attack_digest} action=ALLOW"]  # the helper runs
    if rng.random() < 0.8:
        lines.append(f"DEFAULT action={rng.choice(['ALLOW', 'DENY'])}")
        if rng.random() < 0.5:
            lines.append(f"DEFAULT op=EXECUTE action={rng.choice(['ALLOW', 'DENY'])}")
    else:
        lines += [f"DEFAULT op={op.name} action=ALLOW" for op in Op if op is not Op.UNKNOWN and op is not Op.EXECUTE]
        lines.append(f"DEFAULT op=EXECUTE action={rng.choice(['ALLOW', 'DENY'])}")
    for _ in range(rng.randint(0, 8)):
        props = []
        for _ in range(rng.randint(0, 3)):
            kind = rng.randrange(5)
            if kind == 0:
                props.append(f"fsverity_digest={rng.choice(fsv)}")
            elif kind == 1:
                props.append(f"dmverity_roothash={rng.choice(dmv)}")
            else:
                key = ("boot_verified", "dmverity_signature", "fsverity_signature")[kind - 2]
                props.append(f"{key}={rng.choice(['TRUE', 'FALSE'])}")
        op = "EXECUTE" if rng.random() < 0.85 else rng.choice(["KMODULE", "FIRMWARE"])
        lines.append(" ".join([f"op={op}", *props, f"action={rng.choice(['ALLOW', 'DENY'])}"]))
    return "\n".join(lines) + "\n"


def test_kernel_equals_reference_evaluator(ipe: Kernel) -> None:
    rng = random.Random(20261128)
    files = _files(ipe)
    with ipe.maps() as maps:
        maps.set_success_audit(True)
    mismatches = []
    checked = 0
    here = running_kernel()  # what it cannot evaluate is FALSE
    assert here is not None
    for n in range(POLICIES):
        text = _random_policy(rng, ipe, n)
        parsed = parse_policy(text.encode())
        recs = exec_under(ipe, text, files)
        for path, attrs in files.items():
            want = evaluate(parsed, Op.EXECUTE, here.as_evaluated(attrs))
            want_index = parsed.rules.index(want.rule) if want.rule is not None else None
            got = [r for r in recs if r.hook == "BPRM_CHECK" and r.path == str(path).encode()]
            if len(got) != 1:
                mismatches.append((n, str(path), "records", len(got)))
                continue
            r = got[0]
            want_source = {Source.RULE: "rule", Source.OP_DEFAULT: "op_default",
                           Source.GLOBAL_DEFAULT: "global_default", Source.NONE: "none"}[want.source]
            if (r.action, r.source, r.rule_index) != (want.action.name, want_source, want_index):
                mismatches.append((n, str(path), (r.action, r.source, r.rule_index),
                                   (want.action.name, want_source, want_index), text))
            checked += 1
    assert not mismatches, mismatches[:5]
    assert checked == POLICIES * len(files)
