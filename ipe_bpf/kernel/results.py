"""What the lifecycle reports: deployed policies as listed, and what an operation did."""

from __future__ import annotations

from dataclasses import dataclass

from ..policy.model import text
from .store import StoredPolicy, StoreState, version_text


@dataclass(frozen=True)
class PolicyInfo:
    """A deployed policy as `list` shows it."""

    name: bytes
    version: tuple[int, int, int]
    digest: str  # sha256 hex of the submitted blob
    generation: int
    active: bool
    signed: bool
    signer: str | None
    deployed_at: str

    @property
    def name_text(self) -> str:
        return text(self.name)

    @property
    def version_text(self) -> str:
        return version_text(self.version)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name_text, "version": self.version_text,
                "digest": "sha256:" + self.digest.upper(), "generation": self.generation,
                "active": self.active, "signed": self.signed, "signer": self.signer,
                "deployed_at": self.deployed_at}

    @classmethod
    def of(cls, policy: StoredPolicy, state: StoreState) -> "PolicyInfo":
        return cls(policy.name, policy.version, policy.digest, policy.generation,
                   policy.name == state.active, policy.signed, policy.signer, policy.deployed_at)


@dataclass(frozen=True)
class Outcome:
    """What an operation did.

    ``policy`` is the policy acted on; ``changed`` is False for a no-op; ``applied`` says the
    kernel was changed (False when enforcement is not loaded, or nothing needed the kernel);
    ``records`` are the audit lines written; ``warnings`` are problems after the change was made
    (e.g. the audit log could not be written).
    """

    policy: PolicyInfo | None
    changed: bool
    applied: bool
    records: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Listing:
    policies: tuple[PolicyInfo, ...]
    active: PolicyInfo | None
    enforce: bool
    success_audit: bool

    def to_json(self) -> dict[str, object]:
        return {"active": self.active.name_text if self.active else None,
                "enforce": self.enforce, "success_audit": self.success_audit,
                "policies": [p.to_json() for p in self.policies]}
