"""PKCS#7 signing and verification of IPE policies.

Kernel IPE takes a policy as an *attached* PKCS#7 SignedData in DER, the shape of
``openssl smime -sign -binary -nodetach -noattr -nosmimecap -outform der``.  `sign_policy`
makes exactly that with cryptography (for RSA keys the bytes equal openssl's);
`verify_policy` checks one in-process, with the envelope read by :mod:`ipe_bpf.policy.cms`
and the signature checked with the signer's public key.

Verification, in the kernel's order and with its errno names:

1. the envelope parses as SignedData with the policy inside (``EBADMSG``; a detached
   signature is ``EBADMSG`` too: there is no policy to load);
2. every signer's certificate is found (embedded in the envelope, or among the trusted
   certificates, as the kernel finds keys in its keyring) and every signature verifies over
   the content, or over the signed attributes whose messageDigest matches the content
   (``ENOKEY`` if a signer's certificate is nowhere, ``EKEYREJECTED`` if a signature fails);
3. at least one signer is trusted: its certificate *is* one of the trusted certificates, or
   was issued and signed *directly* by one of them (no longer chains; a trusted certificate
   whose BasicConstraints say it is not a CA issues nothing) (``ENOKEY``);
4. that signer's certificate, and the trusted issuer's, are valid at ``now``
   (``EKEYREJECTED``).  Kernel IPE does not check validity periods; ipe-bpf does.

Digests: SHA-256/384/512.  Signatures: RSA PKCS#1 v1.5 and ECDSA.  Unsupported
algorithms are ``ENOPKG``, like the kernel.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ..errors import SignatureError
from . import cms

DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_DIGEST_OIDS = {
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
}
# Signature algorithm OID -> (key family, digest it implies or None for "the signer's digest").
_SIGNATURE_OIDS: dict[str, tuple[str, str | None]] = {
    "1.2.840.113549.1.1.1": ("rsa", None),  # rsaEncryption (what openssl writes)
    "1.2.840.113549.1.1.11": ("rsa", "sha256"),
    "1.2.840.113549.1.1.12": ("rsa", "sha384"),
    "1.2.840.113549.1.1.13": ("rsa", "sha512"),
    "1.2.840.10045.2.1": ("ecdsa", None),  # id-ecPublicKey
    "1.2.840.10045.4.3.2": ("ecdsa", "sha256"),
    "1.2.840.10045.4.3.3": ("ecdsa", "sha384"),
    "1.2.840.10045.4.3.4": ("ecdsa", "sha512"),
}
# What cryptography raises, lazily, for the parts of a certificate it could not decode.  Its
# decoder also lets the odd KeyError through for garbled names, found by fuzzing.
_MALFORMED_CERTIFICATE = (ValueError, KeyError, x509.InvalidVersion, x509.DuplicateExtension,
                          x509.UnsupportedGeneralNameType)
SIGNING_CURVES = ("secp256r1", "secp384r1")  # what kernel IPE's keyrings verify
TRUST_SUFFIXES = (".pem", ".crt", ".der")


@dataclass(frozen=True)
class VerifiedPolicy:
    """A policy whose signature verified, with the certificate that signed it."""

    content: bytes
    signer: x509.Certificate
    digest: str
    content_hashes: Mapping[str, bytes] = field(default_factory=dict, repr=False)  # digest name -> hash of content

    @property
    def signer_subject(self) -> str:
        return self.signer.subject.rfc4514_string()


# --------------------------------------------------------------------------- signing


SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def load_private_key(key_pem: bytes) -> SigningKey:
    """An unencrypted RSA or EC (P-256/P-384) private key, PEM or DER; EINVAL otherwise."""
    loader = serialization.load_pem_private_key if b"-----BEGIN" in key_pem else (
        serialization.load_der_private_key)
    try:
        key = loader(key_pem, password=None)
    except TypeError:  # encrypted key, no password
        raise SignatureError("EINVAL", "the private key is encrypted; ipe-bpf needs it unencrypted "
                                       "(openssl pkey -in KEY -out PLAIN.pem)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError("EINVAL", "not a private key (PEM or DER)") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in SIGNING_CURVES:
        raise SignatureError("EINVAL", f"EC curve {key.curve.name} is not supported "
                                       f"(use P-256 or P-384)")
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise SignatureError("EINVAL", f"{type(key).__name__} keys cannot sign IPE policies "
                                       f"(use RSA or ECDSA)")
    return key


def load_certificate(data: bytes, what: str = "certificate") -> x509.Certificate:
    """One certificate, PEM or DER; EINVAL if it is neither."""
    certs = _parse_certificates(data)
    if len(certs) != 1:
        raise SignatureError("EINVAL", f"expected one {what}, found {len(certs)}")
    return certs[0]


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_policy(content: bytes, key_pem: bytes, cert_pem: bytes, *,
                digest: str = "sha256", detached: bool = False) -> bytes:
    """Sign ``content`` as kernel IPE wants it: attached PKCS#7, DER, no signed attributes.

    ``detached``: the content left out and no certificates, the form dm-verity takes for a
    root hash signature (``openssl smime -sign -nocerts -noattr -binary -outform der``).
    ``key_pem`` must be an unencrypted RSA or EC (P-256/P-384) private key that belongs to
    ``cert_pem``.  Raises SignatureError(EINVAL) for unusable keys or certificates.
    """
    key = load_private_key(key_pem)
    cert = load_certificate(cert_pem, "signing certificate")
    return sign_with(content, key, cert, digest=digest, detached=detached)


def check_digest(digest: str) -> None:
    if digest not in DIGESTS:
        raise SignatureError("EINVAL", f"unsupported digest {digest!r} "
                                       f"(choose from {', '.join(DIGESTS)})")


def sign_with(content: bytes, key: SigningKey, cert: x509.Certificate, *, digest: str = "sha256",
              detached: bool = False) -> bytes:
    """`sign_policy` with a loaded key and certificate (EINVAL if the key is not the cert's)."""
    check_digest(digest)
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise SignatureError("EINVAL", "the private key does not belong to the certificate")
    # imported here: 35 ms of a signed deploy's start in the VM, which verifies but never signs
    from cryptography.hazmat.primitives.serialization import pkcs7 as crypto_pkcs7

    options = [crypto_pkcs7.PKCS7Options.Binary, crypto_pkcs7.PKCS7Options.NoAttributes]
    if detached:
        options += [crypto_pkcs7.PKCS7Options.DetachedSignature, crypto_pkcs7.PKCS7Options.NoCerts]
    builder = (crypto_pkcs7.PKCS7SignatureBuilder().set_data(content)
               .add_signer(cert, key, DIGESTS[digest]()))
    return builder.sign(serialization.Encoding.DER, options)


# ---------------------------------------------------------------------- verification


def looks_like_pkcs7(data: bytes) -> bool:
    """True if ``data`` is (or starts like) a DER PKCS#7 SignedData rather than policy text."""
    return cms.looks_like_signed_data(data)


def policy_text(data: bytes) -> bytes:
    """The policy text of a file: the payload of an attached PKCS#7 (unchecked), else the bytes."""
    return extract_content(data) if looks_like_pkcs7(data) else data


def extract_content(blob: bytes) -> bytes:
    """The policy inside an attached PKCS#7, without checking the signature."""
    return _content_of(cms.parse_signed_data(blob))


def _content_of(signed: cms.SignedData) -> bytes:
    if signed.content is None:
        raise SignatureError("EBADMSG", "detached signature: the envelope does not contain the "
                                        "policy (sign with -nodetach)")
    if signed.content_type != cms.OID_DATA:
        raise SignatureError("EBADMSG", f"envelope content type {signed.content_type} is not "
                                        f"pkcs7-data")
    return signed.content


def _decoded(cert: x509.Certificate) -> x509.Certificate:
    """``cert`` after forcing cryptography to decode every part verification uses."""
    cert.public_key()
    _ = cert.extensions, cert.subject, cert.issuer, cert.version, _validity(cert)
    return cert


def _certificate_from_der(der: bytes) -> x509.Certificate:
    """A certificate from the envelope: EBADMSG if malformed, ENOPKG if its key is unknown."""
    try:
        with warnings.catch_warnings():  # e.g. a negative serial: we judge the cert ourselves
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return _decoded(x509.load_der_x509_certificate(der))
    except _MALFORMED_CERTIFICATE as exc:
        raise SignatureError("EBADMSG", f"malformed certificate in the envelope: {exc}") from None
    except UnsupportedAlgorithm as exc:
        raise SignatureError("ENOPKG", f"certificate in the envelope: {exc}") from None


def _embedded_certificates(signed: cms.SignedData) -> list[x509.Certificate]:
    return [_certificate_from_der(der) for der in signed.certificates]


def _subject_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _names_signer(cert: x509.Certificate, signer: cms.SignerInfo) -> bool:
    if signer.subject_key_id is not None:
        return _subject_key_id(cert) == signer.subject_key_id
    return cert.serial_number == signer.serial and cert.issuer.public_bytes() == signer.issuer_der


def _find_signer_certificate(signer: cms.SignerInfo,
                             candidates: Sequence[x509.Certificate]) -> x509.Certificate:
    for cert in candidates:
        if _names_signer(cert, signer):
            return cert
    raise SignatureError("ENOKEY", f"the certificate of signer ({signer.describe()}) is neither "
                                   f"in the envelope nor trusted")


def _signature_algorithms(signer: cms.SignerInfo) -> tuple[str, str]:
    """(digest name, key family) of a signer, ENOPKG if ipe-bpf cannot verify them."""
    digest = _DIGEST_OIDS.get(signer.digest_oid)
    if digest is None:
        raise SignatureError("ENOPKG", f"unsupported digest algorithm {signer.digest_oid} "
                                       f"(sha256, sha384, sha512 are)")
    family_and_digest = _SIGNATURE_OIDS.get(signer.signature_oid)
    if family_and_digest is None:
        raise SignatureError("ENOPKG", f"unsupported signature algorithm {signer.signature_oid} "
                                       f"(RSA PKCS#1 v1.5 and ECDSA are)")
    family, implied = family_and_digest
    if implied is not None and implied != digest:
        raise SignatureError("EBADMSG", f"signature algorithm uses {implied} but the signer's "
                                        f"digest algorithm is {digest}")
    return digest, family


class _Hashes(dict[str, bytes]):
    """The content's hash by digest name, each computed once for all signers."""

    def __init__(self, content: bytes) -> None:
        super().__init__()
        self.content = content

    def __missing__(self, digest: str) -> bytes:
        self[digest] = value = hashlib.new(digest, self.content).digest()
        return value


def _signed_bytes(signer: cms.SignerInfo, hashes_: _Hashes, digest: str) -> tuple[bytes, bool]:
    """What the signature covers, and whether that is already hashed: the content's hash, or the
    signed attributes (after checking them)."""
    if signer.signed_attrs is None:
        return hashes_[digest], True
    assert signer.signed_attrs_der is not None
    if signer.message_digest() != hashes_[digest]:
        raise SignatureError("EKEYREJECTED", "content digest does not match the signed "
                                             "messageDigest: the policy was modified")
    types = signer.content_types()
    if types is not None and types != [cms.OID_DATA]:
        raise SignatureError("EBADMSG", "signed contentType attribute is not pkcs7-data")
    return signer.signed_attrs_der, False


def _check_signature(signer: cms.SignerInfo, cert: x509.Certificate, hashes_: _Hashes) -> str:
    """Verify one signer's signature with its certificate's key; return the digest name."""
    digest, family = _signature_algorithms(signer)
    data, prehashed = _signed_bytes(signer, hashes_, digest)
    key = cert.public_key()
    algorithm: hashes.HashAlgorithm | Prehashed = DIGESTS[digest]()
    if prehashed:
        algorithm = Prehashed(algorithm)
    try:
        if family == "rsa" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signer.signature, data, padding.PKCS1v15(), algorithm)
        elif family == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signer.signature, data, ec.ECDSA(algorithm))
        else:
            raise SignatureError("EKEYREJECTED", f"{family} signature but the signer's key is "
                                                 f"{type(key).__name__}")
    except InvalidSignature:
        raise SignatureError("EKEYREJECTED", f"signature of {_subject(cert)} does not verify: "
                                             f"the policy or the signature was modified") from None
    return digest


