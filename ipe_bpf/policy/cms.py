"""PKCS#7 / CMS SignedData (RFC 5652) taken apart: the few fields a signature check needs.

cryptography builds PKCS#7 signatures but has no public API to verify one, so the envelope is
read here and :mod:`ipe_bpf.policy.signing` checks the pieces with the signer's public key.  The
reader walks the DER itself, as the kernel's PKCS#7 parser does: definite lengths only (an
indefinite length, a tag number above 30 or a length of more than 4 octets is malformed), each
value within its parent, nothing after the envelope.  The bytes it returns (the content, the
certificates, the issuer name, the signed attributes) are slices of the envelope as signed, never
re-encoded.  (It replaced pyasn1, whose RFC 5652 module cost 1 s of each signed deploy in the
test VM.)  Every failure to decode is a :class:`~ipe_bpf.errors.SignatureError` with ``EBADMSG``,
as the kernel's parser says.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SignatureError

# RFC 5652's object identifiers
OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"

# The DER of `OBJECT IDENTIFIER pkcs7-signedData`: what follows the outer SEQUENCE header.
SIGNED_DATA_OID_DER = bytes.fromhex("06092a864886f70d010702")  # the DER of OID_SIGNED_DATA

# Identifier octets (class, constructed bit, tag number) of what SignedData holds
_INTEGER, _OCTET_STRING, _OID = 0x02, 0x04, 0x06
_SEQUENCE, _SET = 0x30, 0x31
_CONTEXT_0, _CONTEXT_1 = 0xA0, 0xA1  # [0] / [1], constructed
_CONTEXT_0_PRIMITIVE = 0x80  # [0] IMPLICIT OCTET STRING: subjectKeyIdentifier


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
        return _Reader(values[0], "messageDigest attribute").only(_OCTET_STRING)

    def content_types(self) -> list[str] | None:
        """The contentType signed attribute's values as dotted OIDs, None if it is absent."""
        values = self.attribute(OID_CONTENT_TYPE)
        if values is None:
            return None
        return [_oid(_Reader(v, "contentType attribute").only(_OID)) for v in values]

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


class _Reader:
    """The DER values inside one span of bytes, read in order: `what` names the span in errors."""

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self.data = memoryview(data)
        self.at = 0
        self.what = what

    def more(self) -> bool:
        return self.at < len(self.data)

    def peek(self) -> int | None:
        return self.data[self.at] if self.more() else None

    def tlv(self) -> tuple[int, memoryview, memoryview]:
        """(identifier octet, value, whole encoding) of the next value."""
        data, start = self.data, self.at
        if len(data) - start < 2:
            raise malformed(f"truncated DER in the {self.what}")
        tag, first = data[start], data[start + 1]
        if tag & 0x1F == 0x1F:
            raise malformed(f"malformed {self.what}: a tag number above 30")
        at = start + 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4:
                raise malformed(f"malformed {self.what}: " + ("an indefinite length" if count == 0 else
                                                               f"a length of {count} octets"))
            if len(data) - at < count:
                raise malformed(f"truncated DER in the {self.what}")
            length = int.from_bytes(data[at : at + count], "big")
            at += count
        if len(data) - at < length:
            raise malformed(f"truncated DER in the {self.what}")
        self.at = at + length
        return tag, data[at : at + length], data[start : at + length]

    def value(self, tag: int, name: str) -> memoryview:
        """The value of the next element, which must have identifier `tag`."""
        found, value, _ = self.tlv()
        if found != tag:
            raise malformed(f"malformed {self.what}: {name} has tag {found:#04x}, not {tag:#04x}")
        return value

    def reader(self, tag: int, name: str) -> "_Reader":
        return _Reader(self.value(tag, name), self.what)

    def optional(self, tag: int) -> memoryview | None:
        return self.tlv()[1] if self.peek() == tag else None

    def only(self, tag: int) -> bytes:
        """The value of the single element the span holds."""
        value = self.value(tag, "the value")
        self.end()
        return bytes(value)

    def end(self) -> None:
        if self.more():
            raise malformed(f"{len(self.data) - self.at} unexpected bytes after the {self.what}")


def _oid(value: bytes | memoryview) -> str:
    """The dotted form of an OBJECT IDENTIFIER's value octets."""
    arcs, arc = [], 0
    if not value or value[-1] & 0x80:
        raise malformed("malformed OBJECT IDENTIFIER")
    for octet in value:
        if arc == 0 and octet == 0x80:
            raise malformed("malformed OBJECT IDENTIFIER: a padded arc")
        arc = arc << 7 | octet & 0x7F
        if not octet & 0x80:
            arcs.append(arc)
            arc = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, (first, arcs[0] - 40 * first, *arcs[1:])))


