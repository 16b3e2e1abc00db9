"""UEFI boots of the test VM with a certificate of ours in the firmware's `db`.

The guest kernel (CONFIG_LOAD_UEFI_KEYS) copies the X.509 certificates of `db` into its
`.platform` keyring at boot, and trixie's 6.12 trusts that keyring for IPE policy signatures
(CONFIG_IPE_POLICY_SIG_PLATFORM_KEYRING) and dm-verity root hash signatures
(CONFIG_DM_VERITY_VERIFY_ROOTHASH_SIG_PLATFORM_KEYRING).  So a VM booted with
`ipe-bpf vm run --uefi-db CERT` runs the kernel's own IPE with policies signed by CERT's key
(a peer to compare ipe-bpf with) and opens dm-verity volumes whose root hash is signed.

The firmware is Debian's OVMF (package `ovmf`, no Secure Boot); each run gets a copy of its
variable store template with one variable added: `db` = one EFI_SIGNATURE_LIST holding CERT.
The edk2 variable store layout (facts from the UEFI spec and edk2's VariableFormat.h):

    firmware volume header (its HeaderLength at 0x30) | VARIABLE_STORE_HEADER (28 bytes:
    GUID gEfiAuthenticatedVariableGuid, u32 size, u8 format 0x5A, u8 state 0xFE, 6 reserved)
    | variables, each 4-byte aligned: AUTHENTICATED_VARIABLE_HEADER (60 bytes) + name + data
    | 0xFF up to the end of the store.
"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import VmError

OVMF_DIR = Path("/usr/share/OVMF")
OVMF_CODE = OVMF_DIR / "OVMF_CODE_4M.fd"
OVMF_VARS = OVMF_DIR / "OVMF_VARS_4M.fd"
OVMF_PACKAGE = "ovmf"

AUTH_VARIABLE_GUID = uuid.UUID("aaf32c78-947b-439a-a180-2e144ec37792")
IMAGE_SECURITY_DATABASE_GUID = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
OWNER_GUID = uuid.UUID("8a1b6f1e-5c3d-4d0c-9b8e-69706562706f")  # ours: "ipebpf" in the tail

_STORE_HEADER = struct.Struct("<16sIBB6x")
_VAR_HEADER = struct.Struct("<HBBIQ16sIII16s")  # StartId State Rsvd Attr Count Time PubKey NameSz DataSz Guid
_START_ID = 0x55AA
_VAR_ADDED = 0x3F
# NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS | TIME_BASED_AUTHENTICATED_WRITE_ACCESS
_DB_ATTRIBUTES = 0x01 | 0x02 | 0x04 | 0x20


def require_firmware() -> None:
    for path in (OVMF_CODE, OVMF_VARS):
        if not path.is_file():
            raise VmError("ENOENT", f"{path} missing (package {OVMF_PACKAGE}): run `ipe-bpf vm setup` as root")


def load_certificate(path: Path) -> bytes:
    """The DER bytes of the X.509 certificate in ``path`` (PEM or DER)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VmError("ENOENT", f"--uefi-db {path}: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw else x509.load_der_x509_certificate(raw)
    except ValueError:
        raise VmError("EINVAL", f"--uefi-db {path}: not an X.509 certificate (PEM or DER)") from None
    return cert.public_bytes(Encoding.DER)


def signature_list(cert_der: bytes) -> bytes:
    """An EFI_SIGNATURE_LIST of one X.509 certificate (owner: ipe-bpf)."""
    entry = OWNER_GUID.bytes_le + cert_der
    header = struct.pack("<16sIII", CERT_X509_GUID.bytes_le, 28 + len(entry), 0, len(entry))
    return header + entry


def _store_bounds(data: bytes) -> tuple[int, int]:
    """(first byte after the store header, end of the store) of an edk2 variable store."""
    if len(data) < 0x40 or data[0x28:0x2C] != b"_FVH":
        raise VmError("EINVAL", "not an edk2 firmware volume (no _FVH signature)")
    start = struct.unpack_from("<H", data, 0x30)[0]
    guid, size, fmt, state = _STORE_HEADER.unpack_from(data, start)
    if uuid.UUID(bytes_le=guid) != AUTH_VARIABLE_GUID or fmt != 0x5A or state != 0xFE:
        raise VmError("EINVAL", "not an authenticated-variable store (OVMF without Secure Boot support?)")
    return start + _STORE_HEADER.size, start + size


Variable = tuple[str, uuid.UUID, int, bytes]  # name, vendor GUID, state, data


def _scan(data: bytes) -> tuple[list[Variable], int, int]:
    """The store's variables in order, the offset after the last one, and the store's end."""
    at, end = _store_bounds(data)
    found: list[Variable] = []
    while at + _VAR_HEADER.size <= end:
        start_id, state, _, _, _, _, _, name_size, data_size, guid = _VAR_HEADER.unpack_from(data, at)
        if start_id != _START_ID:
            break
        name_at = at + _VAR_HEADER.size
        name = data[name_at:name_at + name_size].decode("utf-16-le").rstrip("\0")
        value = data[name_at + name_size:name_at + name_size + data_size]
        found.append((name, uuid.UUID(bytes_le=guid), state, value))
        at = (name_at + name_size + data_size + 3) & ~3
    return found, at, end


def variables(data: bytes) -> list[Variable]:
    """(name, vendor GUID, state, data) of every variable in the store, in order."""
    return _scan(data)[0]


def with_db_certificate(store: bytes, cert_der: bytes) -> bytes:
    """``store`` with a `db` variable holding ``cert_der`` added (the store must have no `db`)."""
    found, at, end = _scan(store)
    if any(name == "db" and state == _VAR_ADDED for name, _, state, _ in found):
        raise VmError("EEXIST", "the firmware variable store already has a db variable")
    name = "db\0".encode("utf-16-le")
    value = signature_list(cert_der)
    header = _VAR_HEADER.pack(_START_ID, _VAR_ADDED, 0, _DB_ATTRIBUTES, 0, bytes(16), 0,
                              len(name), len(value), IMAGE_SECURITY_DATABASE_GUID.bytes_le)
    record = header + name + value
    if at + len(record) > end or store[at:at + len(record)] != b"\xff" * len(record):
        raise VmError("ENOSPC", "no room for db in the firmware variable store")
    return store[:at] + record + store[at + len(record):]


def prepare_vars(cert: Path, out: Path) -> Path:
    """Write a per-run copy of OVMF's variable store with ``cert`` in `db`; returns ``out``."""
    require_firmware()
    der = load_certificate(cert)
    out.write_bytes(with_db_certificate(OVMF_VARS.read_bytes(), der))
    return out