def _subject(cert: x509.Certificate) -> str:
    return repr(cert.subject.rfc4514_string())


def _may_issue(issuer: x509.Certificate) -> bool:
    try:
        return bool(issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return True


def _trust_anchor(cert: x509.Certificate,
                  trusted: Sequence[x509.Certificate]) -> x509.Certificate | None:
    """The trusted certificate that is ``cert`` or directly issued it, if any."""
    for anchor in trusted:
        if anchor == cert:
            return anchor
    for anchor in trusted:
        if anchor.subject != cert.issuer or not _may_issue(anchor):
            continue
        try:
            cert.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return anchor
    return None


def _validity(cert: x509.Certificate) -> tuple[dt.datetime, dt.datetime]:
    """(not before, not after) as aware UTC datetimes, on old and new cryptography alike."""
    if hasattr(cert, "not_valid_before_utc"):  # cryptography >= 42
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    utc = dt.timezone.utc
    return cert.not_valid_before.replace(tzinfo=utc), cert.not_valid_after.replace(tzinfo=utc)


def _check_validity(cert: x509.Certificate, now: dt.datetime) -> None:
    not_before, not_after = _validity(cert)
    if now < not_before:
        raise SignatureError("EKEYREJECTED", f"certificate {_subject(cert)} is not valid before "
                                             f"{not_before:%Y-%m-%d %H:%M:%SZ}")
    if now > not_after:
        raise SignatureError("EKEYREJECTED", f"certificate {_subject(cert)} expired on "
                                             f"{not_after:%Y-%m-%d %H:%M:%SZ}")


def _check_trust(cert: x509.Certificate, trusted: Sequence[x509.Certificate],
                 now: dt.datetime) -> None:
    anchor = _trust_anchor(cert, trusted)
    if anchor is None:
        raise SignatureError("ENOKEY", f"signer {_subject(cert)} is not trusted: it is not one of "
                                       f"the {len(trusted)} trusted certificate(s) nor directly "
                                       f"issued by one")
    _check_validity(cert, now)
    if anchor != cert:
        _check_validity(anchor, now)


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.timezone.utc)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.timezone.utc)


