"""With our test certificate in UEFI db: signed dm-verity root hashes, and kernel IPE as a peer.

The VM must be booted with `--uefi-db tests/vm/keys/uefi-db-test.pem` (scripts/dev test does):
the kernel then trusts that certificate in its .platform keyring, which 6.12 uses for IPE
policy signatures and dm-verity root hash signatures.  Without it these tests fail, naming the
option; they never skip.

The peer test runs the kernel's own IPE and ipe-bpf side by side, both permissive and both
auditing every decision, over the same policies (signed by ipe-bpf's own signer for the kernel)
and the same real files, and requires the records to be identical: the 1422 and 1421 of
deploying and activating each policy, and the 1420 of every decision.
Kernel IPE stays permissive for the rest of the boot and ends on an allow-all policy.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ipe_bpf.audit.render import ipe_fields
from ipe_bpf.kernel import kernel_ipe
from ipe_bpf.kernel.lifecycle import Lifecycle
from ipe_bpf.kernel.store import PolicyStore
from ipe_bpf.policy.signing import sign_policy

from .kernel_fixtures import (  # noqa: F401
    FSV,
    DmVerityVolume,
    Kernel,
    get_kernel,
    ipe,
    kernel,
    make_verity_volume,
    policy,
    sh,
    verity_copy,
)

pytestmark = pytest.mark.uefi_db

EACCES = 13
KEYS = Path(__file__).resolve().parent / "keys"
KEY, CERT = KEYS / "uefi-db-test.key", KEYS / "uefi-db-test.pem"
TEST_CN = "ipe-bpf TEST ONLY uefi db key"
_versions = itertools.count(1)


@pytest.fixture(scope="module")
def platform_key() -> None:
    keys = sh("keyctl", "show", "%:.platform", check=False).stdout
    if TEST_CN not in keys:
        pytest.fail(f"the kernel's .platform keyring lacks {CERT.name}: boot with `ipe-bpf vm run "
                    f"--uefi-db tests/vm/keys/{CERT.name}` (keyring: {keys.strip() or 'unreadable'})",
                    pytrace=False)


@pytest.fixture(scope="module")
def signed_volume(platform_key: None, kernel: Kernel) -> DmVerityVolume:
    return make_verity_volume("ipe-signed", {"prog": kernel.good}, signer=(KEY, CERT))


@pytest.mark.requires("setintegrity_hooks", "dmverity_platform_keyring")
def test_dmverity_signature_true_on_a_volume_with_a_signed_root_hash(
        ipe: Kernel, signed_volume: DmVerityVolume) -> None:
    with ipe.maps() as maps:
        devices = {d.dev: d for d in maps.devices()}
    assert devices[signed_volume.dev].signature_valid
    assert not devices[ipe.hooked_volume.dev].signature_valid
    ipe.activate(policy("op=EXECUTE dmverity_signature=TRUE action=DENY"))
    assert ipe.exec_status(signed_volume.mount / "prog") == EACCES
    assert ipe.exec_status(ipe.hooked_volume.mount / "prog") == 0
    ipe.activate(policy(f"op=EXECUTE {signed_volume.property} dmverity_signature=FALSE action=DENY"))
    assert ipe.exec_status(signed_volume.mount / "prog") == 0


@pytest.mark.requires("setintegrity_hooks", "dmverity_platform_keyring")
def test_live_table_gives_the_signature_state_the_hook_would(
        ipe: Kernel, signed_volume: DmVerityVolume) -> None:
    """Drop what the bdev_setintegrity hook captured: the program then reads the device's live
    dm-verity table, root hash and verified signature included (a device set up before load)."""
    import struct

    from ipe_bpf.kernel import bpfsys

    with ipe.maps() as maps:
        assert bpfsys.delete(maps.map_fd("ipe_devices", write=True), struct.pack("=I", signed_volume.dev))
        assert signed_volume.dev not in {d.dev for d in maps.devices()}
    ipe.activate(policy(f"op=EXECUTE {signed_volume.property} dmverity_signature=TRUE action=DENY"))
    assert ipe.exec_status(signed_volume.mount / "prog") == EACCES
    ipe.activate(policy(f"op=EXECUTE {ipe.early_volume.property} dmverity_signature=FALSE action=DENY"))
    assert ipe.exec_status(ipe.early_volume.mount / "prog") == EACCES  # unsigned, also walked


# ------------------------------------------------------------------ kernel IPE as a peer


def _signed_policy(body: str) -> tuple[str, bytes]:
    """A new policy (next version) with ``body`` as its rules: its text and PKCS#7 blob."""
    version = next(_versions)
    text = f"policy_name=peer_{version} policy_version=1.0.{version}\n{body}"
    return text, sign_policy(text.encode(), KEY.read_bytes(), CERT.read_bytes())


