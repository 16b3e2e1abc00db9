"""The seal (docs/seal.md) against the real kernel: every route a root attacker could take to
weaken enforcement is first shown to work unsealed, then refused once sealed (EPERM, the denied
binary still denied, the refusal audited); ordinary BPF use and ipe-bpf's own status and audit
keep working.

A seal lasts until reboot, so this module runs last in tests/vm (its name sorts after every
other test file's) and works in two phases: the module fixture runs every unsealed
attack, each on a fresh load, then loads once more and seals (`ipe-bpf seal --yes`, with an fd
opened before), and each test asserts both halves of its route.  The boot unit's `seal = yes`
setting, and that the next boot starts unsealed, are tests/host_vm/test_seal_reboot.py's.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ipe_bpf.audit.record import SealRecord
from ipe_bpf.cli import app
from ipe_bpf.errors import KernelError
from ipe_bpf.kernel import bpfsys, loader, pins
from ipe_bpf.kernel.events import all_records
from ipe_bpf.kernel.maps import PinnedPolicyMaps
from ipe_bpf.kernel.ringbuf import RingBuffer
from ipe_bpf.policy.compiler import compile_policy
from ipe_bpf.policy.layout import load_header
from ipe_bpf.policy.parser import parse_policy

from . import bpf_attacks as attack
from .kernel_fixtures import SCRATCH, Kernel, expected_hooks, get_kernel, sh
from .test_enforce_kmod import _flags, _loaded, _module

pytestmark = pytest.mark.requires("seal_hooks")

EACCES = 13
STATE = SCRATCH / "seal-state"
ENV = {"IPE_BPF_STATE_DIR": str(STATE), "IPE_BPF_RUN_DIR": str(STATE / "run"), "IPE_BPF_CONFIG": str(STATE / "ipe-bpf.conf")}
ALT = Path("/run/ipe-seal-alt")  # a mount holding a second bpffs, for the destructive unmounts


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str | Path) -> Ran:
    """`ipe-bpf ARGS` run in this process (a fresh interpreter takes 10 to 20 s to start the CLI
    under emulation): the same app, its exit status and output."""
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        runner = CliRunner()
    result = runner.invoke(app, [str(a) for a in args], env=ENV)
    return Ran(result.exit_code, result.stdout, result.stderr)


def ok(*args: str | Path) -> str:
    r = cli(*args)
    assert r.returncode == 0, f"ipe-bpf {' '.join(map(str, args))}: {r.stderr}"
    return r.stdout


def eventually(probe: Callable[[], object], want: object, timeout: float = 15.0) -> object:
    """probe() until it returns want (links detach asynchronously); the last value."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def sealtest_policy(k: Kernel, version: str = "1.0.0") -> str:
    return "\n".join([
        f"policy_name=sealtest policy_version={version}",
        "DEFAULT action=ALLOW",
        "DEFAULT op=KMODULE action=DENY",
        "DEFAULT op=KEXEC_IMAGE action=DENY",
        "DEFAULT op=KEXEC_INITRAMFS action=DENY",
        f"op=EXECUTE fsverity_digest={k.bad_digest} action=DENY",
        f"op=EXECUTE {k.hooked_volume.property} action=DENY",
    ]) + "\n"


def allow_policy(version: str) -> str:
    return f"policy_name=allow policy_version={version}\nDEFAULT action=ALLOW\n"


def write(name: str, text: str) -> Path:
    path = STATE / name
    path.write_text(text)
    return path


def fresh_load() -> None:
    """Load through the CLI (the store's active policy is applied), enforcing."""
    if pins.is_loaded():
        loader.unload()
    ok("load")


def unload_if_loaded() -> None:
    if pins.is_loaded():
        loader.unload()


def refusals() -> list[SealRecord]:
    """The seal's records now in the ring buffer (draining it)."""
    return [r for r in all_records() if isinstance(r, SealRecord)]


def hooked_prog(k: Kernel) -> Path:
    return k.hooked_volume.mount / "prog"


