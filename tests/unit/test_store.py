"""The on-disk policy store: round trips, atomic commits, garbage collection, locking."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ipe_bpf.errors import LifecycleError
from ipe_bpf.kernel import store as store_module
from ipe_bpf.kernel.store import (
    DEFAULT_STATE_DIR,
    RETIRED_KEEP,
    HighWater,
    PolicyStore,
    StoredPolicy,
    StoreState,
    sha256_hex,
    state_dir,
)


def stored(name: bytes, version=(1, 0, 0), generation: int = 1, blob: bytes | None = None,
           signed: bool = True) -> StoredPolicy:
    data = blob if blob is not None else name + bytes(version)
    return StoredPolicy(name=name, version=version, digest=sha256_hex(data),
                        content_digest=sha256_hex(b"text " + data), generation=generation,
                        signed=signed, signer="CN=test" if signed else None,
                        deployed_at="2026-11-28T04:00:00Z")


def test_state_dir_default_and_override() -> None:
    assert state_dir({}) == DEFAULT_STATE_DIR == Path("/var/lib/ipe-bpf")
    assert state_dir({"IPE_BPF_STATE_DIR": ""}) == DEFAULT_STATE_DIR
    assert state_dir({"IPE_BPF_STATE_DIR": "/tmp/x"}) == Path("/tmp/x")


def test_default_uses_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IPE_BPF_STATE_DIR", str(tmp_path))
    assert PolicyStore.default().root == tmp_path


def test_empty_store_reads_without_creating_anything(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "absent")
    with store.locked(shared=True):
        assert store.load() == StoreState()
    assert not (tmp_path / "absent").exists()


def test_round_trip_with_raw_names(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    odd = b"\xff\x00weird/../name\xe9"
    state = StoreState().with_deployed(stored(b"prod", (1, 2, 3), 1)).with_deployed(stored(odd, (0, 0, 1), 2))
    state = store_module.replace(state, active=odd, enforce=False, success_audit=True)
    with store.locked():
        store.commit(state)
    loaded = PolicyStore(tmp_path).load()
    assert loaded == state
    assert loaded.next_generation == 3
    assert loaded.highest[odd] == HighWater((0, 0, 1), stored(odd, (0, 0, 1), 2).content_digest)


def test_state_file_is_json_with_format(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    with store.locked():
        store.commit(StoreState().with_deployed(stored(b"prod")))
    obj = json.loads((tmp_path / "state.json").read_text())
    assert obj["format"] == 1 and obj["policies"][0]["name"] == b"prod".hex()
    assert obj["policies"][0]["name_text"] == "prod"


def test_commit_needs_the_exclusive_lock(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    with pytest.raises(LifecycleError) as exc:
        store.commit(StoreState())
    assert exc.value.errno_name == "ENOLCK"
    with store.locked(shared=True):
        with pytest.raises(LifecycleError):
            store.commit(StoreState())


def test_shared_lock_cannot_upgrade(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    with store.locked():
        pass  # creates the directory
    with store.locked(shared=True):
        with pytest.raises(LifecycleError) as exc:
            with store.locked():
                pass
    assert exc.value.errno_name == "EDEADLK"
    with store.locked():
        with store.locked(shared=True):  # an exclusive lock covers readers
            store.load()


def test_lock_excludes_other_processes(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    probe = ("import fcntl, os, sys\n"
             "fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('free')\n"
             "except BlockingIOError:\n    print('held')\n")

    def other_process_sees() -> str:
        result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "lock")],
                                capture_output=True, text=True, check=True)
        return result.stdout.strip()

    with store.locked():
        assert other_process_sees() == "held"
    assert other_process_sees() == "free"
    with store.locked(shared=True):
        assert other_process_sees() == "held"  # readers keep writers out


def test_lock_waits_for_the_holder(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    with store.locked():
        pass
    fd = os.open(tmp_path / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from ipe_bpf.kernel.store import PolicyStore\n"
         "s = PolicyStore(Path(sys.argv[1]))\n"
         "with s.locked():\n    print('got it')\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)
    finally:
        os.close(fd)
    out, _ = child.communicate(timeout=30)
    assert out.strip() == "got it"


def test_commit_writes_blobs_and_collects_garbage(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    a, b = stored(b"a", blob=b"blob a"), stored(b"b", blob=b"blob b", signed=False)
    with store.locked():
        store.commit(StoreState().with_deployed(a).with_deployed(b),
                     {a.blob_name: b"blob a", b.blob_name: b"blob b"})
        (tmp_path / "policies" / "stray.tmp").write_bytes(b"left by a crash")
    assert store.blob(a) == b"blob a" and store.blob(b) == b"blob b"
    assert b.blob_name.endswith(".pol") and a.blob_name.endswith(".p7s")
    with store.locked():
        state = store.load()
        store.commit(state.without(b"a").without(b"b"))
    # Deleted policies stay retired (their rule texts decode old audit events), strays go.
    assert sorted(p.name for p in (tmp_path / "policies").iterdir()) == sorted([a.blob_name, b.blob_name])


def test_retired_policies_are_bounded(tmp_path: Path) -> None:
    state = StoreState()
    for generation in range(1, RETIRED_KEEP + 5):
        state = state.with_deployed(stored(b"p", (0, 0, generation), generation))
    assert len(state.retired) == RETIRED_KEEP
    assert state.retired[-1].generation == RETIRED_KEEP + 3
    assert state.by_generation(RETIRED_KEEP + 4) is state.find(b"p")
    assert state.by_generation(1) is None


def test_highest_never_goes_down(tmp_path: Path) -> None:
    state = StoreState().with_deployed(stored(b"p", (2, 0, 0), 1)).without(b"p")
    state = state.with_deployed(stored(b"p", (1, 0, 0), 2))
    assert state.highest[b"p"].version == (2, 0, 0)


def test_failed_state_write_keeps_the_old_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = PolicyStore(tmp_path)
    first = StoreState().with_deployed(stored(b"a"))
    with store.locked():
        store.commit(first)
    real_replace = os.replace

    def failing_replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == "state.json":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", failing_replace)
    with store.locked():
        with pytest.raises(LifecycleError) as exc:
            store.commit(first.with_deployed(stored(b"b", generation=2)))
    assert exc.value.errno_name == "ENOSPC"
    monkeypatch.setattr(store_module.os, "replace", real_replace)
    assert store.load() == first
    assert not [p for p in tmp_path.iterdir() if ".tmp." in p.name]  # no half-written file left


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old content that is longer")
    store_module.write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.parametrize("content", [b"{not json", b'{"format": 99}', b'{"format": 1}',
                                     b'{"format": 1, "enforce": "yes", "success_audit": false, "next_generation": 1}'])
def test_corrupt_state_is_euclean(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    with pytest.raises(LifecycleError) as exc:
        PolicyStore(tmp_path).load()
    assert exc.value.errno_name == "EUCLEAN"


def test_blob_digest_is_checked(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    policy = stored(b"a", blob=b"original")
    with store.locked():
        store.commit(StoreState().with_deployed(policy), {policy.blob_name: b"original"})
    (tmp_path / "policies" / policy.blob_name).write_bytes(b"modified")
    with pytest.raises(LifecycleError) as exc:
        store.blob(policy)
    assert exc.value.errno_name == "EUCLEAN"
    (tmp_path / "policies" / policy.blob_name).unlink()
    with pytest.raises(LifecycleError) as gone:
        store.blob(policy)
    assert gone.value.errno_name == "ENOENT"


def _as_unprivileged(check) -> None:  # type: ignore[no-untyped-def]
    """Run ``check`` as is (not root) or in a child that dropped to nobody (root writes anywhere)."""
    if os.geteuid() != 0:
        check()
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            check()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the check failed in the unprivileged child"


def test_unwritable_state_dir_is_reported() -> None:
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        locked_dir = Path(top) / "ro"
        locked_dir.mkdir()
        locked_dir.chmod(0o555)

        def check() -> None:
            with pytest.raises(LifecycleError) as exc:
                with PolicyStore(locked_dir / "state").locked():
                    pass
            assert exc.value.errno_name == "EACCES" and "IPE_BPF_STATE_DIR" in exc.value.message

        _as_unprivileged(check)


def test_state_dir_that_cannot_be_created_is_reported(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(LifecycleError) as exc:
        with PolicyStore(tmp_path / "file" / "state").locked():
            pass
    assert exc.value.errno_name == "ENOTDIR" and "IPE_BPF_STATE_DIR" in exc.value.message