def verify_policy(blob: bytes, trusted: Sequence[x509.Certificate], *,
                  now: dt.datetime | None = None) -> VerifiedPolicy:
    """Verify a signed policy against ``trusted`` certificates; return the policy and signer.

    Raises SignatureError: EBADMSG (malformed, detached), ENOKEY (no trusted signer),
    EKEYREJECTED (bad signature, modified content, certificate outside its validity),
    ENOPKG (unsupported algorithm).
    """
    if blob[:1] != b"\x30":  # not even a DER SEQUENCE: text, most likely
        raise SignatureError("EBADMSG", "not signed: this is no PKCS#7 envelope (policy text? sign it "
                                        "with `ipe-bpf policy sign`)")
    signed = cms.parse_signed_data(blob)
    content = _content_of(signed)
    if not signed.signers:
        raise SignatureError("EBADMSG", "the envelope has no signer")
    candidates = [*_embedded_certificates(signed), *trusted]
    verified, hashes_ = [], _Hashes(content)
    for signer in signed.signers:  # like the kernel: every signature must verify
        cert = _find_signer_certificate(signer, candidates)
        verified.append((cert, _check_signature(signer, cert, hashes_)))
    moment = _utc(now)
    failure: SignatureError | None = None
    for cert, digest in verified:  # ... and at least one signer must be trusted
        try:
            _check_trust(cert, trusted, moment)
        except SignatureError as exc:
            failure = failure or exc
            continue
        return VerifiedPolicy(content, cert, digest, dict(hashes_))
    assert failure is not None
    raise failure


