"""A small DER reader for PKCS#7 / CMS SignedData, just what policy signatures need.

cryptography can *build* a PKCS#7 signature but offers no public API to *verify* one, so
this module takes the envelope apart (RFC 2315 section 9, RFC 5652 section 5) and hands the
pieces to :mod:`ipe_bpf.policy.signing`, which checks them with the signer's public key.

Only definite-length DER is read (what ``openssl smime -sign`` and cryptography write, and
what kernel IPE is fed in practice); anything else is reported as malformed.  Every failure
raises :class:`~ipe_bpf.errors.SignatureError` with ``EBADMSG``, as the kernel's PKCS#7
parser does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipe_bpf.errors import SignatureError

# Universal tags (single identifier octet, class and constructed bits included).
INTEGER = 0x02
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
SEQUENCE = 0x30
SET = 0x31
# Context-specific tags used by SignedData.
CONTEXT_0 = 0xA0  # constructed [0]
CONTEXT_1 = 0xA1  # constructed [1]
CONTEXT_0_PRIMITIVE = 0x80  # primitive [0] (CMS SubjectKeyIdentifier signer id)

OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"

# The DER of `SEQUENCE { OID pkcs7-signedData ...` after the outer header.
SIGNED_DATA_OID_DER = bytes.fromhex("06092a864886f70d010702")

_MAX_LENGTH_OCTETS = 4  # 4 GiB is far beyond anything a policy could be


def malformed(message: str) -> SignatureError:
    return SignatureError("EBADMSG", message)


@dataclass(frozen=True)
class Tlv:
    """One DER element: its identifier octet, its value octets and its whole encoding."""

    tag: int
    value: bytes
    encoding: bytes

    @property
    def constructed(self) -> bool:
        return bool(self.tag & 0x20)


def _read_length(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a DER length at ``pos``; return (length, position after it)."""
    if pos >= len(data):
        raise malformed("truncated DER: length octet missing")
    first = data[pos]
    pos += 1
    if first < 0x80:
        return first, pos
    count = first & 0x7F
    if count == 0:
        raise malformed("indefinite-length (BER) encoding is not supported; re-encode as DER")
    if count > _MAX_LENGTH_OCTETS:
        raise malformed(f"DER length uses {count} octets")
    if pos + count > len(data):
        raise malformed("truncated DER: length octets cut short")
    return int.from_bytes(data[pos : pos + count], "big"), pos + count


def read_tlv(data: bytes, pos: int = 0) -> tuple[Tlv, int]:
    """Read the element starting at ``pos``; return it and the position after it."""
    if pos >= len(data):
        raise malformed("truncated DER: element missing")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise malformed(f"unexpected high-tag-number DER element at offset {pos}")
    length, start = _read_length(data, pos + 1)
    end = start + length
    if end > len(data):
        raise malformed(f"truncated DER: element at offset {pos} needs {length} bytes, "
                        f"{len(data) - start} left")
    return Tlv(tag, data[start:end], data[pos:end]), end


def read_single(data: bytes, what: str) -> Tlv:
    """Read exactly one element that spans all of ``data``."""
    tlv, end = read_tlv(data)
    if end != len(data):
        raise malformed(f"{len(data) - end} unexpected bytes after the {what}")
    return tlv


def children(tlv: Tlv) -> list[Tlv]:
    """The elements inside a constructed element."""
    if not tlv.constructed:
        raise malformed(f"expected a constructed element, found tag 0x{tlv.tag:02x}")
    items: list[Tlv] = []
    pos = 0
    while pos < len(tlv.value):
        item, pos = read_tlv(tlv.value, pos)
        items.append(item)
    return items


def expect(tlv: Tlv, tag: int, what: str) -> Tlv:
    if tlv.tag != tag:
        raise malformed(f"{what}: expected tag 0x{tag:02x}, found 0x{tlv.tag:02x}")
    return tlv


