"""The per-run OVMF variable store with our certificate in db."""

from __future__ import annotations

import datetime as dt
import struct
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from ipe_bpf.errors import VmError
from ipe_bpf.vm import uefi

STORE_SIZE = 0x40000 - 0x48


def empty_store() -> bytes:
    """An edk2 firmware volume with an empty authenticated variable store (as OVMF ships it)."""
    fv = bytearray(b"\xff" * 0x42000)
    fv[0:0x48] = bytes(0x48)
    fv[0x28:0x2C] = b"_FVH"
    struct.pack_into("<H", fv, 0x30, 0x48)
    struct.pack_into("<16sIBB6x", fv, 0x48, uefi.AUTH_VARIABLE_GUID.bytes_le, STORE_SIZE, 0x5A, 0xFE)
    return bytes(fv)


def cert_der(name: str = "uefi test") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.DER)


def test_db_holds_one_x509_signature_list() -> None:
    der = cert_der()
    out = uefi.with_db_certificate(empty_store(), der)
    [(name, guid, state, value)] = uefi.variables(out)
    assert (name, guid, state) == ("db", uefi.IMAGE_SECURITY_DATABASE_GUID, 0x3F)
    sig_type, list_size, header_size, sig_size = struct.unpack_from("<16sIII", value)
    assert uuid.UUID(bytes_le=sig_type) == uefi.CERT_X509_GUID
    assert (list_size, header_size, sig_size) == (len(value), 0, 16 + len(der))
    assert value[28 + 16:] == der
    assert len(out) == len(empty_store()) and out[:0x64] == empty_store()[:0x64]


def test_variables_after_existing_ones_are_aligned() -> None:
    once = uefi.with_db_certificate(empty_store(), cert_der("a"))
    # pretend db was deleted (state other than ADDED): a second one may be added after it
    db_at = 0x64
    twice_input = once[:db_at + 2] + bytes([0x3C]) + once[db_at + 3:]
    twice = uefi.with_db_certificate(twice_input, cert_der("b"))
    names = [(n, s) for n, _, s, _ in uefi.variables(twice)]
    assert names == [("db", 0x3C), ("db", 0x3F)]
    second = uefi.variables(twice)[1]
    assert uefi.variables(twice)[0][3] != second[3]


def test_a_second_db_is_refused() -> None:
    once = uefi.with_db_certificate(empty_store(), cert_der())
    with pytest.raises(VmError) as exc:
        uefi.with_db_certificate(once, cert_der())
    assert exc.value.errno_name == "EEXIST"


def test_not_a_variable_store() -> None:
    with pytest.raises(VmError) as exc:
        uefi.with_db_certificate(b"\0" * 4096, cert_der())
    assert exc.value.errno_name == "EINVAL"


def test_bad_certificate_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(VmError) as exc:
        uefi.load_certificate(bad)
    assert exc.value.errno_name == "EINVAL" and "bad.pem" in exc.value.message
    with pytest.raises(VmError) as missing:
        uefi.load_certificate(tmp_path / "none.pem")
    assert missing.value.errno_name == "ENOENT"


@pytest.mark.skipif(not uefi.OVMF_VARS.is_file(), reason="needs the ovmf package (vm setup installs it)")
def test_the_real_ovmf_template_takes_the_certificate(tmp_path: Path) -> None:
    der = cert_der()
    out = uefi.with_db_certificate(uefi.OVMF_VARS.read_bytes(), der)
    assert [v[0] for v in uefi.variables(out)][-1] == "db"
