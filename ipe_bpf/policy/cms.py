"""PKCS#7 / CMS SignedData taken apart with pyasn1 and the RFC 5652 module of pyasn1-modules.

cryptography builds PKCS#7 signatures but has no public API to verify one, so the envelope is
decoded here (a maintained ASN.1 library does the DER) and :mod:`ipe_bpf.policy.signing`
checks the pieces with the signer's public key.  Every failure to decode is a
:class:`~ipe_bpf.errors.SignatureError` with ``EBADMSG``, as the kernel's PKCS#7 parser says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import SignatureError

# RFC 5652's object identifiers (pyasn1_modules.rfc5652 spells the same; imported only to
# decode, as it costs a third of a second at start-up)
OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"

# The DER of `OBJECT IDENTIFIER pkcs7-signedData`: what follows the outer SEQUENCE header.
SIGNED_DATA_OID_DER = bytes.fromhex("06092a864886f70d010702")  # the DER of OID_SIGNED_DATA
_SET_OF = 0x31  # the universal tag signed attributes are re-tagged with before verifying


def malformed(message: str) -> SignatureError:
    return SignatureError("EBADMSG", message)


@dataclass(frozen=True)
class Attribute:
    """A signed attribute: its type and its values, each as DER."""

    oid: str
    values: tuple[bytes, ...]


@dataclass(frozen=True)
class SignerInfo:
    """One signer of a SignedData; the certificate is named by issuer+serial or by key id."""

    issuer_der: bytes | None
    serial: int | None
    subject_key_id: bytes | None
    digest_oid: str
    signed_attrs: tuple[Attribute, ...] | None
    signed_attrs_der: bytes | None  # the attributes DER-encoded as SET OF: what was signed
    signature_oid: str
    signature: bytes

    def describe(self) -> str:
        if self.serial is not None:
            return f"serial {self.serial:#x}"
        assert self.subject_key_id is not None
        return f"subject key id {self.subject_key_id.hex()}"

    def message_digest(self) -> bytes:
        """The one messageDigest signed attribute (EBADMSG if absent, repeated or not an OCTET STRING)."""
        values = self.attribute(OID_MESSAGE_DIGEST)
        if values is None or len(values) != 1:
            raise malformed("signed attributes lack a single messageDigest")
        from pyasn1_modules import rfc5652

        return bytes(_decode(values[0], rfc5652.MessageDigest(), "messageDigest attribute"))

    def content_types(self) -> list[str] | None:
        """The contentType signed attribute's values as dotted OIDs, None if it is absent."""
        values = self.attribute(OID_CONTENT_TYPE)
        if values is None:
            return None
        from pyasn1_modules import rfc5652

        return [str(_decode(v, rfc5652.ContentType(), "contentType attribute")) for v in values]

    def attribute(self, oid: str) -> tuple[bytes, ...] | None:
        for attr in self.signed_attrs or ():
            if attr.oid == oid:
                return attr.values
        return None


@dataclass(frozen=True)
class SignedData:
    content_type: str
    content: bytes | None  # None: a detached signature
    certificates: tuple[bytes, ...]  # DER, as embedded in the envelope
    signers: tuple[SignerInfo, ...]


def _decode(der: bytes, spec: Any, what: str) -> Any:
    """One DER value of type `spec` spanning all of `der`; EBADMSG naming `what` otherwise."""
    from pyasn1.codec.der import decoder
    from pyasn1.error import PyAsn1Error, SubstrateUnderrunError

    try:
        value, rest = decoder.decode(der, asn1Spec=spec)
    except SubstrateUnderrunError:
        raise malformed(f"truncated DER in the {what}") from None
    except (PyAsn1Error, ValueError, TypeError) as exc:
        raise malformed(f"malformed {what}: {_first_line(exc)}") from None
    if rest:
        raise malformed(f"{len(rest)} unexpected bytes after the {what}")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _present(value: Any) -> bool:
    return value is not None and value.isValue


def _signer(info: Any) -> SignerInfo:
    from pyasn1.codec.der import encoder

    sid = info["sid"]
    issuer = serial = key_id = None
    if sid.getName() == "issuerAndSerialNumber":
        issuer = encoder.encode(sid["issuerAndSerialNumber"]["issuer"])
        serial = int(sid["issuerAndSerialNumber"]["serialNumber"])
    else:
        key_id = bytes(sid["subjectKeyIdentifier"])
    attrs = attrs_der = None
    if _present(info["signedAttrs"]):
        attrs = tuple(Attribute(str(a["attrType"]), tuple(encoder.encode(v) for v in a["attrValues"]))
                      for a in info["signedAttrs"])
        # The signature covers the attributes encoded as a SET OF, not as [0] IMPLICIT.
        attrs_der = bytes([_SET_OF]) + encoder.encode(info["signedAttrs"])[1:]
    return SignerInfo(issuer, serial, key_id, str(info["digestAlgorithm"]["algorithm"]), attrs, attrs_der,
                      str(info["signatureAlgorithm"]["algorithm"]), bytes(info["signature"]))


def parse_signed_data(blob: bytes) -> SignedData:
    """Take a DER ContentInfo holding SignedData apart; EBADMSG if it is not one."""
    from pyasn1.codec.der import encoder
    from pyasn1.error import PyAsn1Error
    from pyasn1_modules import rfc5652

    if not blob:
        raise malformed("truncated DER: the envelope is empty")
    info = _decode(blob, rfc5652.ContentInfo(), "PKCS#7 envelope")
    if str(info["contentType"]) != OID_SIGNED_DATA:
        raise malformed("not a PKCS#7 SignedData envelope")
    signed = _decode(bytes(info["content"]), rfc5652.SignedData(), "PKCS#7 SignedData")
    try:
        encapsulated = signed["encapContentInfo"]
        content = bytes(encapsulated["eContent"]) if _present(encapsulated["eContent"]) else None
        certificates: tuple[bytes, ...] = ()
        if _present(signed["certificates"]):
            certificates = tuple(encoder.encode(choice["certificate"]) for choice in signed["certificates"]
                                 if choice.getName() == "certificate")
        signers = tuple(_signer(s) for s in signed["signerInfos"])
    except (PyAsn1Error, ValueError, TypeError) as exc:
        raise malformed(f"malformed PKCS#7 SignedData: {_first_line(exc)}") from None
    return SignedData(str(encapsulated["eContentType"]), content, certificates, signers)


def looks_like_signed_data(data: bytes) -> bool:
    """True if ``data`` opens like a DER PKCS#7 SignedData: a SEQUENCE, then (after its length
    octets, at most 5) the signedData OID.  Policy text never does."""
    if len(data) < 2 or data[0] != 0x30:
        return False
    length_octets = 1 + (data[1] & 0x7F if data[1] & 0x80 else 0)
    start = 1 + length_octets
    return data[start : start + len(SIGNED_DATA_OID_DER)] == SIGNED_DATA_OID_DER
