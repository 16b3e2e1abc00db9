"""PKCS#7 signing and verification, cross-checked against the real openssl in both directions."""

from __future__ import annotations

import dataclasses
import hashlib
import datetime as dt
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipe_bpf.errors import SignatureError
from ipe_bpf.policy import cms
from ipe_bpf.policy.signing import (
    extract_content,
    load_trust,
    looks_like_pkcs7,
    sign_policy,
    verify_policy,
)

from .signing_fixtures import (  # noqa: F401  (pki and policy_file are fixtures)
    DAY,
    NOW,
    POLICY,
    Identity,
    Pki,
    make_identity,
    openssl,
    openssl_sign,
    openssl_verify,
    pki,
    policy_file,
)

SIGNERS = ["rsa", "p256", "p384"]


def _sign(ident: Identity, content: bytes = POLICY, **kwargs: str) -> bytes:
    return sign_policy(content, ident.key_pem, ident.cert_pem, **kwargs)


def _trust(pki: Pki, ident: Identity) -> list:
    return load_trust(pki.trust_for(ident))


def _rejects(blob: bytes, trusted: list, errno_name: str, **kwargs: object) -> SignatureError:
    with pytest.raises(SignatureError) as info:
        verify_policy(blob, trusted, **kwargs)  # type: ignore[arg-type]
    assert info.value.errno_name == errno_name, str(info.value)
    assert "\n" not in str(info.value)
    return info.value


def _flip(blob: bytes, offset: int) -> bytes:
    return blob[:offset] + bytes([blob[offset] ^ 0x01]) + blob[offset + 1:]


# ------------------------------------------------------------------ ours -> openssl