def forged_device() -> bytes:
    """An ipe_bdev_state claiming a root hash no policy names."""
    return load_header().struct("ipe_bdev_state").pack(has_roothash=1, sig_valid=0, alg_len=6, digest_len=32,
                                                       alg=b"sha256", digest=bytes(64))


def permissive_config() -> bytes:
    with PinnedPolicyMaps() as maps:
        state = maps.state()
    active = 0 if state.active_slot is None else state.active_slot + 1
    return load_header().struct("ipe_config").pack(active=active, permissive=1, success_audit=0, flips=state.flips)


def bpftool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bpftool", *args], capture_output=True, text=True)


def first_table_key() -> tuple[int, bytes]:
    """A writable fd to ipe_digests (owned by the caller; every installed policy has a digests
    table, not always a rules table) and one of its keys."""
    fd = bpfsys.obj_get(str(pins.map_path("ipe_digests")))
    info = bpfsys.map_info(fd)
    return fd, bpfsys.keys(fd, info.key_size)[0]


def our_link_fd(hook: str = "bprm_check_security") -> int:
    return bpfsys.obj_get(str(pins.links_dir() / hook))


def our_prog_id(hook: str = "bprm_check_security") -> int:
    fd = our_link_fd(hook)
    try:
        return bpfsys.link_info(fd).prog_id
    finally:
        os.close(fd)


def errno_of(action: Callable[[], object]) -> int:
    """The errno action() failed with, 0 if it worked (fds it returns are closed)."""
    try:
        got = action()
    except (OSError, KernelError) as err:
        if isinstance(err, KernelError):
            return getattr(errno, err.errno_name, -1)
        return err.errno or -1
    if isinstance(got, int) and got > 2:
        os.close(got)
    return 0


_libc = ctypes.CDLL(None, use_errno=True)


def mount2(source: str, target: str, fstype: str, flags: int = 0) -> int:
    """mount(2) itself (util-linux uses the new mount API): 0 or the errno."""
    ret = _libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), None)
    return 0 if ret == 0 else ctypes.get_errno()


# ------------------------------------------------------------------------ the campaign


@dataclass
class Campaign:
    k: Kernel
    unsealed: dict[str, object] = field(default_factory=dict)
    early_table_fd: int = -1  # opened read-write before the seal
    seal_stdout: str = ""


def _unsealed_cli(k: Kernel, seen: dict[str, object]) -> None:
    fresh_load()
    seen["enforce off"] = (cli("enforce", "off").returncode, k.exec_status(k.bad))
    ok("enforce", "on")
    seen["success-audit on"] = cli("success-audit", "on").returncode
    ok("success-audit", "off")
    seen["policy deploy"] = cli("policy", "deploy", write("allow1.pol", allow_policy("1.0.0")), "--unsigned").returncode
    seen["policy activate"] = (cli("policy", "activate", "allow").returncode, k.exec_status(k.bad))
    ok("policy", "activate", "sealtest")
    seen["policy update"] = cli("policy", "update", "allow", write("allow2.pol", allow_policy("1.0.1")),
                                "--unsigned").returncode
    seen["policy delete"] = cli("policy", "delete", "allow").returncode
    seen["unload"] = (cli("unload").returncode, k.exec_status(k.bad))


def _reinstall(k: Kernel) -> None:
    """Back to the sealtest policy, enforcing (after an attack changed the maps)."""
    with PinnedPolicyMaps() as maps:
        maps.set_enforce(True)
        maps.install(compile_policy(parse_policy(sealtest_policy(k).encode())), 1)
    assert k.exec_status(k.bad) == EACCES


