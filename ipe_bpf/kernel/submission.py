"""A submitted policy blob: signature checked (kernel order: before parsing), parsed, compiled."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from ..errors import IpeBpfError, SignatureError
from ..policy import cms
from ..policy.compiler import CompiledPolicy, compile_policy
from ..policy.lint import nul_truncation
from ..policy.model import Policy
from ..policy.parser import parse_policy

if TYPE_CHECKING:  # cryptography is imported only for a signed blob (0.25 s of an unsigned deploy in the VM)
    from cryptography import x509

Trust = Path | Sequence["x509.Certificate"]


@dataclass(frozen=True)
class Submission:
    """A submitted blob, its signature checked, its policy parsed and compiled."""

    blob: bytes
    content: bytes
    policy: Policy
    compiled: CompiledPolicy
    signer: str | None  # None: unsigned (allowed explicitly)
    warnings: tuple[str, ...] = ()  # what the kernel accepts silently (a NUL cutting the policy)

    @property
    def signed(self) -> bool:
        return self.signer is not None


def _resolve_trust(trust: Trust) -> Sequence[x509.Certificate]:
    from ..policy import signing

    if isinstance(trust, (str, Path)):
        return signing.load_trust(Path(trust))
    return trust


def open_submission(blob: bytes, trust: Trust, *, allow_unsigned: bool = False,
                    source: str | None = None, now: dt.datetime | None = None) -> Submission:
    """Check the signature (kernel order: before parsing), then parse and compile.

    A PKCS#7 blob is always verified against ``trust`` (loaded only then).  Plain text is
    ``EBADMSG`` unless ``allow_unsigned``.  Errors about the blob name ``source`` as their file.
    """
    signed = cms.looks_like_signed_data(blob)
    trusted = _resolve_trust(trust) if signed else ()
    try:
        if signed:
            from ..policy import signing

            verified = signing.verify_policy(blob, trusted, now=now)
            content, signer = verified.content, verified.signer_subject
        elif allow_unsigned:
            content, signer = blob, None
        else:
            raise SignatureError("EBADMSG", "not a PKCS#7 signed policy (sign it with `ipe-bpf "
                                 "policy sign`; plain text needs --unsigned, for test machines only)")
        policy = parse_policy(content)
        cut = nul_truncation(content)
        warnings = () if cut is None else (f"{source or 'the policy'}:{cut.line}: {cut.message}",)
        return Submission(blob, content, policy, compile_policy(policy), signer, warnings)
    except IpeBpfError as err:
        if source is not None and err.path is None:
            err.located(source)
        raise
