"""Control-plane audit records: 1421 CONFIG_CHANGE, 1422 POLICY_LOAD, 1404 MAC_STATUS, and the
seal's 1121 (``op=seal``, ``op=seal_refused``; docs/seal.md).

The bodies are rendered field for field as kernel IPE 6.12 writes them (docs/audit-records.md):

- 1421 ``old_active_pol_name="<n>" old_active_pol_version=<v> old_policy_digest=sha256:<HEX>
  new_active_pol_name="<n>" new_active_pol_version=<v> new_policy_digest=sha256:<HEX>
  auid=<u> ses=<u> lsm=ipe res=1`` (the three ``old_`` fields are ``?`` with no previous policy);
- 1422 ``policy_name="<n>" policy_version=<v> policy_digest=sha256:<HEX> auid=<u> ses=<u>
  lsm=ipe res=1`` (successful loads only), with `` errno=0`` appended where the running kernel's
  own IPE appends it (6.15 on: :func:`load_record_has_errno`);
- 1404 ``enforcing=<new> old_enforcing=<old> auid=<u> ses=<u> enabled=1 old-enabled=1 lsm=ipe
  res=1``; ipe-bpf's ``load`` and ``unload`` write a 1404 too, with ``enabled=1 old-enabled=0``
  (load) or ``enabled=0 old-enabled=1`` (unload).

Names are printed raw inside double quotes, as the kernel's ``%s`` does (a policy name never
holds a newline, so one record stays one line); digests are the SHA-256 of the submitted blob in
uppercase hex; versions are ``%hu.%hu.%hu``.  A full line is ``type=NNNN
audit(SECONDS.MILLIS:SERIAL): body``; :class:`AuditLog` appends lines to a file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

AUDIT_MAC_STATUS = 1404
AUDIT_TRUSTED_APP = 1121  # user-space message type: records lost, the seal, attempts refused by it
AUDIT_IPE_CONFIG_CHANGE = 1421
AUDIT_IPE_POLICY_LOAD = 1422

UNSET_ID = 4294967295  # (u32)-1: what the kernel prints for an unset auid or session id
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest().upper()
_LOG_MODE = 0o640


@dataclass(frozen=True)
class AuditIdentity:
    """Who made the change: the login uid and session id of the process."""

    auid: int = UNSET_ID
    ses: int = UNSET_ID

    @classmethod
    def from_proc(cls, proc_self: Path = Path("/proc/self")) -> "AuditIdentity":
        """Read /proc/self/loginuid and /proc/self/sessionid (unset or unreadable: 4294967295)."""
        return cls(_read_id(proc_self / "loginuid"), _read_id(proc_self / "sessionid"))

    def fields(self) -> str:
        return f"auid={self.auid} ses={self.ses}"


def _read_id(path: Path) -> int:
    try:
        value = int(path.read_text().strip())
    except (OSError, ValueError):
        return UNSET_ID
    return value if 0 <= value <= UNSET_ID else UNSET_ID


@dataclass(frozen=True)
class PolicyRef:
    """What a record says about one policy: raw name, version, SHA-256 of the submitted blob."""

    name: bytes
    version: tuple[int, int, int]
    digest: bytes  # the 32 raw bytes of SHA-256(submitted blob)

    @classmethod
    def of_blob(cls, name: bytes, version: tuple[int, int, int], blob: bytes) -> "PolicyRef":
        return cls(name, version, hashlib.sha256(blob).digest())


def _quoted(name: bytes) -> str:
    """A name printed raw inside quotes; bytes that are not UTF-8 survive via surrogateescape."""
    return '"' + name.decode("utf-8", "surrogateescape") + '"'


def _version(version: tuple[int, int, int]) -> str:
    return "%d.%d.%d" % version


def _digest(digest: bytes) -> str:
    return "sha256:" + digest.hex().upper()


def config_change(old: PolicyRef | None, new: PolicyRef, who: AuditIdentity) -> str:
    """The body of a 1421 record: the active policy changed from ``old`` to ``new``."""
    if old is None:
        old_fields = "old_active_pol_name=? old_active_pol_version=? old_policy_digest=?"
    else:
        old_fields = (f"old_active_pol_name={_quoted(old.name)} "
                      f"old_active_pol_version={_version(old.version)} "
                      f"old_policy_digest={_digest(old.digest)}")
    new_fields = (f"new_active_pol_name={_quoted(new.name)} "
                  f"new_active_pol_version={_version(new.version)} "
                  f"new_policy_digest={_digest(new.digest)}")
    return f"{old_fields} {new_fields} {who.fields()} lsm=ipe res=1"


def policy_load(policy: PolicyRef, who: AuditIdentity) -> str:
    """The body of a 1422 record: ``policy`` was deployed or updated."""
    errno_field = " errno=0" if load_record_has_errno() else ""
    return (f"policy_name={_quoted(policy.name)} policy_version={_version(policy.version)} "
            f"policy_digest={_digest(policy.digest)} {who.fields()} lsm=ipe res=1{errno_field}")


def load_record_has_errno(release: str | None = None) -> bool:
    """Whether 1422 records end with ``errno=``: kernel IPE's format from Linux 6.15 on.  A record
    format is not a feature a program can probe, so the kernel release decides, so that
    ipe-bpf's records read like the running kernel's own (``$IPE_BPF_AUDIT_ERRNO`` = 0 or 1
    overrides)."""
    forced = os.environ.get("IPE_BPF_AUDIT_ERRNO")
    if forced in ("0", "1"):
        return forced == "1"
    parts = (release or os.uname().release).split(".")
    try:
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (6, 15)
    except (IndexError, ValueError):
        return True  # an unreadable release: the current format


def mac_status(enforcing: bool, old_enforcing: bool, who: AuditIdentity) -> str:
    """The body of a 1404 record: enforce changed from ``old_enforcing`` to ``enforcing``."""
    return (f"enforcing={int(enforcing)} old_enforcing={int(old_enforcing)} {who.fields()} "
            f"enabled=1 old-enabled=1 lsm=ipe res=1")


def sealed(sealed_at_ns: int, pid: int, comm: str, who: AuditIdentity) -> str:
    """The body of a 1121 record: ipe-bpf was sealed until reboot (docs/seal.md)."""
    return (f"op=seal sealed_at={sealed_at_ns // 1_000_000_000} pid={pid} comm={_quoted(comm.encode())} "
            f"{who.fields()} lsm=ipe res=1")


def seal_refused(attempt: str, pid: int, comm: str, who: AuditIdentity) -> str:
    """The body of a 1121 record: the control plane refused ``attempt`` (e.g. ``policy
    activate``) because ipe-bpf is sealed."""
    return (f"op=seal_refused attempt={_quoted(attempt.encode())} pid={pid} "
            f"comm={_quoted(comm.encode())} {who.fields()} lsm=ipe res=0")


def lsm_switched(enabled: bool, enforcing: bool, who: AuditIdentity) -> str:
    """The body of the 1404 record of ``load`` (``enabled``) or ``unload``: the LSM went on or
    off, in mode ``enforcing``, with the fields the kernel uses for an LSM switched on or off."""
    e, on = int(enforcing), int(enabled)
    return (f"enforcing={e} old_enforcing={e} {who.fields()} enabled={on} old-enabled={1 - on} "
            f"lsm=ipe res=1")


def records_lost(count: int | None, reason: str, sink: str | None = None) -> str:
    """The body of a 1121 record: ``count`` records (None: unknown) never reached the durable
    log (``sink`` None) or one sink, and why."""
    where = "" if sink is None else f" sink={sink}"
    return f"op=lost lost={'?' if count is None else count} reason={reason}{where} lsm=ipe res=0"


@dataclass(frozen=True)
class Record:
    """One audit record, not yet stamped with a time and serial."""

    type: int
    body: str

    def line(self, time_ns: int, serial: int) -> str:
        """``type=NNNN audit(SECONDS.MILLIS:SERIAL): body`` (no newline)."""
        seconds, rest = divmod(time_ns, 1_000_000_000)
        return f"type={self.type} audit({seconds}.{rest // 1_000_000:03d}:{serial}): {self.body}"


@dataclass(frozen=True)
class AuditLog:
    """An append-only file of audit lines, one record a line."""

    path: Path

    def append(self, lines: Sequence[str]) -> None:
        """Append ``lines`` in one write and fsync them (raw bytes of names preserved)."""
        if not lines:
            return
        data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _LOG_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def lines(self) -> list[str]:
        """Every line of the log (for tests and `audit` readers); [] if there is no log yet."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        text = data.decode("utf-8", "surrogateescape")
        lines = text.split("\n")  # not splitlines(): a raw name may hold \x1c, \x85, ...
        if lines[-1] == "":
            lines.pop()
        return lines