def _unsealed_bpf(k: Kernel, seen: dict[str, object]) -> None:
    """bpf() attacks, on one load (each undone before the next)."""
    fresh_load()
    value = permissive_config()
    r = bpftool("map", "update", "pinned", str(pins.map_path("ipe_config")), "key", "hex", "00", "00", "00", "00",
                "value", "hex", *(f"{b:02x}" for b in value))
    seen["bpftool map update"] = (r.returncode, k.exec_status(k.bad))
    _reinstall(k)
    # the policy's tables, both: a rule that names one digest is kept in the digests map
    fds = [bpfsys.obj_get(str(pins.map_path(name))) for name in ("ipe_rules", "ipe_digests")]
    try:
        deleted = sum(errno_of(lambda fd=fd, key=key: bpfsys.delete(fd, key))
                      for fd in fds for key in bpfsys.keys(fd, bpfsys.map_info(fd).key_size))
        forget_cached_decision(k.bad)  # the attacker's second step: the decision cached for the file
        seen["map delete"] = (deleted, k.exec_status(k.bad))
    finally:
        for fd in fds:
            os.close(fd)
    _reinstall(k)
    prog = attack.map_elem_iterator_program()
    config = bpfsys.obj_get(str(pins.map_path("ipe_config")), read_only=True)
    try:
        attack.run_map_elem_iterator(prog, config)
    finally:
        os.close(config)
        os.close(prog)
    seen["map_elem iterator"] = k.exec_status(k.bad)
    _reinstall(k)
    devices = bpfsys.obj_get(str(pins.map_path("ipe_devices")))
    before = k.exec_status(hooked_prog(k))
    try:
        writer = attack.map_writer(devices, struct.pack("=I", k.hooked_volume.dev), forged_device())
        attack.test_run(writer)
        os.close(writer)
        forget_cached_decision(hooked_prog(k))  # and the decision cached for the file
        seen["program writing ipe_devices"] = (before, k.exec_status(hooked_prog(k)))
        bpfsys.delete(devices, struct.pack("=I", k.hooked_volume.dev))  # the live dm table decides again
    finally:
        os.close(devices)
    link = our_link_fd()
    try:
        seen["link detach"] = errno_of(lambda: attack.detach_link(link))
        seen["link update"] = errno_of(lambda: attack.update_link(link, link))
    finally:
        os.close(link)
    seen["fentry on our program"] = errno_of(lambda: attack.fentry_on(our_prog_id()))
    r = bpftool("map", "freeze", "pinned", str(pins.map_path("ipe_events")))  # last: for good
    seen["bpftool map freeze ipe_events"] = (r.returncode, errno_of(lambda: RingBuffer().close()))


def _unsealed_programs(k: Kernel, seen: dict[str, object]) -> None:
    """Programs overriding decisions, on the load _unsealed_bpf left."""
    for what, make in (("fmod_ret on security_mmap_file", attack.allow_everything_fmod_ret),
                       ("lsm program on mmap_file", attack.allow_everything_lsm)):
        link = make()
        try:
            seen[what] = k.run("mmap-exec", k.bad)
        finally:
            os.close(link)
        assert eventually(lambda: k.run("mmap-exec", k.bad), EACCES) == EACCES


def _unsealed_pins(k: Kernel, seen: dict[str, object]) -> None:
    """Pins and mounts, on the same load (it is gone at the end), then on a second bpffs."""
    sh("mount", "-t", "tmpfs", "over", pins.PIN_ROOT)
    seen["mount over the pins"] = (cli("status").stdout.startswith("not loaded"), k.exec_status(k.bad))
    sh("umount", pins.PIN_ROOT)
    moved = pins.BPFFS / "moved"
    os.rename(pins.PIN_ROOT, moved)
    lost = cli("status").stdout.startswith("not loaded")
    shutil.rmtree(moved)
    seen["mv + rm -r the pins"] = (lost, eventually(lambda: k.exec_status(k.bad), 0))
    # unmounting the bpffs, or lazily a mount above it, on a second bpffs (ALT/bpf/ipe_bpf)
    for what, target, lazy in (("umount the bpffs", ALT / "bpf", False), ("umount -l above it", ALT, True)):
        ALT.mkdir(exist_ok=True)
        sh("mount", "-t", "tmpfs", "alt", ALT)
        (ALT / "bpf").mkdir()
        sh("mount", "-t", "bpf", "bpf", ALT / "bpf")
        root = ALT / "bpf" / "ipe_bpf"
        loader.load(root=root, state_file=SCRATCH / "alt-loaded.json")
        with PinnedPolicyMaps(root) as maps:
            maps.install(compile_policy(parse_policy(sealtest_policy(k).encode())), 1)
        denied = k.exec_status(k.bad)
        sh("umount", *(["-l"] if lazy else []), target)
        seen[what] = (denied, eventually(lambda: k.exec_status(k.bad), 0))
        if os.path.ismount(ALT):
            sh("umount", "-l", ALT)