def _kernel_ipe_activate(text: str, blob: bytes) -> None:
    """Load ``blob`` into kernel IPE (new_policy) and make it the active policy."""
    kernel_ipe.deploy(blob)
    kernel_ipe.activate(text.split()[0].split("=", 1)[1])


class Kmsg:
    """Audit records as the kernel prints them to its log (audit=1, no auditd): (type, body)."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def records(self) -> list[tuple[int, str]]:
        out = []
        while True:
            try:
                line = os.read(self.fd, 8192).decode(errors="replace")
            except BlockingIOError:
                return out
            except BrokenPipeError:  # overwritten records: keep reading
                continue
            message = line.split(";", 1)[-1].strip()
            if message.startswith("audit: type=14") and "): " in message:
                kind = int(message.split("type=", 1)[1].split()[0])
                out.append((kind, message.split("): ", 1)[1]))

    def close(self) -> None:
        os.close(self.fd)


RATELIMIT = Path("/proc/sys/kernel/printk_ratelimit")  # kauditd prints only within it


@pytest.fixture(scope="module")
def kernel_ipe_peer(platform_key: None) -> Iterator[None]:
    kernel_ipe.set_enforce(False)  # never let kernel IPE deny: it cannot be unloaded
    kernel_ipe.set_success_audit(True)
    interval = RATELIMIT.read_text()
    RATELIMIT.write_text("0")
    try:
        yield
    finally:
        kernel_ipe.set_success_audit(False)
        _kernel_ipe_activate(*_signed_policy("DEFAULT action=ALLOW\n"))
        RATELIMIT.write_text(interval)


PEER_POLICIES = (
    "DEFAULT action=ALLOW\nop=EXECUTE fsverity_digest={bad} action=DENY\n",
    "DEFAULT action=ALLOW\nDEFAULT op=EXECUTE action=DENY\nop=EXECUTE fsverity_digest={good} action=ALLOW\n",
    "DEFAULT action=DENY\nop=EXECUTE {hooked} action=ALLOW\nop=EXECUTE dmverity_signature=TRUE action=ALLOW\n",
    "DEFAULT action=ALLOW\nop=EXECUTE dmverity_signature=FALSE fsverity_signature=FALSE action=DENY\n",
    "DEFAULT action=ALLOW\nop=EXECUTE boot_verified=FALSE {signed} action=DENY\n",
)


def _activate_in_both(ipe: Kernel, text: str, blob: bytes) -> None:
    """The policy active in kernel IPE and in ipe-bpf, ipe-bpf permissive and auditing allows."""
    _kernel_ipe_activate(text, blob)
    ipe.activate(text)
    with ipe.maps() as maps:
        maps.set_enforce(False)
        maps.set_success_audit(True)


def _decisions(ipe: Kernel, kmsg: Kmsg, act: Callable[[], None],
               keep: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """Run ``act`` with both audit streams emptied first: (ours, theirs), the 1420 bodies kept."""
    ipe.drain()
    kmsg.records()
    act()
    ours = sorted(body for body in map(ipe_fields, ipe.drain()) if keep(body))
    theirs = sorted(body for kind, body in kmsg.records() if kind == 1420 and keep(body))
    return ours, theirs


def _parsed(line: str) -> tuple[int, str]:
    """(type, body) of one of our 'type=NNNN audit(...): body' lines."""
    return int(line.split("type=", 1)[1].split()[0]), line.split("): ", 1)[1]


@pytest.mark.requires("kernel_ipe", "setintegrity_hooks", "dmverity_platform_keyring")
def test_kernel_ipe_and_ipe_bpf_write_the_same_records(
        ipe: Kernel, kernel_ipe_peer: None, signed_volume: DmVerityVolume, tmp_path: Path) -> None:
    """Per policy: deploy + activate (1422, 1421) and every decision (1420) of 6 real execs."""
    files = [ipe.good, ipe.bad, ipe.plain, ipe.hooked_volume.mount / "prog",
             ipe.early_volume.mount / "prog", signed_volume.mount / "prog"]

    def exec_all() -> None:
        for path in files:
            assert ipe.exec_status(path) == 0, path  # both permissive

    ours_store = Lifecycle(PolicyStore(tmp_path / "state"))  # records only: no kernel target
    kmsg = Kmsg()
    compared = 0
    try:
        for template in PEER_POLICIES:
            body = template.format(bad=ipe.bad_digest, good=ipe.good_digest,
                                   hooked=ipe.hooked_volume.property, signed=signed_volume.property)
            text, blob = _signed_policy(body)
            kmsg.records()
            _activate_in_both(ipe, text, blob)
            theirs_lifecycle = [r for r in kmsg.records() if r[0] in (1421, 1422)]
            ours_lifecycle = [_parsed(line) for line in (
                *ours_store.deploy(blob, CERT).records,
                *ours_store.activate(text.split()[0].split("=", 1)[1].encode()).records)]
            assert ours_lifecycle == theirs_lifecycle, f"policy:\n{text}"
            ours, theirs = _decisions(ipe, kmsg, exec_all, lambda b: ' path="/mnt/' in b)
            assert ours == theirs, f"policy:\n{text}"
            compared += len(ours)
    finally:
        kmsg.close()
    assert compared >= len(PEER_POLICIES) * len(files)  # at least each exec's BPRM_CHECK


@pytest.mark.requires("rebuilt_paths")
@pytest.mark.requires("kernel_ipe")
def test_kernel_ipe_and_ipe_bpf_agree_on_the_bypass_hooks(ipe: Kernel, kernel_ipe_peer: None) -> None:
    """mmap, mprotect, anonymous executable memory and memfd exec: the same records (MPROTECT's
    path is rebuilt by walking dentries and mounts: bpf_d_path is refused in file_mprotect)."""
    _activate_in_both(ipe, *_signed_policy(
        "DEFAULT action=ALLOW\nDEFAULT op=EXECUTE action=DENY\n"
        f"op=EXECUTE fsverity_digest={ipe.attack_digest} action=ALLOW\n"
        f"op=EXECUTE fsverity_digest={ipe.good_digest} action=ALLOW\n"))

    def attacks() -> None:
        for args in (("mmap-exec", ipe.good), ("mprotect", ipe.bad), ("anon-exec",), ("anon-mprotect",),
                     ("memfd-exec", ipe.plain)):
            ipe.run(*args)

    kmsg = Kmsg()
    try:
        ours, theirs = _decisions(ipe, kmsg, attacks, lambda b: ' comm="attack" ' in b)
    finally:
        kmsg.close()
    hooks = {b.split()[1] for b in theirs}
    assert {"ipe_hook=MMAP", "ipe_hook=MPROTECT", "ipe_hook=BPRM_CHECK"} <= hooks, theirs
    assert any(" path=? dev=? ino=? " in b for b in theirs)  # anonymous memory
    assert ours == theirs


@pytest.mark.requires("kernel_ipe")
def test_kernel_ipe_and_ipe_bpf_agree_on_kernel_module_loads(ipe: Kernel, kernel_ipe_peer: None) -> None:
    """KMODULE from a file (kernel_read_file) and from memory (kernel_load_data): same records."""
    from .test_enforce_kmod import _flags, _loaded, _module, _raw, _unload

    name, path = _module()
    copy = FSV / f"peer-{path.name}"
    digest = verity_copy(path, copy)
    _activate_in_both(ipe, *_signed_policy(
        "DEFAULT action=ALLOW\nDEFAULT op=KMODULE action=DENY\n"
        f"op=KMODULE fsverity_digest={digest} action=ALLOW\n"))

    def loads() -> None:
        for args in (("finit", copy, _flags(copy)), ("finit", path, _flags(path)), ("init", _raw(path))):
            assert ipe.run(*args) == 0, args  # both permissive
            assert _loaded(name)
            _unload(ipe, name)

    kmsg = Kmsg()
    try:
        ours, theirs = _decisions(ipe, kmsg, loads, lambda b: "ipe_op=KMODULE " in b)
    finally:
        kmsg.close()
        _unload(ipe, name)
    assert {b.split()[1] for b in theirs} == {"ipe_hook=KERNEL_READ", "ipe_hook=KERNEL_LOAD"}, theirs
    assert len(theirs) == 3 and ours == theirs
