"""Loader pieces that need no BPF-LSM kernel: loader choice, the BCC text and flags, the CO-RE
object opened through this machine's libbpf, and what a kernel's features allow."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ipe_bpf.errors import KernelError
from ipe_bpf.kernel import bcc_loader, core_loader, libbpf, loader
from ipe_bpf.kernel.features import KernelFeatures
from ipe_bpf.kernel.maps import kernel_dev
from ipe_bpf.kernel.pins import HOOKS, MAP_NAMES


def test_loader_comes_from_the_environment_and_defaults_to_core() -> None:
    assert loader.default_loader({}) == "core"
    assert loader.default_loader({"IPE_BPF_LOADER": "bcc"}) == "bcc"
    with pytest.raises(KernelError) as err:
        loader.default_loader({"IPE_BPF_LOADER": "llvm"})
    assert err.value.errno_name == "EINVAL" and "IPE_BPF_LOADER" in str(err.value)


def test_bcc_gets_the_compat_header_spliced_into_the_main_buffer() -> None:
    text = bcc_loader.program_text()
    assert '#include "bcc_compat.h"' not in text
    assert "BPF_RINGBUF_OUTPUT(ipe_events" in text
    assert text.index("BPF_RINGBUF_OUTPUT") < text.index("IPE_HOOK(bprm_check_security")


def test_bcc_flags_carry_sizes_and_the_offsets_given() -> None:
    flags = bcc_loader.cflags(8, offsets=["-DIPE_OFF_MOUNT_MNT=32", "-DIPE_HAVE_MOUNT=1"])
    assert "-DIPE_RINGBUF_PAGES=8" in flags and "-DIPE_HAVE_MOUNT=1" in flags


def test_core_object_opens_with_this_machines_libbpf() -> None:
    """Open (not load) the object: every hook's program and every pinned map is there, the
    maps can be sized and the load settings written, as core_loader does before loading."""
    lib = libbpf.lib()
    path = str(core_loader.bpf_file(core_loader.OBJECT)).encode()
    with libbpf.collecting_log():
        obj = libbpf.check_ptr(lib.bpf_object__open_file(path, None), "open")
    try:
        assert set(core_loader._programs(obj)) == set(HOOKS)
        for name in MAP_NAMES:
            assert lib.bpf_object__find_map_by_name(obj, name.encode()), name
        core_loader._set_max_entries(obj, "ipe_devices", 4096)
        features = KernelFeatures(HOOKS, "kfunc", None, False, False, True, True)
        core_loader._set_rodata(obj, features)
    finally:
        lib.bpf_object__close(obj)


def test_hooks_serving_a_missing_one_are_left_out() -> None:
    """On 6.1 (no inode_setintegrity) file_open and file_ioctl would note verity set-ups nothing
    reads: their programs are not loaded, so no open() pays a trampoline for them."""
    lib = libbpf.lib()
    path = str(core_loader.bpf_file(core_loader.OBJECT)).encode()
    kernel_6_1 = _features(hooks=tuple(h for h in HOOKS if "integrity" not in h))
    kernel_6_12 = _features()
    for found, left_out in ((kernel_6_1, {"file_open", "file_ioctl", "inode_setintegrity", "bdev_setintegrity"}),
                            (kernel_6_12, set())):
        with libbpf.collecting_log():
            obj = libbpf.check_ptr(lib.bpf_object__open_file(path, None), "open")
        try:
            core_loader._leave_out_unused(obj, found)
            loaded = {hook for hook, prog in core_loader._programs(obj).items() if lib.bpf_program__autoload(prog)}
        finally:
            lib.bpf_object__close(obj)
        assert loaded == set(HOOKS) - left_out


def _features(**changes: object) -> KernelFeatures:
    base: dict[str, object] = dict(hooks=HOOKS, fsverity="inode", overlay="6.5+", dm_table=True,
                                   dm_table_signature=True, mount_walk=True, compressed_module_ids=False)
    base.update(changes)
    return KernelFeatures(**base)  # type: ignore[arg-type]


def test_a_6_1_like_kernel_cannot_evaluate_the_signature_properties() -> None:
    no_hooks = tuple(h for h in HOOKS if "integrity" not in h and h != "bdev_free_security")
    props = _features(hooks=no_hooks, dm_table_signature=False).properties()
    assert props["dmverity_roothash"].supported and "live dm table" in props["dmverity_roothash"].how
    assert not props["dmverity_signature"].supported
    assert not props["fsverity_signature"].supported
    assert props["fsverity_digest"].supported and props["boot_verified"].supported


def test_without_fsverity_neither_fsverity_property_is_claimed() -> None:
    props = _features(fsverity=None).properties()
    assert not props["fsverity_digest"].supported and not props["fsverity_signature"].supported
    assert "kfunc" in _features(fsverity="kfunc").properties()["fsverity_digest"].how


def test_features_round_trip_through_the_loaded_state_file() -> None:
    f = _features(overlay=None, compressed_module_ids=True)
    assert KernelFeatures.from_dict(f.as_dict()) == f


def test_kernel_dev_t_encoding() -> None:
    assert kernel_dev(253, 1) == (253 << 20) | 1


def test_control_lock_is_reentrant(tmp_path: Path) -> None:
    """Nested control_lock() in one thread does not deadlock, and excludes other holders.

    Run in a child with a timeout: a non-reentrant lock would block on its own flock forever,
    and the test must fail then, not hang.
    """
    lock = tmp_path / "l"
    code = textwrap.dedent(f"""
        import fcntl, os
        from pathlib import Path
        from ipe_bpf.kernel.pins import control_lock

        lock = Path({str(lock)!r})

        def free() -> bool:
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            finally:
                os.close(fd)

        with control_lock(lock):
            with control_lock(lock):
                assert not free(), "held while nested"
            assert not free(), "still held by the outer block"
        assert free(), "released at the end"
        print("ok")
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("control_lock() deadlocked on its own nested use")
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_a_policy_this_kernel_cannot_evaluate_is_refused_unless_allowed(tmp_path: Path) -> None:
    """deploy/update name the property and the kernel (EOPNOTSUPP); --allow-unevaluable takes it."""
    from ipe_bpf.errors import LifecycleError
    from ipe_bpf.kernel.lifecycle import Lifecycle
    from ipe_bpf.kernel.store import PolicyStore

    no_sig = tuple(h for h in HOOKS if "integrity" not in h)
    kernel_6_1 = _features(hooks=no_sig, dm_table_signature=False)
    life = Lifecycle(PolicyStore(tmp_path), kernel=lambda: kernel_6_1)
    text = b"policy_name=p policy_version=1.0.0\nDEFAULT action=ALLOW\nop=EXECUTE dmverity_signature=TRUE action=DENY\n"
    with pytest.raises(LifecycleError) as err:
        life.deploy(text, [], allow_unsigned=True, source="p.pol")
    assert err.value.errno_name == "EOPNOTSUPP" and "dmverity_signature" in str(err.value)
    assert os.uname().release in str(err.value) and "evaluate as FALSE" in str(err.value)
    assert life.list().policies == ()  # nothing stored
    accepted = life.deploy(text, [], allow_unsigned=True, allow_unevaluable=True)
    assert accepted.changed
    assert [w for w in accepted.warnings if "dmverity_signature is always FALSE" in w and
            "line 3 `op=EXECUTE dmverity_signature=TRUE action=DENY` never matches" in w]
    plain = b"policy_name=q policy_version=1.0.0\nDEFAULT action=ALLOW\nop=EXECUTE boot_verified=TRUE action=DENY\n"
    assert life.deploy(plain, [], allow_unsigned=True).changed  # what 6.1 can evaluate is not refused