def decode_oid(tlv: Tlv) -> str:
    """Dotted-decimal text of an OBJECT IDENTIFIER."""
    expect(tlv, OID, "object identifier")
    raw = tlv.value
    if not raw or raw[-1] & 0x80:
        raise malformed("malformed object identifier")
    arcs: list[int] = []
    value = 0
    for octet in raw:
        value = (value << 7) | (octet & 0x7F)
        if not octet & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in (first, arcs[0] - 40 * first, *arcs[1:]))


def decode_int(tlv: Tlv) -> int:
    expect(tlv, INTEGER, "integer")
    if not tlv.value:
        raise malformed("empty INTEGER")
    return int.from_bytes(tlv.value, "big", signed=True)


def _algorithm_oid(tlv: Tlv, what: str) -> str:
    """The OID of an AlgorithmIdentifier (parameters are ignored)."""
    parts = children(expect(tlv, SEQUENCE, what))
    if not parts:
        raise malformed(f"{what}: empty AlgorithmIdentifier")
    return decode_oid(parts[0])


@dataclass(frozen=True)
class Attribute:
    oid: str
    values: tuple[Tlv, ...]


@dataclass(frozen=True)
class SignerInfo:
    """One signer of a SignedData; the certificate is named by issuer+serial or by key id."""

    issuer_der: bytes | None
    serial: int | None
    subject_key_id: bytes | None
    digest_oid: str
    signed_attrs: tuple[Attribute, ...] | None
    signed_attrs_der: bytes | None  # the attributes re-tagged as SET OF: what was signed
    signature_oid: str
    signature: bytes

    def describe(self) -> str:
        if self.serial is not None:
            return f"serial {self.serial:#x}"
        assert self.subject_key_id is not None
        return f"subject key id {self.subject_key_id.hex()}"


@dataclass(frozen=True)
class SignedData:
    content_type: str
    content: bytes | None  # None: a detached signature
    certificates: tuple[bytes, ...]  # DER, as embedded in the envelope
    signers: tuple[SignerInfo, ...]


def _parse_attributes(tlv: Tlv) -> tuple[Attribute, ...]:
    attributes = []
    for item in children(tlv):
        parts = children(expect(item, SEQUENCE, "attribute"))
        if len(parts) != 2:
            raise malformed("attribute is not (type, values)")
        values = children(expect(parts[1], SET, "attribute values"))
        attributes.append(Attribute(decode_oid(parts[0]), tuple(values)))
    return tuple(attributes)


def _parse_signer_id(tlv: Tlv) -> tuple[bytes | None, int | None, bytes | None]:
    """(issuer DER, serial, subject key id) of IssuerAndSerialNumber or [0] SubjectKeyIdentifier."""
    if tlv.tag == CONTEXT_0_PRIMITIVE:
        return None, None, tlv.value
    parts = children(expect(tlv, SEQUENCE, "signer identifier"))
    if len(parts) != 2:
        raise malformed("signer identifier is not (issuer, serial number)")
    expect(parts[0], SEQUENCE, "signer issuer name")
    return parts[0].encoding, decode_int(parts[1]), None


def _parse_signer_info(tlv: Tlv) -> SignerInfo:
    parts = children(expect(tlv, SEQUENCE, "SignerInfo"))
    if len(parts) < 5:
        raise malformed("SignerInfo has too few fields")
    decode_int(parts[0])  # version: 1 (issuer+serial) or 3 (key id); not needed beyond that
    issuer, serial, key_id = _parse_signer_id(parts[1])
    digest_oid = _algorithm_oid(parts[2], "SignerInfo digest algorithm")
    rest = parts[3:]
    signed_attrs = signed_attrs_der = None
    if rest and rest[0].tag == CONTEXT_0:
        signed_attrs = _parse_attributes(rest[0])
        # The signature covers the attributes DER-encoded as a SET OF, not as [0] IMPLICIT.
        signed_attrs_der = bytes([SET]) + rest[0].encoding[1:]
        rest = rest[1:]
    if len(rest) < 2:
        raise malformed("SignerInfo lacks its signature algorithm or signature")
    signature_oid = _algorithm_oid(rest[0], "SignerInfo signature algorithm")
    signature = expect(rest[1], OCTET_STRING, "SignerInfo signature").value
    if len(rest) > 2 and rest[2].tag != CONTEXT_1:
        raise malformed("unexpected field after the SignerInfo signature")
    return SignerInfo(issuer, serial, key_id, digest_oid, signed_attrs, signed_attrs_der,
                      signature_oid, signature)


