"""With our test certificate in UEFI db: signed dm-verity root hashes, and kernel IPE as a peer.

The VM must be booted with `--uefi-db tests/vm/keys/uefi-db-test.pem` (scripts/dev test does):
the kernel then trusts that certificate in its .platform keyring, which 6.12 uses for IPE
policy signatures and dm-verity root hash signatures.  Without it these tests fail, naming the
option; they never skip.

The peer test runs the kernel's own IPE and ipe-bpf side by side, both permissive and both
auditing every decision, over the same policies (signed by ipe-bpf's own signer for the kernel)
and the same real files, and requires the two 1420 records of every event to be identical.
Kernel IPE stays permissive for the rest of the boot and ends on an allow-all policy.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipe_bpf.audit.render import ipe_fields
from ipe_bpf.policy.signing import sign_policy

from .kernel_fixtures import (  # noqa: F401
    DmVerityVolume,
    Kernel,
    get_kernel,
    ipe,
    kernel,
    make_verity_volume,
    policy,
    sh,
)

pytestmark = pytest.mark.uefi_db

EACCES = 13
KEYS = Path(__file__).resolve().parent / "keys"
KEY, CERT = KEYS / "uefi-db-test.key", KEYS / "uefi-db-test.pem"
TEST_CN = "ipe-bpf TEST ONLY uefi db key"
IPE_FS = Path("/sys/kernel/security/ipe")
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


def test_dmverity_signature_true_on_a_volume_with_a_signed_root_hash(
        ipe: Kernel, signed_volume: DmVerityVolume) -> None:
    with ipe.maps() as maps:
        devices = {d.dev: d for d in maps.devices()}
    assert devices[signed_volume.dev].signature_valid and not devices[signed_volume.dev].seeded
    assert not devices[ipe.hooked_volume.dev].signature_valid
    ipe.activate(policy("op=EXECUTE dmverity_signature=TRUE action=DENY"))
    assert ipe.exec_status(signed_volume.mount / "prog") == EACCES
    assert ipe.exec_status(ipe.hooked_volume.mount / "prog") == 0
    ipe.activate(policy(f"op=EXECUTE {signed_volume.property} dmverity_signature=FALSE action=DENY"))
    assert ipe.exec_status(signed_volume.mount / "prog") == 0


# ------------------------------------------------------------------ kernel IPE as a peer


def _kernel_ipe_write(relative: str, data: bytes) -> None:
    fd = os.open(IPE_FS / relative, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _kernel_ipe_activate(body: str) -> str:
    """Sign `body` (rules) as a new policy for kernel IPE, load and activate it; its name."""
    version = next(_versions)
    name = f"peer_{version}"
    text = f"policy_name={name} policy_version=1.0.{version}\n{body}"
    blob = sign_policy(text.encode(), KEY.read_bytes(), CERT.read_bytes())
    _kernel_ipe_write("new_policy", blob)
    _kernel_ipe_write(f"policies/{name}/active", b"1")
    return text


class Kmsg:
    """Kernel IPE's 1420 records as printed to the kernel log (audit=1, no auditd)."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def bodies(self) -> list[str]:
        out = []
        while True:
            try:
                line = os.read(self.fd, 8192).decode(errors="replace")
            except BlockingIOError:
                return out
            except BrokenPipeError:  # overwritten records: keep reading
                continue
            message = line.split(";", 1)[-1].strip()
            if "type=1420 " in message and "): " in message:
                out.append(message.split("): ", 1)[1])

    def close(self) -> None:
        os.close(self.fd)


RATELIMIT = Path("/proc/sys/kernel/printk_ratelimit")  # kauditd prints only within it


@pytest.fixture(scope="module")
def kernel_ipe(platform_key: None) -> Iterator[None]:
    _kernel_ipe_write("enforce", b"0")  # never let kernel IPE deny: it cannot be unloaded
    _kernel_ipe_write("success_audit", b"1")
    interval = RATELIMIT.read_text()
    RATELIMIT.write_text("0")
    try:
        yield
    finally:
        _kernel_ipe_write("success_audit", b"0")
        _kernel_ipe_activate("DEFAULT action=ALLOW\n")
        RATELIMIT.write_text(interval)


PEER_POLICIES = (
    "DEFAULT action=ALLOW\nop=EXECUTE fsverity_digest={bad} action=DENY\n",
    "DEFAULT action=ALLOW\nDEFAULT op=EXECUTE action=DENY\nop=EXECUTE fsverity_digest={good} action=ALLOW\n",
    "DEFAULT action=DENY\nop=EXECUTE {hooked} action=ALLOW\nop=EXECUTE dmverity_signature=TRUE action=ALLOW\n",
    "DEFAULT action=ALLOW\nop=EXECUTE dmverity_signature=FALSE fsverity_signature=FALSE action=DENY\n",
    "DEFAULT action=ALLOW\nop=EXECUTE boot_verified=FALSE {signed} action=DENY\n",
)


def test_kernel_ipe_and_ipe_bpf_write_the_same_records(
        ipe: Kernel, kernel_ipe: None, signed_volume: DmVerityVolume) -> None:
    files = [ipe.good, ipe.bad, ipe.plain, ipe.hooked_volume.mount / "prog",
             ipe.seeded_volume.mount / "prog", signed_volume.mount / "prog"]
    kmsg = Kmsg()
    compared = 0
    try:
        for template in PEER_POLICIES:
            body = template.format(bad=ipe.bad_digest, good=ipe.good_digest,
                                   hooked=ipe.hooked_volume.property, signed=signed_volume.property)
            text = _kernel_ipe_activate(body)
            ipe.activate(text)
            with ipe.maps() as maps:
                maps.set_enforce(False)
                maps.set_success_audit(True)
            ipe.drain()
            kmsg.bodies()
            for path in files:
                assert ipe.exec_status(path) == 0, path  # both permissive
            ours = sorted(ipe_fields(r) for r in ipe.drain() if _ours(r.path))
            theirs = sorted(b for b in kmsg.bodies() if '"/mnt/' in b)
            assert ours == theirs, f"policy:\n{text}"
            compared += len(ours)
    finally:
        kmsg.close()
    assert compared >= len(PEER_POLICIES) * len(files)  # at least each exec's BPRM_CHECK


def _ours(path: bytes | None) -> bool:
    return path is not None and path.startswith(b"/mnt/")