@pytest.fixture(scope="module")
def campaign() -> Iterator[Campaign]:
    k = get_kernel()
    unload_if_loaded()
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True)
    ok("policy", "deploy", write("sealtest.pol", sealtest_policy(k)), "--unsigned")
    ok("policy", "activate", "sealtest")
    c = Campaign(k)
    for phase in (_unsealed_cli, _unsealed_bpf, _unsealed_programs, _unsealed_pins):
        phase(k, c.unsealed)
    # what the sealed attempts will try, each of which would work unsealed: deploy `other`,
    # activate, update and delete `allow`
    ok("policy", "deploy", write("allow3.pol", allow_policy("1.0.2")), "--unsigned")
    write("allow4.pol", allow_policy("1.0.3"))
    write("other.pol", "policy_name=other policy_version=1.0.0\nDEFAULT action=ALLOW\n")
    ok("load")
    c.early_table_fd, _key = first_table_key()
    assert "sealed until reboot" in ok("seal", "--yes")
    c.seal_stdout = ok("seal", "--yes")  # again: it says since when
    refusals()
    yield c


# ------------------------------------------------------------------------ the routes


def test_route1_the_control_plane_refuses_every_change(campaign: Campaign) -> None:
    k, seen = campaign.k, campaign.unsealed
    assert seen["enforce off"] == (0, 0)  # unsealed: the denied binary ran
    assert seen["policy activate"] == (0, 0)
    assert seen["unload"] == (0, 0)
    assert seen["success-audit on"] == seen["policy deploy"] == seen["policy update"] == seen["policy delete"] == 0
    assert "already sealed since" in campaign.seal_stdout
    attempts = {
        "enforce off": ("enforce", "off"),
        "success-audit on": ("success-audit", "on"),
        "policy deploy": ("policy", "deploy", STATE / "other.pol", "--unsigned"),
        "policy activate": ("policy", "activate", "allow"),
        "policy update": ("policy", "update", "allow", STATE / "allow4.pol", "--unsigned"),
        "policy delete": ("policy", "delete", "allow"),
        "unload": ("unload",),
    }
    for name, args in attempts.items():
        r = cli(*args)
        assert r.returncode == 1 and r.stderr.startswith("EPERM: ") and "sealed since" in r.stderr, (name, r.stderr)
        assert k.exec_status(k.bad) == EACCES, name
    log = (STATE / "audit.log").read_text()
    for name in attempts:
        assert f'op=seal_refused attempt="{name}" pid={os.getpid()} comm="python3"' in log, name
    assert "type=1121" in log
    # past the control plane's guard, the kernel refuses (and audits) the write itself
    with pytest.raises(KernelError) as err:
        with PinnedPolicyMaps() as maps:
            maps.set_enforce(False)
    assert err.value.errno_name == "EPERM"
    assert k.exec_status(k.bad) == EACCES
    got = refusals()
    assert any(r.attempt == "map_write" and r.target == b"ipe_config" and r.detail == "BPF_MAP_UPDATE_ELEM"
               and r.pid == os.getpid() and r.comm == b"python3" for r in got), got


def forget_cached_decision(path: Path) -> None:
    """Delete the program's cached decision for a file (inode storage, keyed by an fd of it)."""
    for link_path in pins.link_paths():
        link = bpfsys.obj_get(str(link_path))
        prog = bpfsys.prog_fd_by_id(bpfsys.link_info(link).prog_id)
        os.close(link)
        try:
            map_ids = bpfsys.prog_map_ids(prog)
        finally:
            os.close(prog)
        for map_id in map_ids:
            fd = bpfsys.map_fd_by_id(map_id)
            try:
                if bpfsys.map_info(fd).name == "ipe_cache":
                    with open(path, "rb") as f:
                        bpfsys.delete(fd, struct.pack("=i", f.fileno()))  # False: nothing was cached
                    return
            finally:
                os.close(fd)
    raise AssertionError("no ipe_cache map among the program's")


