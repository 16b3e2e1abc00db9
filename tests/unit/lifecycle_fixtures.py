"""Test keys, policies and a fake kernel target for the lifecycle tests."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ipe_bpf.policy.compiler import Tables
from ipe_bpf.policy.signing import sign_policy


def policy_text(name: str = "prod", version: str = "1.0.0", extra: str = "") -> bytes:
    return (f"policy_name={name} policy_version={version}\n"
            f"DEFAULT action=ALLOW\n"
            f"DEFAULT op=EXECUTE action=DENY\n"
            f"op=EXECUTE boot_verified=TRUE action=ALLOW\n{extra}").encode()


@dataclass(frozen=True)
class Signer:
    key_pem: bytes
    cert_pem: bytes
    cert: x509.Certificate

    def sign(self, content: bytes) -> bytes:
        return sign_policy(content, self.key_pem, self.cert_pem)

    def write_cert(self, directory: Path, name: str = "signer.pem") -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        path.write_bytes(self.cert_pem)
        return path


def make_signer(common_name: str) -> Signer:
    """A self-signed P-256 signer valid from yesterday for 30 days."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Signer(key_pem, cert.public_bytes(serialization.Encoding.PEM), cert)


@dataclass
class FakeTarget:
    """Records what the lifecycle asks of the kernel; can be told to fail."""

    installs: list[tuple[Tables, int]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    enforce: bool | None = None
    success_audit: bool | None = None
    fail_with: BaseException | None = None

    def install(self, tables: Tables, generation: int) -> None:
        self.calls.append(f"install {generation}")
        if self.fail_with is not None:
            raise self.fail_with
        self.installs.append((tables, generation))

    def set_enforce(self, enforce: bool) -> None:
        self.calls.append(f"enforce {int(enforce)}")
        if self.fail_with is not None:
            raise self.fail_with
        self.enforce = enforce

    def set_success_audit(self, enabled: bool) -> None:
        self.calls.append(f"success_audit {int(enabled)}")
        if self.fail_with is not None:
            raise self.fail_with
        self.success_audit = enabled

    @property
    def generation(self) -> int | None:
        return self.installs[-1][1] if self.installs else None

    @property
    def policy_name(self) -> bytes | None:
        return self.installs[-1][0].name if self.installs else None
