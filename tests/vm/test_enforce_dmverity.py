"""dmverity_roothash / dmverity_signature on real dm-verity volumes (real kernel)."""

from __future__ import annotations

import pytest

from .kernel_fixtures import Kernel, get_kernel, ipe, kernel, policy  # noqa: F401

EACCES = 13


@pytest.mark.requires("setintegrity_hooks")
def test_hook_captured_root_hash_of_a_volume_opened_after_load(ipe: Kernel) -> None:
    vol = ipe.hooked_volume
    with ipe.maps() as maps:
        dev = {d.dev: d for d in maps.devices()}
    assert vol.dev in dev, dev
    d = dev[vol.dev]
    assert (d.alg, d.roothash, d.signature_valid) == ("sha256", vol.roothash, False)


def test_volume_opened_before_load_is_read_from_its_live_table(ipe: Kernel) -> None:
    """The hook never saw it (not in the devices map), yet its root hash decides."""
    vol = ipe.early_volume
    with ipe.maps() as maps:
        assert vol.dev not in {d.dev for d in maps.devices()}
    ipe.activate(policy(f"op=EXECUTE {vol.property} action=DENY"))
    assert ipe.exec_status(vol.mount / "prog") == EACCES
    other = ipe.hooked_volume.property
    ipe.activate(policy(f"op=EXECUTE {other} action=DENY"))
    assert ipe.exec_status(vol.mount / "prog") == 0  # a different root hash does not match


@pytest.mark.requires("setintegrity_hooks")
def test_exec_by_roothash(ipe: Kernel) -> None:
    for vol in (ipe.hooked_volume, ipe.early_volume):
        prog = vol.mount / "prog"
        ipe.activate(policy(f"op=EXECUTE {vol.property} action=DENY"))
        assert ipe.exec_status(prog) == EACCES, vol.name
        assert ipe.exec_status(ipe.good) == 0


@pytest.mark.requires("setintegrity_hooks")
def test_static_binary_on_volume_allowed_by_roothash_under_strict_policy(ipe: Kernel) -> None:
    for vol in (ipe.hooked_volume, ipe.early_volume):
        ipe.activate(policy(
            f"op=EXECUTE {vol.property} action=ALLOW",
            f"op=EXECUTE fsverity_digest={ipe.attack_digest} action=ALLOW",
            extra_defaults="DEFAULT op=EXECUTE action=DENY",
        ))
        try:
            status = ipe.exec_status(vol.mount / "other")
            plain = ipe.exec_status(ipe.plain)
        finally:
            ipe.activate(policy())
        assert (status, plain) == (0, EACCES), vol.name


@pytest.mark.requires("setintegrity_hooks")
def test_dmverity_signature_false(ipe: Kernel) -> None:
    vol = ipe.hooked_volume
    prog = vol.mount / "prog"
    ipe.activate(policy(f"op=EXECUTE {vol.property} dmverity_signature=TRUE action=DENY"))
    assert ipe.exec_status(prog) == 0  # unsigned volume: the rule does not match
    ipe.activate(policy(f"op=EXECUTE {vol.property} dmverity_signature=FALSE action=DENY"))
    assert ipe.exec_status(prog) == EACCES
    ipe.activate(policy(f"op=EXECUTE dmverity_signature=FALSE fsverity_digest={ipe.bad_digest} action=DENY"))
    assert ipe.exec_status(ipe.bad) == EACCES  # no dm-verity at all: signature is FALSE


def test_dmverity_signature_of_an_unsigned_volume_is_false_on_every_line(ipe: Kernel) -> None:
    """Both volumes are unsigned.  6.12+ knows it (hook, or the table's kept signature); 6.1's
    dm-verity keeps no signature state, and there it is FALSE too (never decided fail-closed:
    a rule allowing unsigned volumes before a deny is taken, the `undecidable` count stays)."""
    with ipe.maps() as maps:
        before = maps.counters().undecidable
    for vol in (ipe.hooked_volume, ipe.early_volume):
        prog = vol.mount / "prog"
        ipe.activate(policy(f"op=EXECUTE {vol.property} dmverity_signature=FALSE action=ALLOW",
                            f"op=EXECUTE {vol.property} action=DENY"))
        assert ipe.exec_status(prog) == 0, vol.name
        ipe.activate(policy(f"op=EXECUTE {vol.property} dmverity_signature=TRUE action=DENY"))
        assert ipe.exec_status(prog) == 0, vol.name
    with ipe.maps() as maps:
        assert maps.counters().undecidable == before