def test_route2_bpf_on_maps_links_and_programs_is_refused(campaign: Campaign) -> None:
    k, seen = campaign.k, campaign.unsealed
    assert seen["bpftool map update"] == (0, 0)  # permissive through bpftool
    assert seen["map delete"] == (0, 0)  # the DENY rules deleted
    assert seen["map_elem iterator"] == 0  # a read-only fd was enough to make it permissive
    assert seen["program writing ipe_devices"] == (EACCES, 0)  # a forged dm-verity root hash
    assert seen["bpftool map freeze ipe_events"] == (0, errno.EPERM)  # the audit reader locked out
    assert seen["link detach"] in (errno.EOPNOTSUPP, 524) and seen["link update"] == errno.EINVAL  # the kernel's own
    assert seen["fentry on our program"] == 0
    value = permissive_config()
    r = bpftool("map", "update", "pinned", str(pins.map_path("ipe_config")), "key", "hex", "00", "00", "00", "00",
                "value", "hex", *(f"{b:02x}" for b in value))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    fd, key = first_table_key()
    try:
        assert errno_of(lambda: bpfsys.delete(fd, key)) == errno.EPERM
    finally:
        os.close(fd)
    assert errno_of(lambda: bpfsys.delete(campaign.early_table_fd, key)) == errno.EPERM  # opened before the seal
    r = bpftool("map", "freeze", "pinned", str(pins.map_path("ipe_events")))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    RingBuffer().close()  # the audit reader still maps its consumer page
    assert errno_of(attack.map_elem_iterator_program) == errno.EPERM
    devices = bpfsys.obj_get(str(pins.map_path("ipe_devices")))
    try:
        assert errno_of(lambda: attack.map_writer(devices, struct.pack("=I", k.hooked_volume.dev),
                                                  forged_device())) == errno.EPERM
    finally:
        os.close(devices)
    link = our_link_fd()
    try:
        assert errno_of(lambda: attack.detach_link(link)) == errno.EPERM
        assert errno_of(lambda: attack.update_link(link, link)) == errno.EPERM
    finally:
        os.close(link)
    assert errno_of(lambda: attack.fentry_on(our_prog_id())) == errno.EPERM
    assert k.exec_status(k.bad) == EACCES and k.exec_status(hooked_prog(k)) == EACCES
    got = {(r.attempt, r.detail, r.target) for r in refusals()}
    for want in (("map_write", "BPF_MAP_UPDATE_ELEM", b"ipe_config"), ("map_write", "BPF_MAP_DELETE_ELEM", b"ipe_digests"),
                 ("map_write", "BPF_MAP_FREEZE", b"ipe_events"), ("prog_load", "map_elem_iterator", b"ipe_attack"),
                 ("prog_load", "uses_ipe_bpf_map", b"ipe_attack"), ("link_write", "BPF_LINK_DETACH", b"ipe_bprm_check_"),
                 ("link_write", "BPF_LINK_UPDATE", b"ipe_bprm_check_"), ("prog_load", "targets_ipe_bpf", b"ipe_attack")):
        assert want in got, (want, got)


