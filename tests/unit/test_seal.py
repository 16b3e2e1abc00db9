"""The seal's control plane without a kernel (the kernel side: tests/vm/test_zzz_seal.py):
the order of `seal()` and what it refuses, the CLI's confirmation and guard, the `seal = yes`
setting of `load`, the seal's ring-buffer records and their rendering, doctor's advice."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ipe_bpf.audit.record import SealRecord, decode, decode_any
from ipe_bpf.audit.render import seal_text
from ipe_bpf.cli import kernel as cli_kernel
from ipe_bpf.cli import seal as cli_seal
from ipe_bpf.errors import KernelError
from ipe_bpf.kernel import doctor, seal
from ipe_bpf.kernel.features import KernelFeatures
from ipe_bpf.kernel.loader import LoadedState
from ipe_bpf.kernel.maps import KernelState, SealEntry
from ipe_bpf.kernel.pins import HOOKS, SEAL_HOOKS
from ipe_bpf.policy.layout import load_header
from ipe_bpf.policy.parser import parse_policy
from ipe_bpf.service.config import parse_config
from ipe_bpf.service.records import access_lines

from .test_cli_lifecycle import use_target

runner = CliRunner()
APP = typer.Typer()
cli_kernel.register(APP)
cli_seal.register(APP)


def _entry(**changes: object) -> SealEntry:
    view = load_header().struct("ipe_seal").view(SealEntry)
    return dataclasses.replace(view.unpack(bytes(view.layout.size)), **changes)  # type: ignore[arg-type]


class FakeMaps:
    """PinnedPolicyMaps as seal() uses it; `log` records the order of what it does."""

    entry = _entry()
    enforcing = True
    slot: int | None = 0
    log: list[str] = []

    def __init__(self, root: Path | None = None) -> None:
        self.header = load_header()

    def __enter__(self) -> "FakeMaps":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def seal_entry(self) -> SealEntry:
        return type(self).entry

    def state(self) -> KernelState:
        return KernelState(True, self.slot, None if self.slot is None else 4, self.enforcing, False, 1)

    def map_fd(self, name: str, write: bool = False) -> int:
        return 99

    def write_seal_entry(self, entry: SealEntry) -> None:
        type(self).log.append(f"write sealed={entry.sealed}")
        type(self).entry = entry


@pytest.fixture()
def maps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[FakeMaps]:
    monkeypatch.setattr(FakeMaps, "entry", _entry())
    monkeypatch.setattr(FakeMaps, "enforcing", True)
    monkeypatch.setattr(FakeMaps, "slot", 0)
    monkeypatch.setattr(FakeMaps, "log", [])
    monkeypatch.setattr(seal, "PinnedPolicyMaps", FakeMaps)
    monkeypatch.setattr(seal, "control_lock", lambda: __import__("contextlib").nullcontext())
    monkeypatch.setattr(seal, "_check_sealable", lambda root, state_file: None)
    ours = _entry(nr_maps=3, map_id=(7, 8, 9) + (0,) * 13, map_type=(2, 27, 1) + (0,) * 13, nr_progs=2)
    monkeypatch.setattr(seal, "_collect", lambda root, m: ours)
    monkeypatch.setattr(seal, "_freeze_id", lambda map_id: FakeMaps.log.append(f"freeze {map_id}"))
    monkeypatch.setattr(seal, "_freeze", lambda fd: FakeMaps.log.append("freeze ipe_seal"))
    return FakeMaps


def test_seal_freezes_the_maps_then_sets_the_flag_then_freezes_the_seal(maps: type[FakeMaps]) -> None:
    outcome = seal.seal()
    # map 7 is ipe_seal itself (first), 8 the ring buffer (type 27): neither frozen before the flag
    assert maps.log == ["freeze 9", "write sealed=1", "freeze ipe_seal"]
    assert outcome.changed and outcome.state.sealed and (outcome.maps, outcome.programs) == (3, 2)
    assert maps.entry.sealed_at > 0 and maps.entry.sealed_boot_ns > 0
    again = seal.seal()  # sealed already: nothing written, the seal map frozen (again)
    assert not again.changed and again.state.sealed_at == outcome.state.sealed_at
    assert maps.log[3:] == ["freeze ipe_seal"]


@pytest.mark.parametrize("enforcing, slot, word", [(False, 0, "permissive"), (True, None, "no policy is active")])
def test_seal_refuses_what_would_be_pointless_unless_forced(maps: type[FakeMaps], enforcing: bool,
                                                            slot: int | None, word: str) -> None:
    maps.enforcing, maps.slot = enforcing, slot
    with pytest.raises(KernelError) as err:
        seal.seal()
    assert err.value.errno_name == "EINVAL" and word in err.value.message and "--force" in err.value.message
    assert maps.log == []
    assert seal.seal(force=True).changed and "write sealed=1" in maps.log


def test_only_a_core_load_with_every_seal_hook_can_be_sealed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    links = tmp_path / "links"
    links.mkdir(parents=True)
    for hook in HOOKS:
        (links / hook).touch()
    state = tmp_path / "loaded.json"
    features = KernelFeatures(HOOKS, "inode", None, True, True, True, False)
    state.write_text(__import__("json").dumps(LoadedState("bcc", HOOKS, features, None, 1.0).to_json()))
    with pytest.raises(KernelError) as err:
        seal._check_sealable(tmp_path, state)
    assert err.value.errno_name == "EOPNOTSUPP" and "bcc loader" in err.value.message
    state.write_text(__import__("json").dumps(LoadedState("core", HOOKS, features, None, 1.0).to_json()))
    seal._check_sealable(tmp_path, state)
    (links / "sb_umount").unlink()
    with pytest.raises(KernelError) as err:
        seal._check_sealable(tmp_path, state)
    assert err.value.errno_name == "EOPNOTSUPP" and "sb_umount" in err.value.message
    assert set(SEAL_HOOKS) <= set(HOOKS)


def test_refuse_if_sealed_names_the_attempt_and_since_when(maps: type[FakeMaps], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seal, "link_paths", lambda root: [Path("bpf")])
    seal.refuse_if_sealed("unload")  # not sealed: nothing
    maps.entry = _entry(sealed=1, sealed_at=1_800_000_000 * 10**9)
    with pytest.raises(seal.SealedError) as err:
        seal.refuse_if_sealed("unload")
    assert err.value.errno_name == "EPERM"
    assert err.value.message.startswith("unload: ipe-bpf is sealed since 2027-01-15T08:00:00Z until reboot")


# ------------------------------------------------------------------------------ CLI


@pytest.fixture()
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IPE_BPF_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("IPE_BPF_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("IPE_BPF_CONFIG", str(tmp_path / "ipe-bpf.conf"))
    return tmp_path


def _sealed(attempt: str, root: Path = Path()) -> None:
    raise seal.SealedError("EPERM", f"{attempt}: ipe-bpf is sealed since 2027-01-15T08:00:00Z until reboot")


@pytest.mark.parametrize("argv, attempt", [(["enforce", "off"], "enforce off"), (["success-audit", "on"], "success-audit on"),
                                           (["unload"], "unload")])
def test_guarded_commands_refuse_with_one_line_and_an_audit_record(
        state: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], attempt: str) -> None:
    from .lifecycle_fixtures import FakeTarget

    target = FakeTarget()
    use_target(monkeypatch, target)
    monkeypatch.setattr(seal, "refuse_if_sealed", _sealed)
    result = runner.invoke(APP, argv)
    assert result.exit_code == 1 and target.calls == []
    assert result.stderr.strip() == f"EPERM: {attempt}: ipe-bpf is sealed since 2027-01-15T08:00:00Z until reboot"
    for log in (state / "state" / "audit.log", state / "run" / "spool.log"):
        (line,) = log.read_text().splitlines()
        assert line.startswith("type=1121 audit(") and f'op=seal_refused attempt="{attempt}" pid=' in line
        assert line.endswith("lsm=ipe res=0")


def test_policy_commands_are_guarded_too(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ipe_bpf.cli import app

    monkeypatch.setattr(seal, "refuse_if_sealed", _sealed)
    pol = state / "p.pol"
    pol.write_text("policy_name=p policy_version=1.0.0\nDEFAULT action=ALLOW\n")
    for argv in (["deploy", str(pol), "--unsigned"], ["activate", "p"], ["update", "p", str(pol), "--unsigned"],
                 ["delete", "p"]):
        result = runner.invoke(app, ["policy", *argv])
        assert result.exit_code == 1 and f"EPERM: policy {argv[0]}: ipe-bpf is sealed" in result.stderr
    assert not (state / "state" / "state.json").exists()  # the store untouched
    listing = runner.invoke(app, ["policy", "list"])  # reading is not a change
    assert listing.exit_code == 0, listing.output


def test_seal_asks_first_and_says_what_it_did(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    outcome = seal.SealOutcome(seal.SealState(1_800_000_000.0), True, 11, 18)
    monkeypatch.setattr(seal, "seal", lambda force=False: calls.append(force) or outcome)
    declined = runner.invoke(APP, ["seal"], input="n\n")
    assert declined.exit_code == 1 and calls == [] and "ECANCELED" in declined.stderr
    accepted = runner.invoke(APP, ["seal"], input="y\n")
    assert accepted.exit_code == 0 and calls == [False]
    assert "sealed until reboot, since 2027-01-15T08:00:00Z (guarding 11 maps and 18 programs)" in accepted.stdout
    forced = runner.invoke(APP, ["seal", "--yes", "--force", "--json"])
    assert forced.exit_code == 0 and calls == [False, True] and '"sealed": true' in forced.stdout
    log = (state / "state" / "audit.log").read_text()
    assert log.count("op=seal sealed_at=1800000000 ") == 2  # one per seal that was made


def test_seal_errors_are_one_line(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(force: bool = False) -> seal.SealOutcome:
        raise KernelError("EINVAL", "ipe-bpf is permissive: sealing would keep it permissive until reboot")

    monkeypatch.setattr(seal, "seal", refuse)
    result = runner.invoke(APP, ["seal", "--yes"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "EINVAL: ipe-bpf is permissive: sealing would keep it permissive until reboot"


@pytest.mark.parametrize("sealable", [True, False])
def test_load_seals_when_the_settings_say_so(state: Path, monkeypatch: pytest.MonkeyPatch, sealable: bool) -> None:
    from ipe_bpf.kernel import control, loader

    features = KernelFeatures(HOOKS, "inode", None, True, True, True, False)
    report = control.LoadReport(loader.LoadResult("core", HOOKS, features, 1.0), None, True)
    monkeypatch.setattr(control, "load_and_apply", lambda options, enforce=None: report)
    calls: list[str] = []

    def fake_seal(force: bool = False) -> seal.SealOutcome:
        calls.append("seal")
        if not sealable:
            raise KernelError("EINVAL", "no policy is active")
        return seal.SealOutcome(seal.SealState(1_800_000_000.0), True, 11, 18)

    monkeypatch.setattr(seal, "seal", fake_seal)
    assert runner.invoke(APP, ["load"]).exit_code == 0 and calls == []  # no settings file: no seal
    (state / "ipe-bpf.conf").write_text("seal = yes\n")
    result = runner.invoke(APP, ["load"])
    assert calls == ["seal"]
    if sealable:
        assert result.exit_code == 0 and "sealed until reboot" in result.stdout
    else:
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines()[-1] == "load: loaded and enforcing, but NOT SEALED (see the line above)"


def test_the_seal_setting_parses() -> None:
    assert parse_config("", "c").seal is False
    assert parse_config("seal = yes\n", "c").seal is True
    with pytest.raises(Exception, match="c:1: EINVAL: seal: expected yes or no"):
        parse_config("seal = sometimes\n", "c")


# ------------------------------------------------------------------------------ records


def _seal_event(**fields: object) -> bytes:
    base = dict(boot_ns=0, generation=0, ino=12, pid=321, rule_index=2, uid=0, auid=1000, ses=3, op=1, hook=0,
                enforcing=1, action=1, source=3, path_kind=2, path_len=10, exe_kind=1, kind=1, exe_len=17,
                comm=b"bpftool", dev=b"", path=b"ipe_config", exe=b"/usr/sbin/bpftool")
    base.update(fields)
    return load_header().struct("ipe_event").pack(**base)


def test_a_seal_record_decodes_and_renders_with_who_tried() -> None:
    raw = _seal_event()
    with pytest.raises(ValueError, match="not a decision"):
        decode(raw)
    r = decode_any(raw)
    assert isinstance(r, SealRecord)
    assert (r.attempt, r.detail, r.target, r.object_id, r.pid, r.comm) == (
        "map_write", "BPF_MAP_UPDATE_ELEM", b"ipe_config", 12, 321, b"bpftool")
    text = seal_text(r, 7)
    assert text.startswith("type=1121 audit(") and ":7): op=seal_refused attempt=map_write detail=BPF_MAP_UPDATE_ELEM " in text
    assert 'target="ipe_config" id=12 pid=321 comm="bpftool" uid=0 auid=1000 ses=3' in text
    assert text.endswith('exe="/usr/sbin/bpftool" lsm=ipe res=0')
    first, companion = access_lines(r, 7)  # the audit daemon: the record and its 1300 companion
    assert first == text and companion.startswith("type=1300 ") and "pid=321 auid=1000 uid=0 ses=3" in companion
    prog = decode_any(_seal_event(op=3, rule_index=2, path=b"ipe_attack"))
    assert isinstance(prog, SealRecord) and (prog.attempt, prog.detail) == ("prog_load", "fmod_ret")


def test_a_decision_still_decodes_as_before() -> None:
    r = decode_any(_seal_event(kind=0, op=0, hook=0, source=0, rule_index=0))
    assert not isinstance(r, SealRecord) and r.op == "EXECUTE"


# ------------------------------------------------------------------------------ doctor


POLICY_OPEN = b"policy_name=p policy_version=1.0.0\nDEFAULT action=ALLOW\n"
POLICY_JUDGED = POLICY_OPEN + (b"DEFAULT op=KMODULE action=DENY\nDEFAULT op=KEXEC_IMAGE action=DENY\n"
                               b"DEFAULT op=KEXEC_INITRAMFS action=DENY\nop=KMODULE boot_verified=TRUE action=ALLOW\n")


def test_doctor_says_what_the_seal_rests_on() -> None:
    judged = {c.name: c for c in doctor.seal_checks(parse_policy(POLICY_JUDGED), "none [integrity] confidentiality\n")}
    assert all(c.ok for c in judged.values()) and not any(c.fatal for c in judged.values())
    assert "1 rules, default DENY" in judged["seal KMODULE"].detail
    assert judged["seal lockdown"].detail == "lockdown=integrity"
    open_ = {c.name: c for c in doctor.seal_checks(parse_policy(POLICY_OPEN), "[none] integrity confidentiality\n")}
    assert not open_["seal KMODULE"].ok and "`DEFAULT op=KMODULE action=DENY`" in open_["seal KMODULE"].detail
    assert not open_["seal KEXEC_IMAGE"].ok and "kexec kernel" in open_["seal KEXEC_IMAGE"].detail
    assert not open_["seal lockdown"].ok and "lockdown=none" in open_["seal lockdown"].detail
    none = {c.name: c for c in doctor.seal_checks(None, None)}
    assert not none["seal KMODULE"].ok and "no active policy" in none["seal KMODULE"].detail
    assert "lockdown=unavailable" in none["seal lockdown"].detail


def test_a_map_the_kernel_cannot_freeze_is_left_to_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOTSUPP (a map with a bpf_spin_lock) is skipped; any other failure stops the seal."""
    from ipe_bpf.kernel import bpfsys

    closed: list[int] = []
    monkeypatch.setattr(bpfsys, "map_fd_by_id", lambda map_id: 100 + map_id)
    monkeypatch.setattr(seal.os, "close", closed.append)

    def freeze(fd: int) -> bool:
        raise KernelError({101: "E524", 102: "EINVAL"}[fd], "map freeze: refused")

    monkeypatch.setattr(bpfsys, "freeze", freeze)
    seal._freeze_id(1)
    with pytest.raises(KernelError, match="refused"):
        seal._freeze_id(2)
    assert closed == [101, 102]