@pytest.mark.parametrize("name", SIGNERS)
def test_openssl_accepts_our_signature_and_returns_the_exact_content(pki: Pki, name: str, tmp_path: Path) -> None:
    ident = pki.signers()[name]
    proc = openssl_verify(_sign(ident), pki.trust_for(ident), tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == POLICY


@pytest.mark.parametrize("digest", ["sha384", "sha512"])
def test_openssl_accepts_other_digests(pki: Pki, digest: str, tmp_path: Path) -> None:
    blob = _sign(pki.p384, digest=digest)
    assert verify_policy(blob, _trust(pki, pki.p384)).digest == digest
    proc = openssl_verify(blob, pki.p384.cert_path, tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == POLICY


def test_openssl_rejects_a_tampered_signature_of_ours(pki: Pki, tmp_path: Path) -> None:
    blob = _sign(pki.rsa)
    tampered = blob.replace(POLICY, POLICY.replace(b"ALLOW", b"DENY!"))
    assert openssl_verify(tampered, pki.rsa.cert_path, tmp_path).returncode != 0


def test_rsa_signature_is_byte_identical_to_openssl(pki: Pki, policy_file: Path) -> None:
    # PKCS#1 v1.5 is deterministic, so the whole envelope must match openssl's bytes.
    ours = _sign(pki.rsa)
    theirs = openssl_sign(pki.rsa, policy_file, "-noattr", "-nosmimecap")
    assert ours == theirs


@pytest.mark.parametrize("name", ["p256", "p384"])
def test_ecdsa_envelope_has_openssl_structure(pki: Pki, name: str, policy_file: Path) -> None:
    # ECDSA signatures are randomised: compare everything but the signature value.
    ident = pki.signers()[name]
    ours = cms.parse_signed_data(_sign(ident))
    theirs = cms.parse_signed_data(openssl_sign(ident, policy_file, "-noattr", "-nosmimecap"))

    def without_signatures(signed: cms.SignedData) -> cms.SignedData:
        signers = tuple(dataclasses.replace(s, signature=b"") for s in signed.signers)
        return dataclasses.replace(signed, signers=signers)

    assert without_signatures(ours) == without_signatures(theirs)
    assert ours.signers[0].signed_attrs is None
    assert ours.content == POLICY


def test_signing_is_binary_no_crlf_canonicalisation(pki: Pki) -> None:
    content = b"policy_name=a policy_version=0.0.1\nDEFAULT action=ALLOW\r\n\n"
    assert extract_content(_sign(pki.p256, content)) == content


# ------------------------------------------------------------------ openssl -> ours


@pytest.mark.parametrize("name", SIGNERS)
def test_we_verify_openssl_signatures_in_the_kernel_shape(pki: Pki, name: str, policy_file: Path) -> None:
    ident = pki.signers()[name]
    blob = openssl_sign(ident, policy_file, "-noattr", "-nosmimecap")
    verified = verify_policy(blob, _trust(pki, ident))
    assert verified.content == POLICY
    assert verified.signer == ident.cert
    assert verified.signer_subject == ident.cert.subject.rfc4514_string()
    assert "CN=" + name in verified.signer_subject


@pytest.mark.parametrize("md", ["sha256", "sha384", "sha512"])
def test_we_verify_openssl_digest_choices(pki: Pki, md: str, policy_file: Path) -> None:
    blob = openssl_sign(pki.rsa, policy_file, "-noattr", "-md", md)
    assert verify_policy(blob, _trust(pki, pki.rsa)).digest == md


@pytest.mark.parametrize("attrs", [("-noattr",), ()])
def test_the_content_is_hashed_once_and_the_hash_is_kept(pki: Pki, policy_file: Path, attrs: tuple[str, ...],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The signature is checked over our own hash of the content (0.3 s for 11 MB in the VM, paid
    once), which deploy then uses as the policy's content digest."""
    from ipe_bpf.policy import signing

    blob = openssl_sign(pki.p256, policy_file, *attrs, tool="cms")
    hashed: list[str] = []
    real = hashlib.new
    monkeypatch.setattr(signing.hashlib, "new", lambda name, data=b"": hashed.append(name) or real(name, data))
    verified = verify_policy(blob, _trust(pki, pki.p256))
    assert hashed == ["sha256"]
    assert verified.content_hashes == {"sha256": hashlib.sha256(POLICY).digest()}


@pytest.mark.parametrize("name", SIGNERS)
def test_we_verify_signatures_with_signed_attributes(pki: Pki, name: str, policy_file: Path) -> None:
    ident = pki.signers()[name]
    blob = openssl_sign(ident, policy_file, tool="cms")  # CMS default: signed attributes
    assert cms.parse_signed_data(blob).signers[0].signed_attrs is not None
    assert verify_policy(blob, _trust(pki, ident)).content == POLICY


def test_signed_attributes_catch_modified_content(pki: Pki, policy_file: Path) -> None:
    blob = openssl_sign(pki.p256, policy_file, tool="cms")
    tampered = blob.replace(POLICY, POLICY.replace(b"ALLOW", b"DENY!"))
    err = _rejects(tampered, _trust(pki, pki.p256), "EKEYREJECTED")
    assert "messageDigest" in str(err)


def test_signed_attributes_catch_modified_attributes(pki: Pki, policy_file: Path) -> None:
    blob = openssl_sign(pki.p256, policy_file, tool="cms")
    signer = cms.parse_signed_data(blob).signers[0]
    assert signer.signed_attrs_der is not None
    at = blob.index(signer.signed_attrs_der[1:]) + len(signer.signed_attrs_der) - 2  # last byte of the attributes
    _rejects(_flip(blob, at), _trust(pki, pki.p256), "EKEYREJECTED")


def test_we_verify_signer_named_by_subject_key_id(pki: Pki, policy_file: Path) -> None:
    blob = openssl_sign(pki.p256, policy_file, "-noattr", "-keyid", tool="cms")
    signer = cms.parse_signed_data(blob).signers[0]
    assert signer.subject_key_id is not None and signer.serial is None
    assert verify_policy(blob, _trust(pki, pki.p256)).signer == pki.p256.cert


def test_signer_certificate_may_come_from_the_trust_store(pki: Pki, policy_file: Path) -> None:
    blob = openssl_sign(pki.rsa, policy_file, "-noattr", "-nocerts")
    assert cms.parse_signed_data(blob).certificates == ()
    assert verify_policy(blob, _trust(pki, pki.rsa)).signer == pki.rsa.cert
    err = _rejects(blob, _trust(pki, pki.p384), "ENOKEY")
    assert "neither in the envelope nor trusted" in str(err)


# ------------------------------------------------------------------------ trust


def test_direct_issuance_by_a_trusted_ca_is_enough(pki: Pki) -> None:
    assert verify_policy(_sign(pki.p256), load_trust(pki.ca.cert_path)).signer == pki.p256.cert


def test_trusting_the_signer_itself_is_enough(pki: Pki) -> None:
    assert verify_policy(_sign(pki.p256), load_trust(pki.p256.cert_path)).content == POLICY


def test_longer_chains_are_not_followed(pki: Pki) -> None:
    # grandchild <- intermediate <- ca: only direct issuance by a trusted cert counts.
    blob = _sign(pki.grandchild)
    _rejects(blob, load_trust(pki.ca.cert_path), "ENOKEY")
    assert verify_policy(blob, load_trust(pki.intermediate.cert_path)).signer == pki.grandchild.cert


def test_a_trusted_non_ca_certificate_issues_nothing(pki: Pki, tmp_path: Path) -> None:
    leaf = make_identity(tmp_path, "leaf-of-leaf", ec.generate_private_key(ec.SECP256R1()), issuer=pki.rsa)
    _rejects(_sign(leaf), load_trust(pki.rsa.cert_path), "ENOKEY")


def test_untrusted_signer_is_enokey(pki: Pki) -> None:
    err = _rejects(_sign(pki.untrusted), load_trust(pki.ca.cert_path), "ENOKEY")
    assert "CN=untrusted" in str(err) and "not trusted" in str(err)


def test_same_name_different_key_is_not_trusted(pki: Pki, tmp_path: Path) -> None:
    impostor = make_identity(tmp_path, "rsa", ec.generate_private_key(ec.SECP256R1()))
    assert impostor.cert.subject == pki.rsa.cert.subject
    _rejects(_sign(impostor), load_trust(pki.rsa.cert_path), "ENOKEY")


def test_expired_certificate_is_ekeyrejected(pki: Pki) -> None:
    blob = _sign(pki.expired)
    err = _rejects(blob, load_trust(pki.ca.cert_path), "EKEYREJECTED")
    assert "expired" in str(err)
    assert verify_policy(blob, load_trust(pki.ca.cert_path), now=NOW - 45 * DAY).content == POLICY


def test_not_yet_valid_certificate_is_ekeyrejected(pki: Pki) -> None:
    err = _rejects(_sign(pki.rsa), load_trust(pki.rsa.cert_path), "EKEYREJECTED", now=NOW - 10 * DAY)
    assert "not valid before" in str(err)


def test_expired_trusted_ca_is_ekeyrejected(tmp_path: Path) -> None:
    ca = make_identity(tmp_path, "short-ca", ec.generate_private_key(ec.SECP256R1()), is_ca=True,
                       not_before=NOW - 2 * DAY, not_after=NOW - DAY)
    leaf = make_identity(tmp_path, "outlives-ca", ec.generate_private_key(ec.SECP256R1()), issuer=ca)
    err = _rejects(_sign(leaf), [ca.cert], "EKEYREJECTED")
    assert "CN=short-ca" in str(err) and "expired" in str(err)


def test_naive_now_is_taken_as_utc(pki: Pki) -> None:
    naive = (NOW - 45 * DAY).replace(tzinfo=None)
    assert verify_policy(_sign(pki.expired), load_trust(pki.ca.cert_path), now=naive).content == POLICY


def test_one_trusted_signer_of_two_is_enough_but_every_signature_must_hold(pki: Pki, policy_file: Path) -> None:
    blob = openssl_sign(pki.untrusted, policy_file, "-noattr", "-nosmimecap",
                        "-signer", str(pki.rsa.cert_path), "-inkey", str(pki.rsa.key_path))
    assert len(cms.parse_signed_data(blob).signers) == 2
    assert verify_policy(blob, load_trust(pki.rsa.cert_path)).signer == pki.rsa.cert
    _rejects(blob, load_trust(pki.p384.cert_path), "ENOKEY")
    _rejects(_flip(blob, len(blob) - 1), load_trust(pki.rsa.cert_path), "EKEYREJECTED")


# -------------------------------------------------------------------- rejections


@pytest.mark.parametrize("name", SIGNERS)
def test_tampered_content_is_ekeyrejected(pki: Pki, name: str) -> None:
    ident = pki.signers()[name]
    blob = _sign(ident)
    tampered = _flip(blob, blob.index(POLICY) + len(POLICY) - 2)
    err = _rejects(tampered, _trust(pki, ident), "EKEYREJECTED")
    assert "does not verify" in str(err)


@pytest.mark.parametrize("name", SIGNERS)
def test_tampered_signature_is_ekeyrejected(pki: Pki, name: str) -> None:
    ident = pki.signers()[name]
    blob = _sign(ident)
    signature = cms.parse_signed_data(blob).signers[0].signature
    assert blob.endswith(signature)
    _rejects(_flip(blob, len(blob) - len(signature) // 2), _trust(pki, ident), "EKEYREJECTED")


@pytest.mark.parametrize("name", SIGNERS)
def test_truncated_der_is_ebadmsg(pki: Pki, name: str) -> None:
    ident = pki.signers()[name]
    blob = _sign(ident)
    for cut in (1, 2, 10, len(blob) // 2, len(blob) - 1):
        err = _rejects(blob[:cut], _trust(pki, ident), "EBADMSG")
        assert "truncated" in str(err), cut


def test_trailing_garbage_is_ebadmsg(pki: Pki) -> None:
    err = _rejects(_sign(pki.rsa) + b"\0", _trust(pki, pki.rsa), "EBADMSG")
    assert "unexpected bytes" in str(err)


@pytest.mark.parametrize("name", SIGNERS)
def test_detached_signature_is_ebadmsg(pki: Pki, name: str, policy_file: Path) -> None:
    ident = pki.signers()[name]
    blob = openssl_sign(ident, policy_file, "-noattr", detached=True)
    assert looks_like_pkcs7(blob)
    err = _rejects(blob, _trust(pki, ident), "EBADMSG")
    assert "detached" in str(err)
    with pytest.raises(SignatureError, match="detached"):
        extract_content(blob)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_ebadmsg(pki: Pki, seed: int) -> None:
    rng = random.Random(seed)
    blob = rng.randbytes(rng.randrange(0, 2000))
    if seed % 2:  # half of them dressed as a SignedData header
        blob = bytes.fromhex("308203e8") + cms.SIGNED_DATA_OID_DER + blob
    _rejects(blob, _trust(pki, pki.rsa), "EBADMSG")


def test_plain_policy_text_and_empty_input_are_ebadmsg(pki: Pki) -> None:
    _rejects(POLICY, _trust(pki, pki.rsa), "EBADMSG")
    _rejects(b"", _trust(pki, pki.rsa), "EBADMSG")


def test_other_pkcs7_types_are_ebadmsg(pki: Pki, tmp_path: Path) -> None:
    # A certs-only "degenerate" envelope is SignedData without content or signer.
    pem = tmp_path / "certs.p7b"
    proc = openssl("crl2pkcs7", "-nocrl", "-certfile", pki.rsa.cert_path, "-outform", "der", "-out", pem)
    assert proc.returncode == 0, proc.stderr.decode()
    _rejects(pem.read_bytes(), _trust(pki, pki.rsa), "EBADMSG")


def test_unsupported_digest_is_enopkg(pki: Pki, policy_file: Path) -> None:
    blob = openssl_sign(pki.rsa, policy_file, "-noattr", "-md", "sha1")
    _rejects(blob, _trust(pki, pki.rsa), "ENOPKG")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutations_never_escape_as_other_errors(pki: Pki, data: st.DataObject) -> None:
    blob = bytearray(_sign(pki.rsa))  # deterministic, so every run draws the same way
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    trusted = load_trust(pki.rsa.cert_path)
    try:
        verified = verify_policy(bytes(blob[:cut]) if data.draw(st.booleans()) else bytes(blob), trusted)
    except SignatureError as err:
        assert err.errno_name in {"EBADMSG", "ENOKEY", "EKEYREJECTED", "ENOPKG"}
    else:
        assert verified.content == POLICY  # only harmless bytes changed


# ------------------------------------------------------------------ helpers


def test_extract_content_and_looks_like_pkcs7(pki: Pki) -> None:
    blob = _sign(pki.untrusted)
    assert looks_like_pkcs7(blob)
    assert extract_content(blob) == POLICY  # no verification
    assert looks_like_pkcs7(blob[:20])  # a truncated one still looks like one
    assert not looks_like_pkcs7(POLICY)
    assert not looks_like_pkcs7(b"")
    assert not looks_like_pkcs7(pki.rsa.cert.public_bytes(serialization.Encoding.DER))
    with pytest.raises(SignatureError) as info:
        extract_content(blob[:-3])
    assert info.value.errno_name == "EBADMSG"


def test_load_trust_pem_der_bundle_and_directory(pki: Pki, tmp_path: Path) -> None:
    der = tmp_path / "rsa.der"
    der.write_bytes(pki.rsa.cert.public_bytes(serialization.Encoding.DER))
    assert load_trust(der) == [pki.rsa.cert]
    assert load_trust(pki.rsa.cert_path) == [pki.rsa.cert]
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.cert_pem + pki.rsa.key_pem + pki.p384.cert_pem)  # a key block is skipped
    assert load_trust(bundle) == [pki.ca.cert, pki.p384.cert]
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "single.crt").write_bytes(pki.untrusted.cert_pem)
    assert load_trust(tmp_path) == [pki.ca.cert, pki.p384.cert, pki.rsa.cert, pki.untrusted.cert]


@pytest.mark.parametrize("case, errno_name", [
    ("missing", "ENOENT"), ("empty-dir", "ENOKEY"), ("empty-file", "EINVAL"), ("garbage", "EINVAL"),
])
def test_load_trust_errors(tmp_path: Path, case: str, errno_name: str) -> None:
    target = tmp_path / case
    if case == "empty-dir":
        target.mkdir()
    elif case == "empty-file":
        target.write_bytes(b"")
    elif case == "garbage":
        target.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(SignatureError) as info:
        load_trust(target)
    assert info.value.errno_name == errno_name
    assert case in str(info.value)


def test_sign_rejects_unusable_keys(pki: Pki) -> None:
    cases = [
        (pki.rsa.key_pem, pki.p384.cert_pem, "does not belong"),
        (b"not a key", pki.rsa.cert_pem, "not a private key"),
        (pki.rsa.key_pem, b"not a cert", "not a PEM or DER certificate"),
    ]
    p521 = ec.generate_private_key(ec.SECP521R1())
    cases.append((p521.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()), pki.rsa.cert_pem, "secp521r1"))
    for key, cert, message in cases:
        with pytest.raises(SignatureError, match=message) as info:
            sign_policy(POLICY, key, cert)
        assert info.value.errno_name == "EINVAL"
    with pytest.raises(SignatureError, match="md5"):
        sign_policy(POLICY, pki.rsa.key_pem, pki.rsa.cert_pem, digest="md5")


def test_sign_accepts_der_key_and_certificate(pki: Pki) -> None:
    key = pki.p384.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    cert = pki.p384.cert.public_bytes(serialization.Encoding.DER)
    blob = sign_policy(POLICY, key, cert)
    assert verify_policy(blob, [pki.p384.cert]).content == POLICY


def test_verify_default_now_is_the_current_time(pki: Pki) -> None:
    # Without `now`, the real clock decides: the expired signer fails, the valid one passes.
    assert dt.datetime.now(dt.timezone.utc) > NOW - 30 * DAY  # the expired signer's not-after
    _rejects(_sign(pki.expired), load_trust(pki.ca.cert_path), "EKEYREJECTED")


@pytest.mark.parametrize(("der", "dotted"), [
    ("06092a864886f70d010702", "1.2.840.113549.1.7.2"),  # signedData: cms.SIGNED_DATA_OID_DER
    ("0603883703", "2.999.3"),  # X.690's example: a first arc of 2 with a second above 39
    ("06096086480165030402 01".replace(" ", ""), "2.16.840.1.101.3.4.2.1"),  # sha256
    ("0603550403", "2.5.4.3"),  # commonName
])
def test_object_identifiers_are_decoded_as_x690_says(der: str, dotted: str) -> None:
    from ipe_bpf.policy import cms

    value = bytes.fromhex(der)[2:]
    assert cms._oid(value) == dotted
    for bad in (b"", value[:-1] + bytes([value[-1] | 0x80]), b"\x80" + value):  # empty, unterminated, padded
        with pytest.raises(SignatureError):
            cms._oid(bad)
    assert cms._oid(cms.SIGNED_DATA_OID_DER[2:]) == cms.OID_SIGNED_DATA


def test_the_envelope_of_an_openssl_cms_signature_is_read_field_by_field(pki: Pki, policy_file: Path) -> None:
    """Signed attributes, the signer named by issuer and serial, the embedded certificate: the
    bytes handed on are the envelope's own, as openssl's own parser sees them."""
    from ipe_bpf.policy import cms

    blob = openssl_sign(pki.p256, policy_file, tool="cms")
    signed = cms.parse_signed_data(blob)
    assert (signed.content_type, signed.content) == (cms.OID_DATA, POLICY)
    assert signed.certificates == (pki.p256.cert.public_bytes(serialization.Encoding.DER),)
    (signer,) = signed.signers
    assert signer.issuer_der == pki.p256.cert.issuer.public_bytes()
    assert signer.serial == pki.p256.cert.serial_number
    assert (signer.digest_oid, signer.signature_oid) == ("2.16.840.1.101.3.4.2.1", "1.2.840.10045.4.3.2")
    assert signer.content_types() == [cms.OID_DATA]
    assert signer.message_digest() == hashlib.sha256(POLICY).digest()
    assert signer.signed_attrs_der is not None and signer.signed_attrs_der[0] == 0x31
    assert blob.find(signer.signed_attrs_der[1:]) > 0 and blob.endswith(signer.signature)