def test_route3_pins_and_mounts_are_refused(campaign: Campaign) -> None:
    k, seen = campaign.k, campaign.unsealed
    assert seen["mv + rm -r the pins"] == (True, 0)  # the tools lost it, then everything detached
    assert seen["mount over the pins"] == (True, EACCES)  # hidden from the tools (still enforcing)
    assert seen["umount the bpffs"] == (EACCES, 0)
    assert seen["umount -l above it"] == (EACCES, 0)
    hooks = sorted(p.name for p in pins.link_paths())
    assert subprocess.run(["rm", "-rf", str(pins.PIN_ROOT)], capture_output=True).returncode != 0
    assert errno_of(lambda: os.rename(pins.links_dir(), pins.BPFFS / "moved")) == errno.EPERM
    assert errno_of(lambda: os.rename(pins.PIN_ROOT, pins.BPFFS / "moved")) == errno.EPERM
    for argv in (["umount", str(pins.BPFFS)], ["umount", "-l", str(pins.BPFFS)], ["umount", "-l", "/sys"],
                 ["mount", "-t", "tmpfs", "over", str(pins.PIN_ROOT)], ["mount", "--bind", "/tmp", str(pins.BPFFS)]):
        r = subprocess.run(argv, capture_output=True, text=True)
        assert r.returncode != 0, argv
    assert mount2("over", str(pins.PIN_ROOT), "tmpfs") == errno.EPERM  # mount(2), not the new mount API
    assert mount2("over", str(pins.BPFFS), "tmpfs") == errno.EPERM
    assert sorted(p.name for p in pins.link_paths()) == hooks == expected_hooks()
    assert k.exec_status(k.bad) == EACCES
    status = json.loads(ok("status", "--json"))
    assert status["loaded"] and status["sealed"]
    got = refusals()
    kinds = {r.attempt for r in got}
    assert {"unlink", "umount", "mount"} <= kinds, got
    assert any(r.attempt == "umount" and r.target == b"sys" and r.comm == b"umount" for r in got), got
    assert any(r.attempt == "unlink" and r.target == b"links" for r in got), got


def test_route4_programs_that_could_override_decisions_are_refused(campaign: Campaign) -> None:
    k, seen = campaign.k, campaign.unsealed
    assert seen["fmod_ret on security_mmap_file"] == 0  # every PROT_EXEC mapping allowed
    assert seen["lsm program on mmap_file"] == 0  # 1 << 32: ours skipped, 0 to the caller
    assert errno_of(attack.allow_everything_fmod_ret) == errno.EPERM
    assert errno_of(attack.allow_everything_lsm) == errno.EPERM
    assert k.run("mmap-exec", k.bad) == EACCES
    got = {(r.attempt, r.detail) for r in refusals()}
    assert {("prog_load", "fmod_ret"), ("prog_load", "lsm")} <= got, got


def test_kernel_loads_follow_the_policy_and_doctor_names_what_the_seal_rests_on(campaign: Campaign) -> None:
    k = campaign.k
    name, path = _module()
    assert k.run("finit", path, _flags(path)) == EACCES  # DEFAULT op=KMODULE action=DENY
    assert not _loaded(name)
    checks = {c["name"]: c for c in json.loads(cli("doctor", "--json").stdout)}
    for op in ("KMODULE", "KEXEC_IMAGE", "KEXEC_INITRAMFS"):
        assert checks[f"seal {op}"]["ok"], checks[f"seal {op}"]
    lockdown = Path("/sys/kernel/security/lockdown").read_text()
    assert checks["seal lockdown"]["ok"] == ("[none]" not in lockdown), (lockdown, checks["seal lockdown"])


def test_ordinary_bpf_and_ipe_bpf_status_and_audit_work_while_sealed(campaign: Campaign) -> None:
    k = campaign.k
    for what in ("prog", "map", "link"):
        r = bpftool(what, "list")
        assert r.returncode == 0, (what, r.stderr)
    assert "ipe_bprm_check" in bpftool("prog", "list").stdout and "ipe_config" in bpftool("map", "list").stdout
    prog, link = attack.raw_tracepoint()  # an ordinary tracing program loads and attaches
    os.close(link)
    os.close(prog)
    assert k.exec_status(k.good) == 0 and k.exec_status(k.bad) == EACCES
    text = ok("status")
    assert "sealed since" in text and "attempts refused" in text
    status = json.loads(ok("status", "--json"))
    assert status["sealed"] and status["sealed_at"] > 0 and status["enforcing"]
    assert status["counters"]["seal_refused"] > 0
    assert errno_of(lambda: bpfsys.delete(campaign.early_table_fd, b"\0" * 4)) == errno.EPERM  # one more, audited
    lines = ok("audit", "tail").splitlines()
    assert any(line.startswith("type=1121 ") and "op=seal_refused attempt=map_write" in line for line in lines), lines
    assert any(line.startswith("type=1420 ") for line in lines), lines
