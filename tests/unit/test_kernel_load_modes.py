"""`load` restores every stored setting (permissive included) and records itself; so does
`unload` (kernel/control.py), with a fake loader and fake pinned maps."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipe_bpf.audit.policy_records import AuditLog
from ipe_bpf.kernel import control, loader, pins
from ipe_bpf.kernel.lifecycle import Lifecycle
from ipe_bpf.kernel.maps import KernelState
from ipe_bpf.kernel.store import PolicyStore

from .lifecycle_fixtures import FakeTarget

POLICY = b"policy_name=web policy_version=1.0.0\nDEFAULT action=ALLOW\nop=EXECUTE boot_verified=TRUE action=DENY\n"


@dataclass
class PinnedFake(FakeTarget):
    """FakeTarget as the pinned maps: a context manager with a state()."""

    def __enter__(self) -> "PinnedFake":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def state(self) -> KernelState:
        return KernelState(True, 0, self.generation, self.enforce is not False, bool(self.success_audit), 1)


@pytest.fixture()
def kernel(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    seen: dict[str, object] = {"maps": PinnedFake()}

    def load(options: loader.LoadOptions) -> loader.LoadResult:
        seen["options"] = options
        return loader.LoadResult("core", ("bprm_check_security",), None, 0.1)  # type: ignore[arg-type]

    def unload(root: Path = pins.PIN_ROOT) -> float:
        seen["unloaded"] = True
        return 0.02

    monkeypatch.setattr(control.loader, "load", load)
    monkeypatch.setattr(control.loader, "unload", unload)
    monkeypatch.setattr(control.maps, "PinnedPolicyMaps", lambda *root: seen["maps"])
    monkeypatch.setattr(control.pins, "is_loaded", lambda *root: True)
    return seen


def stored(tmp_path: Path, enforce: bool, success_audit: bool) -> PolicyStore:
    store = PolicyStore(tmp_path / "state")
    life = Lifecycle(store)
    life.deploy(POLICY, [], allow_unsigned=True)
    life.activate(b"web")
    life.set_enforce(enforce)
    life.set_success_audit(success_audit)
    return store


def test_load_restores_the_stored_permissive_mode_and_success_audit(tmp_path: Path, kernel: dict) -> None:
    store = stored(tmp_path, enforce=False, success_audit=True)
    report = control.load_and_apply(loader.LoadOptions(ringbuf_pages=16), store)
    maps = kernel["maps"]
    assert kernel["options"].permissive is True and kernel["options"].ringbuf_pages == 16
    assert (maps.enforce, maps.success_audit, maps.policy_name) == (False, True, b"web")
    assert report.enforcing is False and report.active is not None
    [line] = report.records
    assert line.startswith("type=1404 ") and " enforcing=0 old_enforcing=0 " in line
    assert line.endswith(" enabled=1 old-enabled=0 lsm=ipe res=1")
    assert AuditLog(store.audit_log_path).lines()[-1] == line
    spool = Path(os.environ["IPE_BPF_RUN_DIR"]) / "spool.log"
    assert spool.read_text().splitlines()[-1] == line
    serials = [int(text.split(":", 1)[1].split(")")[0]) for text in spool.read_text().splitlines()]
    assert serials == sorted(set(serials))  # deploy, activate, enforce off, load: one sequence


def test_an_explicit_mode_wins_and_becomes_the_stored_one(tmp_path: Path, kernel: dict) -> None:
    store = stored(tmp_path, enforce=False, success_audit=False)
    report = control.load_and_apply(loader.LoadOptions(), store, enforce=True)
    assert kernel["options"].permissive is False and kernel["maps"].enforce is True and report.enforcing
    assert Lifecycle(store).state().enforce is True
    assert " enforcing=1 " in report.records[0]


def test_unload_records_the_mode_that_was_in_force(tmp_path: Path, kernel: dict) -> None:
    store = stored(tmp_path, enforce=False, success_audit=False)
    kernel["maps"].enforce = False
    report = control.unload_and_record(store)
    assert kernel["unloaded"] and report.seconds == 0.02
    [line] = report.records
    assert " enforcing=0 old_enforcing=0 " in line and line.endswith(" enabled=0 old-enabled=1 lsm=ipe res=1")
    assert AuditLog(store.audit_log_path).lines()[-1] == line


def test_unload_without_a_daemon_counts_the_unread_records_as_lost(
        tmp_path: Path, kernel: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    store = stored(tmp_path, enforce=True, success_audit=False)
    monkeypatch.setattr(control, "_unread_records", lambda root: 17)
    lost, unload = control.unload_and_record(store, count_unread=True).records
    assert lost.startswith("type=1121 ") and lost.endswith(" op=lost lost=17 reason=unloaded_unread lsm=ipe res=0")
    assert " enabled=0 old-enabled=1 " in unload
    assert len(control.unload_and_record(store, count_unread=False).records) == 1  # a daemon reads them
