"""A submitted policy blob: signature checked (kernel order: before parsing), parsed, compiled.

Or, with a compiled policy beside it (`ipe-bpf policy compile` on a build host), signature
checked and its tables taken from the compiled policy once that is verified too: no parsing or
compiling on the target (the text is parsed later only if something asks for its rules).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from typing import TYPE_CHECKING

from ..errors import IpeBpfError, SignatureError
from ..policy import cms
from ..policy.compiler import Tables, compile_policy, default_abi
from ..policy.lint import nul_truncation
from ..policy.model import Policy

if TYPE_CHECKING:  # cryptography is imported only for a signed blob (0.25 s of an unsigned deploy in the VM)
    from cryptography import x509

Trust = Path | Sequence["x509.Certificate"]


@dataclass(frozen=True)
class Compiled:
    """A compiled policy as submitted: its bytes (signed or not) and the name errors give it."""

    blob: bytes
    source: str | None = None


@dataclass(frozen=True)
class Submission:
    """A submitted blob, its signature checked, its tables made (or taken from a compiled policy)."""

    blob: bytes
    content: bytes
    name: bytes
    version: tuple[int, int, int]
    tables: Tables
    properties: frozenset[str]  # the property keys its rules test
    signer: str | None  # None: unsigned (allowed explicitly)
    warnings: tuple[str, ...] = ()  # what the kernel accepts silently (a NUL cutting the policy)
    digest: str = ""  # sha256 hex of the blob
    content_digest: str = ""  # ... and of the policy text in it
    tables_file: bytes | None = None  # the compiled policy's tables file, kept as it came
    parsed: Policy | None = None

    @property
    def signed(self) -> bool:
        return self.signer is not None

    @property
    def version_text(self) -> str:
        from .store import version_text

        return version_text(self.version)

    @cached_property
    def policy(self) -> Policy:
        """The parsed text (parsed now if it came compiled: only a warning's detail needs it)."""
        from ..policy.parser import parse_policy  # not imported for a compiled policy

        return self.parsed if self.parsed is not None else parse_policy(self.content)


def _resolve_trust(trust: Trust) -> Sequence[x509.Certificate]:
    from ..policy import signing

    if isinstance(trust, (str, Path)):
        return signing.load_trust(Path(trust))
    return trust


def _opened(blob: bytes, trust: Trust, allow_unsigned: bool, now: dt.datetime | None,
            unsigned_hint: str) -> tuple[bytes, str | None, bytes | None]:
    """(content, signer, the content's sha256 if verifying computed it) of a blob: a PKCS#7
    envelope is always verified against ``trust``; anything else is ``EBADMSG`` unless
    ``allow_unsigned``."""
    if cms.looks_like_signed_data(blob):
        from ..policy import signing

        verified = signing.verify_policy(blob, _resolve_trust(trust), now=now)
        return verified.content, verified.signer_subject, verified.content_hashes.get("sha256")
    if allow_unsigned:
        return blob, None, None
    raise SignatureError("EBADMSG", unsigned_hint)


def open_submission(blob: bytes, trust: Trust, *, allow_unsigned: bool = False,
                    source: str | None = None, now: dt.datetime | None = None,
                    compiled: Compiled | None = None) -> Submission:
    """Check the signature (kernel order: before parsing), then parse and compile, or take the
    tables of ``compiled`` once its own signature is checked the same way.

    A PKCS#7 blob is always verified against ``trust`` (loaded only then).  Plain text is
    ``EBADMSG`` unless ``allow_unsigned``.  Errors about the blob name ``source`` as their file.
    """
    try:
        content, signer, content_hash = _opened(blob, trust, allow_unsigned, now, (
            "not a PKCS#7 signed policy (sign it with `ipe-bpf policy sign`; plain text needs "
            "--unsigned, for test machines only)"))
        cut = nul_truncation(content)
        warnings = () if cut is None else (f"{source or 'the policy'}:{cut.line}: {cut.message}",)
        content_digest = (content_hash or hashlib.sha256(content).digest()).hex()
        digests = (content_digest if content is blob else hashlib.sha256(blob).hexdigest(), content_digest)
        if compiled is None:
            return _parsed(blob, content, signer, warnings, digests)
    except IpeBpfError as err:
        if source is not None and err.path is None:
            err.located(source)
        raise
    try:
        return _precompiled(blob, content, signer, warnings, digests, compiled, trust, allow_unsigned, now)
    except IpeBpfError as err:
        if compiled.source is not None and err.path is None:
            err.located(compiled.source)
        raise


def _parsed(blob: bytes, content: bytes, signer: str | None, warnings: tuple[str, ...],
            digests: tuple[str, str]) -> Submission:
    from ..policy.parser import parse_policy
    from .features import policy_properties

    policy = parse_policy(content)
    tables = compile_policy(policy).tables
    return Submission(blob, content, policy.name, policy.version, tables, policy_properties(policy),
                      signer, warnings, *digests, parsed=policy)


def _precompiled(blob: bytes, content: bytes, signer: str | None, warnings: tuple[str, ...],
                 digests: tuple[str, str], compiled: Compiled, trust: Trust, allow_unsigned: bool,
                 now: dt.datetime | None) -> Submission:
    """The submission with the tables of ``compiled``: signed by a trusted signer (or unsigned
    where unsigned policies are allowed) and made from exactly this policy text.  Packed for
    another ABI (an older or newer ipe-bpf compiled it), the text is compiled here instead."""
    from ..policy import tables_file

    data, compiled_signer, _ = _opened(compiled.blob, trust, allow_unsigned, now, (
        "the compiled policy is not signed (sign it: `ipe-bpf policy compile --key --cert`; "
        "unsigned needs --unsigned, for test machines only)"))
    found = tables_file.load_compiled(data, digests[1], default_abi(), signed=compiled_signer is not None)
    if found.tables is None:
        note = (f"{compiled.source or 'the compiled policy'} was packed for another ipe-bpf (its ABI "
                f"differs): compiled the policy text here instead")
        return _parsed(blob, content, signer, (*warnings, note), digests)
    t = found.tables
    return Submission(blob, content, t.name, t.version, t, found.properties, signer, warnings, *digests,
                      tables_file=data)