def test_no_kernel_to_check_against_on_a_machine_without_bpf_lsm(tmp_path: Path) -> None:
    from ipe_bpf.kernel.features import running_kernel

    lsm = tmp_path / "lsm"
    lsm.write_text("capability,landlock,yama,apparmor")
    assert running_kernel(tmp_path / "none.json", lsm) is None


def test_allow_unevaluable_names_each_rule_and_what_it_does_here(tmp_path: Path) -> None:
    """update too; a rule testing =FALSE now holds for every file, one testing =TRUE never matches,
    a rule not testing the property is not named."""
    from ipe_bpf.errors import LifecycleError
    from ipe_bpf.kernel.lifecycle import Lifecycle
    from ipe_bpf.kernel.store import PolicyStore

    kernel_6_1 = _features(hooks=tuple(h for h in HOOKS if "integrity" not in h), dm_table_signature=False)
    life = Lifecycle(PolicyStore(tmp_path), kernel=lambda: kernel_6_1)
    head = "policy_name=p policy_version={}\nDEFAULT action=ALLOW\n"
    life.deploy(head.format("1.0.0").encode(), [], allow_unsigned=True)
    text = (head.format("1.0.1") + "op=EXECUTE boot_verified=TRUE action=ALLOW\n"
            "op=EXECUTE fsverity_signature=FALSE action=DENY\n"
            "op=EXECUTE fsverity_signature=TRUE action=ALLOW\n").encode()
    with pytest.raises(LifecycleError) as err:
        life.update(b"p", text, [], allow_unsigned=True)
    assert err.value.errno_name == "EOPNOTSUPP" and "fsverity_signature" in str(err.value)
    out = life.update(b"p", text, [], allow_unsigned=True, allow_unevaluable=True)
    (warning,) = [w for w in out.warnings if "fsverity_signature is always FALSE" in w]
    assert "line 4 `op=EXECUTE fsverity_signature=FALSE action=DENY` fsverity_signature=FALSE holds for every file" in warning
    assert "line 5 `op=EXECUTE fsverity_signature=TRUE action=ALLOW` never matches (its ALLOW never applies)" in warning
    assert "line 3" not in warning


def test_doctor_says_what_is_always_false_here(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipe_bpf.kernel import doctor, features

    kernel_6_1 = _features(hooks=tuple(h for h in HOOKS if "integrity" not in h), dm_table_signature=False)
    monkeypatch.setattr(features, "probe", lambda: kernel_6_1)
    monkeypatch.setattr(features, "load_modules", lambda: None)
    details = {c.name: c for c in doctor.kernel_checks()}
    for prop in ("dmverity_signature", "fsverity_signature"):
        check = details[f"property {prop}"]
        assert not check.ok and check.detail.startswith("always FALSE on this kernel: kernel keeps no"), check
    assert details["property fsverity_digest"].ok and "FALSE" not in details["property fsverity_digest"].detail
