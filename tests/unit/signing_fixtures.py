"""Keys, certificates and openssl helpers shared by the signing tests.

Everything is made once per session with cryptography: a root CA (RSA), signers of each
supported kind, an untrusted signer, an expired one and an intermediate CA (ipe-bpf trusts
direct issuance only).  Import the `pki` fixture into a test module to use it.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

POLICY = b"policy_name=signed_test policy_version=1.2.3\n# comment\r\nDEFAULT action=ALLOW\nop=EXECUTE boot_verified=TRUE action=ALLOW\n"
NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Identity:
    """A key, its certificate and both written to disk (for openssl and the CLI)."""

    name: str
    key: PrivateKey
    cert: x509.Certificate
    key_path: Path
    cert_path: Path

    @property
    def key_pem(self) -> bytes:
        return self.key_path.read_bytes()

    @property
    def cert_pem(self) -> bytes:
        return self.cert_path.read_bytes()


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Identity  # self-signed root, RSA
    rsa: Identity  # self-signed RSA signer, trusted directly
    p256: Identity  # P-256 signer issued by `ca`
    p384: Identity  # self-signed P-384 signer, trusted directly
    untrusted: Identity  # self-signed P-256 nobody trusts
    expired: Identity  # P-256 signer issued by `ca`, validity in the past
    intermediate: Identity  # CA issued by `ca`
    grandchild: Identity  # P-256 signer issued by `intermediate`: a chain of two, not trusted

    def signers(self) -> dict[str, Identity]:
        return {"rsa": self.rsa, "p256": self.p256, "p384": self.p384}

    def trust_for(self, ident: Identity) -> Path:
        """The certificate that anchors ``ident``: itself, or the CA that issued it."""
        return self.ca.cert_path if ident.cert.issuer == self.ca.cert.subject and ident is not self.ca else ident.cert_path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ipe-bpf tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificate(key: PrivateKey, name: str, *, issuer: Identity | None = None,
                     is_ca: bool = False, not_before: dt.datetime = NOW - DAY,
                     not_after: dt.datetime = NOW + 30 * DAY) -> x509.Certificate:
    """A certificate for ``key``, self-signed unless ``issuer`` is given."""
    issuer_name = issuer.cert.subject if issuer else _name(name)
    signing_key = issuer.key if issuer else key
    builder = (x509.CertificateBuilder()
               .subject_name(_name(name)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    return builder.sign(signing_key, hashes.SHA256())


def write_identity(directory: Path, name: str, key: PrivateKey, cert: x509.Certificate) -> Identity:
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(name, key, cert, key_path, cert_path)


def make_identity(directory: Path, name: str, key: PrivateKey, **kwargs: object) -> Identity:
    return write_identity(directory, name, key, make_certificate(key, name, **kwargs))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_identity(d, "ca", rsa.generate_private_key(65537, 2048), is_ca=True,
                       not_before=NOW - 365 * DAY, not_after=NOW + 365 * DAY)
    intermediate = make_identity(d, "intermediate", ec.generate_private_key(ec.SECP256R1()),
                                 issuer=ca, is_ca=True)
    return Pki(
        dir=d,
        ca=ca,
        rsa=make_identity(d, "rsa", rsa.generate_private_key(65537, 2048)),
        p256=make_identity(d, "p256", ec.generate_private_key(ec.SECP256R1()), issuer=ca),
        p384=make_identity(d, "p384", ec.generate_private_key(ec.SECP384R1())),
        untrusted=make_identity(d, "untrusted", ec.generate_private_key(ec.SECP256R1())),
        expired=make_identity(d, "expired", ec.generate_private_key(ec.SECP256R1()), issuer=ca,
                              not_before=NOW - 60 * DAY, not_after=NOW - 30 * DAY),
        intermediate=intermediate,
        grandchild=make_identity(d, "grandchild", ec.generate_private_key(ec.SECP256R1()),
                                 issuer=intermediate),
    )


def openssl(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the real openssl (a missing binary fails the test: the cross-check is the point)."""
    exe = shutil.which("openssl")
    assert exe is not None, "the openssl command is needed for the cross-checks"
    return subprocess.run([exe, *map(str, args)], input=stdin, capture_output=True, check=False)


def openssl_sign(ident: Identity, content_path: Path, *extra: str, tool: str = "smime",
                 detached: bool = False) -> bytes:
    """Sign with openssl the way kernel IPE documents (plus ``extra`` flags); DER bytes."""
    fd, name = tempfile.mkstemp(suffix=".p7s", dir=content_path.parent)
    os.close(fd)
    out = Path(name)
    flags = ["-binary", "-outform", "der", *(() if detached else ("-nodetach",))]
    proc = openssl(tool, "-sign", *flags, *extra, "-in", content_path, "-inkey", ident.key_path,
                   "-signer", ident.cert_path, "-out", out)
    assert proc.returncode == 0, proc.stderr.decode()
    return out.read_bytes()


def openssl_verify(blob: bytes, ca_file: Path, directory: Path) -> subprocess.CompletedProcess[bytes]:
    """openssl smime -verify of a DER envelope; stdout is the content it returns."""
    path = directory / "to-verify.p7s"
    path.write_bytes(blob)
    return openssl("smime", "-verify", "-binary", "-inform", "der", "-in", path,
                   "-CAfile", ca_file, "-purpose", "any")


@pytest.fixture()
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.pol"
    path.write_bytes(POLICY)
    return path