# ------------------------------------------------------------------------------ trust


def _parse_certificates(data: bytes) -> list[x509.Certificate]:
    try:
        if b"-----BEGIN" in data:
            return [_decoded(c) for c in x509.load_pem_x509_certificates(data)]
        return [_decoded(x509.load_der_x509_certificate(data))]
    except (*_MALFORMED_CERTIFICATE, UnsupportedAlgorithm):
        raise SignatureError("EINVAL", "not a PEM or DER certificate") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "EIO")
        raise SignatureError(name, f"cannot read {path}: {exc.strerror}") from None


def _trust_files(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir()
                      if p.suffix.lower() in TRUST_SUFFIXES and p.is_file())
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "EIO")
        raise SignatureError(name, f"cannot list {path}: {exc.strerror}") from None


def load_trust(path: Path) -> list[x509.Certificate]:
    """Trusted certificates from a PEM/DER file, a PEM bundle, or a directory of them.

    A directory contributes its *.pem, *.crt and *.der files.  No certificate at all is an
    error (ENOKEY); so is an unreadable path (its errno) or a file that is not a certificate
    (EINVAL, naming the file).
    """
    path = Path(path)
    files = _trust_files(path) if path.is_dir() else [path]
    certs: list[x509.Certificate] = []
    for file in files:
        try:
            certs.extend(_parse_certificates(_read(file)))
        except SignatureError as exc:
            raise exc.located(str(file)) from None
    if not certs:
        raise SignatureError("ENOKEY", f"no trusted certificate in {path}")
    return certs