def _algorithm(r: _Reader, name: str) -> str:
    """The OID of an AlgorithmIdentifier (its parameters are not looked at)."""
    return _oid(r.reader(_SEQUENCE, name).value(_OID, f"{name} OID"))


def _signer(r: _Reader) -> SignerInfo:
    r.value(_INTEGER, "signer version")
    issuer = serial = key_id = None
    if r.peek() == _CONTEXT_0_PRIMITIVE:
        key_id = bytes(r.value(_CONTEXT_0_PRIMITIVE, "subjectKeyIdentifier"))
    else:
        sid = r.reader(_SEQUENCE, "issuerAndSerialNumber")
        tag, _, issuer_der = sid.tlv()
        if tag != _SEQUENCE:
            raise malformed(f"malformed {r.what}: the issuer is no Name")
        issuer = bytes(issuer_der)
        serial = int.from_bytes(sid.value(_INTEGER, "serialNumber"), "big", signed=True)
        sid.end()
    digest_oid = _algorithm(r, "digestAlgorithm")
    attrs = attrs_der = None
    if r.peek() == _CONTEXT_0:
        _, value, whole = r.tlv()
        attrs = tuple(_attribute(a) for a in _elements(value, "signed attributes"))
        # The signature covers the attributes encoded as a SET OF, not as [0] IMPLICIT.
        attrs_der = bytes([_SET]) + bytes(whole[1:])
    signature_oid = _algorithm(r, "signatureAlgorithm")
    signature = bytes(r.value(_OCTET_STRING, "signature"))
    r.optional(_CONTEXT_1)  # unsigned attributes
    r.end()
    return SignerInfo(issuer, serial, key_id, digest_oid, attrs, attrs_der, signature_oid, signature)


def _attribute(r: _Reader) -> Attribute:
    oid = _oid(r.value(_OID, "attribute type"))
    values = tuple(bytes(whole) for whole in _wholes(r.value(_SET, "attribute values"), "attribute values"))
    r.end()
    return Attribute(oid, values)


def _wholes(data: memoryview, what: str) -> list[memoryview]:
    """The whole encodings of the values a SET or SEQUENCE holds."""
    r, out = _Reader(data, what), []
    while r.more():
        out.append(r.tlv()[2])
    return out


def _elements(data: memoryview, what: str) -> list[_Reader]:
    """Readers of the SEQUENCEs a SET OF SEQUENCE holds."""
    r, out = _Reader(data, what), []
    while r.more():
        out.append(r.reader(_SEQUENCE, what))
    return out


def parse_signed_data(blob: bytes) -> SignedData:
    """Take a DER ContentInfo holding SignedData apart; EBADMSG if it is not one."""
    if not blob:
        raise malformed("truncated DER: the envelope is empty")
    outer = _Reader(blob, "PKCS#7 envelope")
    info = outer.reader(_SEQUENCE, "ContentInfo")
    outer.end()
    if _oid(info.value(_OID, "contentType")) != OID_SIGNED_DATA:
        raise malformed("not a PKCS#7 SignedData envelope")
    explicit = info.reader(_CONTEXT_0, "content")
    info.end()
    signed = explicit.reader(_SEQUENCE, "SignedData")
    explicit.end()
    signed.what = "PKCS#7 SignedData"
    signed.value(_INTEGER, "version")
    signed.value(_SET, "digestAlgorithms")
    encapsulated = signed.reader(_SEQUENCE, "encapContentInfo")
    content_type = _oid(encapsulated.value(_OID, "eContentType"))
    content = None
    if encapsulated.more():
        content = bytes(encapsulated.reader(_CONTEXT_0, "eContent").only(_OCTET_STRING))
    encapsulated.end()
    certificates: tuple[bytes, ...] = ()
    found = signed.optional(_CONTEXT_0)
    if found is not None:  # CertificateChoices: only plain certificates (SEQUENCE) are kept
        certificates = tuple(bytes(w) for w in _wholes(found, "certificates") if w[0] == _SEQUENCE)
    signed.optional(_CONTEXT_1)  # CRLs
    signers = tuple(_signer(s) for s in _elements(signed.value(_SET, "signerInfos"), "SignerInfo"))
    signed.end()
    return SignedData(content_type, content, certificates, signers)


def looks_like_signed_data(data: bytes) -> bool:
    """True if ``data`` opens like a DER PKCS#7 SignedData: a SEQUENCE, then (after its length
    octets, at most 5) the signedData OID.  Policy text never does."""
    if len(data) < 2 or data[0] != 0x30:
        return False
    length_octets = 1 + (data[1] & 0x7F if data[1] & 0x80 else 0)
    start = 1 + length_octets
    return data[start : start + len(SIGNED_DATA_OID_DER)] == SIGNED_DATA_OID_DER