def _parse_encapsulated(tlv: Tlv) -> tuple[str, bytes | None]:
    """(content type, content or None) of the inner ContentInfo."""
    parts = children(expect(tlv, SEQUENCE, "encapsulated content"))
    if not parts:
        raise malformed("encapsulated content has no content type")
    content_type = decode_oid(parts[0])
    if len(parts) == 1:
        return content_type, None
    wrapper = expect(parts[1], CONTEXT_0, "encapsulated content")
    inner = children(wrapper)
    if len(inner) != 1:
        raise malformed("encapsulated content must hold exactly one element")
    if inner[0].tag != OCTET_STRING:
        raise malformed("encapsulated content is not an OCTET STRING")
    return content_type, inner[0].value


def parse_signed_data(blob: bytes) -> SignedData:
    """Take a DER PKCS#7 ContentInfo holding SignedData apart; EBADMSG if it is not one."""
    outer = read_single(blob, "PKCS#7 envelope")
    parts = children(expect(outer, SEQUENCE, "PKCS#7 ContentInfo"))
    if not parts or parts[0].tag != OID or decode_oid(parts[0]) != OID_SIGNED_DATA:
        raise malformed("not a PKCS#7 SignedData envelope")
    if len(parts) != 2:
        raise malformed("PKCS#7 SignedData envelope has no content")
    body = children(expect(parts[1], CONTEXT_0, "SignedData wrapper"))
    if len(body) != 1:
        raise malformed("SignedData wrapper must hold exactly one element")
    fields = children(expect(body[0], SEQUENCE, "SignedData"))
    if len(fields) < 4:
        raise malformed("SignedData has too few fields")
    decode_int(fields[0])  # version
    expect(fields[1], SET, "SignedData digest algorithms")
    content_type, content = _parse_encapsulated(fields[2])
    certificates: list[bytes] = []
    rest = fields[3:]
    if rest and rest[0].tag == CONTEXT_0:
        certificates = [c.encoding for c in children(rest[0]) if c.tag == SEQUENCE]
        rest = rest[1:]
    if rest and rest[0].tag == CONTEXT_1:  # CRLs: not used
        rest = rest[1:]
    if len(rest) != 1:
        raise malformed("SignedData lacks its signer infos")
    signers = tuple(_parse_signer_info(s) for s in children(expect(rest[0], SET, "signer infos")))
    return SignedData(content_type, content, tuple(certificates), signers)


def looks_like_signed_data(data: bytes) -> bool:
    """True if ``data`` opens like a DER PKCS#7 SignedData (a SEQUENCE, then its OID)."""
    if len(data) < 2 or data[0] != SEQUENCE:
        return False
    try:
        _, start = _read_length(data, 1)
    except SignatureError:
        return False
    return data[start : start + len(SIGNED_DATA_OID_DER)] == SIGNED_DATA_OID_DER


def tbs_issuer_and_serial(tbs_certificate: bytes) -> tuple[bytes, int]:
    """The issuer Name (exact DER) and serial number of a TBSCertificate."""
    fields = children(read_single(tbs_certificate, "TBSCertificate"))
    if fields and fields[0].tag == CONTEXT_0:  # explicit version
        fields = fields[1:]
    if len(fields) < 3:
        raise malformed("TBSCertificate has too few fields")
    return fields[2].encoding, decode_int(fields[0])
