"""`ipe-bpf status` without a loaded kernel: the store's view, and an unreadable store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ipe_bpf.cli import kernel as cli_kernel
from ipe_bpf.kernel import pins

runner = CliRunner()
APP = typer.Typer()
cli_kernel.register(APP)
POLICY = b"policy_name=web policy_version=1.2.3\nDEFAULT action=DENY\n"


@pytest.fixture()
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IPE_BPF_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(pins, "is_loaded", lambda *root: False)
    return tmp_path


def test_status_not_loaded_shows_the_store(state: Path) -> None:
    from ipe_bpf.kernel.lifecycle import Lifecycle
    from ipe_bpf.kernel.store import PolicyStore

    life = Lifecycle(PolicyStore.default())
    life.deploy(POLICY, [], allow_unsigned=True)
    life.activate(b"web")
    data = json.loads(runner.invoke(APP, ["status", "--json"]).stdout)
    assert data["loaded"] is False
    assert data["active_policy"]["name"] == "web" and data["active_policy"]["version"] == "1.2.3"
    assert [p["name"] for p in data["policies"]] == ["web"]
    text = runner.invoke(APP, ["status"]).stdout
    assert "not loaded" in text and 'active policy: "web" 1.2.3 sha256:' in text
    assert data["audit_daemon"]["running"] is False and "audit daemon: not running" in text


def test_status_shows_the_audit_daemon_and_its_lag(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from ipe_bpf.service.durable import LogWriter

    conf = state / "ipe-bpf.conf"
    conf.write_text(f"log_file = {state}/log/audit.log\n")
    monkeypatch.setenv("IPE_BPF_CONFIG", str(conf))
    run = Path(os.environ["IPE_BPF_RUN_DIR"])
    report = {"pid": os.getpid(), "state": "running", "updated_ns": 0, "ring_pending": 7,
              "decisions_written": 40, "lost": 2, "lost_unknown": 0,
              "sinks": {"journal": {"delivered": 39, "skipped": 0, "lost": 0, "error": None, "lag_bytes": 300}}}
    run.mkdir(parents=True, exist_ok=True)
    (run / "auditd.status").write_text(json.dumps(report))
    with LogWriter(state / "log" / "audit.log", 1 << 20, 5):  # holds the writer lock, as the daemon does
        data = json.loads(runner.invoke(APP, ["status", "--json"]).stdout)
        text = runner.invoke(APP, ["status"]).stdout
    assert data["audit_daemon"]["running"] and data["audit_daemon"]["pid"] == os.getpid()
    assert f"audit daemon: pid {os.getpid()}, running, 7 records waiting in the ring buffer" in text
    assert "journal: 300 bytes behind, delivered 39" in text


def test_status_reports_an_unreadable_store(state: Path) -> None:
    (state / "state").write_text("not a directory")
    result = runner.invoke(APP, ["status", "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["active_policy"] is None and data["store_error"]


def test_audit_tail_into_head_ends_quietly(tmp_path: Path) -> None:
    """`ipe-bpf audit tail | head -1`: no BrokenPipeError traceback when head exits."""
    import subprocess
    import sys

    script = tmp_path / "tail.py"
    script.write_text(
        "import ipe_bpf.kernel.events as events\n"
        "def fake(emit, **kw):\n"
        "    for n in range(200000):\n"
        "        emit('type=1420 audit(1.000:%d): ipe_op=EXECUTE' % n)\n"
        "    return 200000\n"
        "events.tail = fake\n"
        "from ipe_bpf.cli import main\n"
        "import sys; sys.argv = ['ipe-bpf', 'audit', 'tail']\n"
        "main()\n")
    pipeline = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} {script} | head -1"],
                              capture_output=True, text=True, timeout=60)
    assert pipeline.stdout == "type=1420 audit(1.000:0): ipe_op=EXECUTE\n"
    assert pipeline.stderr == "" and pipeline.returncode == 0


def test_read_only_commands_work_on_a_read_only_store(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` and `policy list` take no write lock: every open for writing fails with EROFS."""
    import errno
    import os

    from ipe_bpf.cli import app
    from ipe_bpf.kernel.lifecycle import Lifecycle
    from ipe_bpf.kernel.store import PolicyStore

    life = Lifecycle(PolicyStore.default())
    life.deploy(POLICY, [], allow_unsigned=True)
    life.activate(b"web")
    real_open, real_mkdir = os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def read_only_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).startswith(str(state / "state")) and flags & writing:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def read_only_mkdir(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).startswith(str(state / "state")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    status = runner.invoke(APP, ["status", "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["active_policy"]["name"] == "web"
    listing = runner.invoke(app, ["policy", "list", "--json"])
    assert listing.exit_code == 0, listing.output
    assert [p["name"] for p in json.loads(listing.stdout)["policies"]] == ["web"]


class FakeKernel:
    """The pinned maps of a loaded program enforcing `generation` (None: no policy)."""

    generation: int | None = 5

    def __init__(self, root: Path | None = None) -> None:
        pass

    def __enter__(self) -> "FakeKernel":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def state(self):  # type: ignore[no-untyped-def]
        from ipe_bpf.kernel.maps import KernelState

        slot = None if self.generation is None else 0
        return KernelState(True, slot, self.generation, True, False, 3)

    def counters(self):  # type: ignore[no-untyped-def]
        from ipe_bpf.kernel.maps import Counters

        return Counters({"EXECUTE": 1}, {"EXECUTE": 2}, 2, 0, 0)

    def devices(self) -> list:
        return []

    def memory(self):  # type: ignore[no-untyped-def]
        from ipe_bpf.kernel.memory import MapMemory

        return (MapMemory("ipe_rules", 3 << 20, 12, 8, 1 << 21), MapMemory("ipe_digests", 1 << 20, 84, 4, 1 << 19),
                MapMemory("ipe_config", 4096, 4, 16, 1))


@pytest.fixture()
def loaded(state: Path, monkeypatch: pytest.MonkeyPatch) -> type[FakeKernel]:
    from ipe_bpf.kernel import control

    monkeypatch.setattr(pins, "is_loaded", lambda *root: True)
    monkeypatch.setattr(pins, "link_paths", lambda *root: [Path("bprm_check_security"), Path("mmap_file")])
    monkeypatch.setattr(control.maps, "PinnedPolicyMaps", FakeKernel)
    return FakeKernel


def _deploy_active() -> None:
    from ipe_bpf.kernel.lifecycle import Lifecycle
    from ipe_bpf.kernel.store import PolicyStore

    life = Lifecycle(PolicyStore.default())
    life.deploy(POLICY, [], allow_unsigned=True)
    life.activate(b"web")


def test_status_with_a_damaged_state_file_fails_and_says_what_the_kernel_enforces(
        loaded: type[FakeKernel], state: Path) -> None:
    _deploy_active()
    (state / "state" / "state.json").write_text("{ damaged")
    result = runner.invoke(APP, ["status"])
    assert result.exit_code == 1
    assert "everything is allowed" not in result.stdout
    assert "state.json is corrupt" in result.stderr and "the kernel still enforces generation 5" in result.stderr
    as_json = runner.invoke(APP, ["status", "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["generation"] == 5


def test_status_with_a_damaged_copy_of_the_active_policy_fails(loaded: type[FakeKernel], state: Path) -> None:
    _deploy_active()
    (blob,) = (state / "state" / "policies").glob("*.pol")
    blob.write_bytes(blob.read_bytes() + b"op=EXECUTE action=ALLOW\n")
    result = runner.invoke(APP, ["status"])
    assert result.exit_code == 1
    assert "stored copy of the active policy is damaged" in result.stderr and str(blob) in result.stderr
    assert "the kernel still enforces generation 5" in result.stderr


def test_status_loaded_without_a_policy_says_so(loaded: type[FakeKernel], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeKernel, "generation", None)
    result = runner.invoke(APP, ["status"])
    assert result.exit_code == 0, result.output
    assert "no policy in the kernel (everything is allowed)" in result.stdout
    assert "generation None" not in result.stdout


def test_load_unloads_again_when_the_stored_policy_cannot_be_applied(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load` = load + apply stored policy; a failure of the second leaves nothing loaded."""
    from ipe_bpf.errors import LifecycleError
    from ipe_bpf.kernel import control, loader
    from ipe_bpf.kernel.lifecycle import Lifecycle

    calls: list[str] = []
    from ipe_bpf.kernel.features import KernelFeatures
    from ipe_bpf.kernel.pins import HOOKS

    result = loader.LoadResult("core", HOOKS, KernelFeatures(HOOKS, "inode", None, True, True, True, False), 1.0)
    monkeypatch.setattr(loader, "load", lambda options: calls.append(f"load {options.permissive}") or result)
    monkeypatch.setattr(loader, "unload", lambda: calls.append("unload") or 0.0)
    monkeypatch.setattr(control.maps, "PinnedPolicyMaps", FakeKernel)

    def broken(self, target, *, enforce=None):  # type: ignore[no-untyped-def]
        raise LifecycleError("EUCLEAN", "state.json is corrupt")

    monkeypatch.setattr(Lifecycle, "apply_active", broken)
    out = runner.invoke(APP, ["load", "--permissive"])
    assert out.exit_code == 1
    assert calls == ["load True", "unload"]
    assert out.stderr.strip() == ("load: the stored active policy could not be applied (unloaded again): "
                                  "EUCLEAN: state.json is corrupt")
    monkeypatch.setattr(Lifecycle, "apply_active", lambda self, target, *, enforce=None: None)
    calls.clear()
    ok = runner.invoke(APP, ["load"])
    assert ok.exit_code == 0 and calls == ["load False"]
    assert "active policy: none" in ok.stdout


@pytest.mark.parametrize(("fatal", "root", "expected"), [
    ([], True, "verdict: this machine can enforce"),
    (["bpf-lsm", "btf"], True, "enforcement is impossible on this machine (bpf-lsm, btf); try ipe-bpf in the test VM"),
    (["root", "bpf-lsm"], False, "run `ipe-bpf doctor` as root"),
])
def test_doctor_ends_with_a_verdict(monkeypatch: pytest.MonkeyPatch, fatal: list[str], root: bool, expected: str) -> None:
    import os

    from ipe_bpf.kernel import doctor

    checks = [doctor.Check(name, name not in fatal, "detail", True) for name in ("root", "bpf-lsm", "btf")]
    monkeypatch.setattr(doctor, "run_checks", lambda: checks)
    monkeypatch.setattr(os, "geteuid", lambda: 0 if root else 1000)
    result = runner.invoke(APP, ["doctor"])
    assert result.exit_code == (1 if fatal else 0)
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: ") and expected in last
    assert ("ipe-bpf vm run" in last) == bool(fatal)


def test_permission_errors_of_a_user_say_to_run_as_root(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from ipe_bpf.cli import app
    from ipe_bpf.errors import KernelError
    from ipe_bpf.kernel import control

    def refused(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KernelError("EPERM", "the kernel refused the BPF program: Operation not permitted")

    monkeypatch.setattr(control, "load_and_apply", refused)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = runner.invoke(app, ["load"])
    assert result.exit_code == 1 and result.stderr.strip().endswith("(run as root)")
    (state / "state").mkdir()
    (state / "state" / "lock").write_text("")
    real_open = os.open

    def no_access(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).startswith(str(state / "state")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_access)
    listing = runner.invoke(app, ["policy", "list"])
    assert listing.exit_code == 1 and "EACCES" in listing.stderr and listing.stderr.strip().endswith("(run as root)")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert not runner.invoke(app, ["policy", "list"]).stderr.strip().endswith("(run as root)")


def test_status_shows_the_map_memory(loaded: type[FakeKernel], state: Path) -> None:
    _deploy_active()
    text = runner.invoke(APP, ["status"]).stdout
    assert "map memory: 4.0 MiB (ipe_rules 3.0 MiB, ipe_digests 1.0 MiB, other maps 4.0 KiB)" in text
    data = json.loads(runner.invoke(APP, ["status", "--json"]).stdout)["map_memory"]
    assert data["total"] == (4 << 20) + 4096
    assert data["maps"]["ipe_rules"] == {"memlock": 3 << 20, "key_size": 12, "value_size": 8, "max_entries": 1 << 21}


def test_status_says_which_properties_are_always_false_here(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ipe_bpf.kernel import features
    from ipe_bpf.kernel.pins import HOOKS

    no_hooks = tuple(h for h in HOOKS if "integrity" not in h)
    kernel_6_1 = features.KernelFeatures(no_hooks, "inode", "6.1", True, False, True, False)
    monkeypatch.setattr(features, "running_kernel", lambda: kernel_6_1)
    data = json.loads(runner.invoke(APP, ["status", "--json"]).stdout)
    assert sorted(data["always_false"]) == ["dmverity_signature", "fsverity_signature"]
    text = runner.invoke(APP, ["status"]).stdout
    assert "property dmverity_signature: always FALSE on this kernel: kernel keeps no dm-verity signature state" in text
    assert "property fsverity_signature: always FALSE on this kernel: kernel keeps no record" in text
    monkeypatch.setattr(features, "running_kernel", lambda: features.KernelFeatures(HOOKS, "inode", "6.5+", True, True, True, False))
    assert "always FALSE" not in runner.invoke(APP, ["status"]).stdout


def test_deploy_cli_refuses_what_this_kernel_cannot_evaluate_unless_allowed(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from ipe_bpf.cli import app
    from ipe_bpf.kernel import features
    from ipe_bpf.kernel.pins import HOOKS

    no_hooks = tuple(h for h in HOOKS if "integrity" not in h)
    monkeypatch.setattr(features, "running_kernel",
                        lambda: features.KernelFeatures(no_hooks, "inode", "6.1", True, False, True, False))
    pol = state / "u.pol"
    pol.write_bytes(b"policy_name=u policy_version=1.0.0\nDEFAULT action=ALLOW\nop=EXECUTE fsverity_signature=TRUE action=DENY\n")
    refused = runner.invoke(app, ["policy", "deploy", "--unsigned", str(pol)])
    assert refused.exit_code == 1 and refused.stderr.startswith("deploy: EOPNOTSUPP: policy \"u\" uses fsverity_signature")
    assert os.uname().release in refused.stderr and "evaluate as FALSE" in refused.stderr
    taken = runner.invoke(app, ["policy", "deploy", "--unsigned", "--allow-unevaluable", str(pol)])
    assert taken.exit_code == 0, taken.stderr
    assert "warning: --allow-unevaluable: fsverity_signature is always FALSE on this kernel" in taken.stderr
    assert "line 3 `op=EXECUTE fsverity_signature=TRUE action=DENY` never matches" in taken.stderr
