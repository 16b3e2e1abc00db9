"""The on-disk policy store: what is deployed, what is active, and rollback memory.

Layout under the state directory (``/var/lib/ipe-bpf``, or ``$IPE_BPF_STATE_DIR``)::

    state.json            every fact below, rewritten whole on each change
    policies/<sha256>.p7s the blob each deployed policy was submitted as (signed)
    policies/<sha256>.pol ... or its text (deployed with --unsigned)
    lock                  fcntl.flock'ed by every ipe-bpf process that reads or changes the store
    audit.log             control-plane audit records (see ipe_bpf.audit.policy_records)

``state.json`` holds the deployed policies (raw name, version, SHA-256 of the submitted blob and of
the policy text, generation, signer), the active policy's name, the enforce and success_audit
settings, the next generation number, and the highest version ever seen per
policy name together with the digest of its text.  That last table is never pruned: rollback
protection survives deletes and reboots.

Crash safety: blobs are written first (tmp file, fsync, rename), then ``state.json`` the same way;
the rename of ``state.json`` is the single commit point.  A crash leaves either the old state or
the new one, at worst with an unreferenced blob, which the next commit removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import LifecycleError

DEFAULT_STATE_DIR = Path("/var/lib/ipe-bpf")
STATE_DIR_ENV = "IPE_BPF_STATE_DIR"
FORMAT = 1
RETIRED_KEEP = 16  # replaced/deleted policies kept so audit records of their generation decode

Version = tuple[int, int, int]


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The state directory: ``$IPE_BPF_STATE_DIR`` if set and not empty, else /var/lib/ipe-bpf."""
    env = os.environ if environ is None else environ
    override = env.get(STATE_DIR_ENV)
    return Path(override) if override else DEFAULT_STATE_DIR


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_text(version: Version) -> str:
    return "%d.%d.%d" % version


def _parse_version(value: str) -> Version:
    parts = tuple(int(p) for p in value.split("."))
    if len(parts) != 3 or not all(0 <= p <= 0xFFFF for p in parts):
        raise ValueError(f"bad version {value!r}")
    return parts  # type: ignore[return-value]


# ------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class StoredPolicy:
    """One deployed (or retired) policy as the store remembers it."""

    name: bytes
    version: Version
    digest: str  # sha256 hex of the submitted blob (what audit records print)
    content_digest: str  # sha256 hex of the policy text inside it
    generation: int
    signed: bool
    signer: str | None = None
    deployed_at: str = ""  # ISO 8601 UTC

    @property
    def blob_name(self) -> str:
        return f"{self.digest}.{'p7s' if self.signed else 'pol'}"

    @property
    def tables_name(self) -> str:
        """Its compiled tables (policy/tables_file.py): a cache kept while it is deployed."""
        return f"{self.digest}.tables"

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name.hex(),
            "name_text": self.name.decode("utf-8", "backslashreplace"),  # for humans; not read back
            "version": version_text(self.version),
            "digest": self.digest,
            "content_digest": self.content_digest,
            "generation": self.generation,
            "signed": self.signed,
            "signer": self.signer,
            "deployed_at": self.deployed_at,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, object]) -> "StoredPolicy":
        return cls(
            name=bytes.fromhex(str(obj["name"])),
            version=_parse_version(str(obj["version"])),
            digest=_hex_digest(obj["digest"]),
            content_digest=_hex_digest(obj["content_digest"]),
            generation=_positive(obj["generation"]),
            signed=bool(obj["signed"]),
            signer=None if obj.get("signer") is None else str(obj["signer"]),
            deployed_at=str(obj.get("deployed_at", "")),
        )


@dataclass(frozen=True)
class HighWater:
    """The highest version ever seen for one name, and the digest of that version's text."""

    version: Version
    content_digest: str


@dataclass(frozen=True)
class StoreState:
    """Everything the store holds (except blobs), as one immutable value."""

    policies: tuple[StoredPolicy, ...] = ()  # deployed, in deploy order
    active: bytes | None = None
    enforce: bool = True  # like ipe.enforce=1, the kernel's default
    success_audit: bool = False
    highest: Mapping[bytes, HighWater] = field(default_factory=dict)
    next_generation: int = 1
    retired: tuple[StoredPolicy, ...] = ()  # most recent last

    def find(self, name: bytes) -> StoredPolicy | None:
        return next((p for p in self.policies if p.name == name), None)

    def active_policy(self) -> StoredPolicy | None:
        return None if self.active is None else self.find(self.active)

    def by_generation(self, generation: int) -> StoredPolicy | None:
        return next((p for p in (*self.policies, *self.retired) if p.generation == generation), None)

    def referenced_blobs(self) -> set[str]:
        return {p.blob_name for p in (*self.policies, *self.retired)} | {p.tables_name for p in self.policies}

    # Functional updates: every change returns a new state.

    def with_deployed(self, policy: StoredPolicy) -> "StoreState":
        """Add ``policy`` (or replace the one of the same name), remember its version."""
        old = self.find(policy.name)
        policies = tuple(policy if p.name == policy.name else p for p in self.policies)
        if old is None:
            policies = (*policies, policy)
        retired = self.retired if old is None else self._retire(old)
        highest = dict(self.highest)
        known = highest.get(policy.name)
        if known is None or policy.version >= known.version:
            highest[policy.name] = HighWater(policy.version, policy.content_digest)
        return replace(self, policies=policies, retired=retired, highest=highest,
                       next_generation=max(self.next_generation, policy.generation + 1))

    def without(self, name: bytes) -> "StoreState":
        old = self.find(name)
        if old is None:
            return self
        return replace(self, policies=tuple(p for p in self.policies if p.name != name),
                       retired=self._retire(old))

    def _retire(self, policy: StoredPolicy) -> tuple[StoredPolicy, ...]:
        return (*self.retired, policy)[-RETIRED_KEEP:]

    def to_json(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "next_generation": self.next_generation,
            "active": None if self.active is None else self.active.hex(),
            "enforce": self.enforce,
            "success_audit": self.success_audit,
            "highest": {name.hex(): {"version": version_text(hw.version),
                                     "content_digest": hw.content_digest}
                        for name, hw in sorted(self.highest.items())},
            "policies": [p.to_json() for p in self.policies],
            "retired": [p.to_json() for p in self.retired],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, object]) -> "StoreState":
        if obj.get("format") != FORMAT:
            raise ValueError(f"unknown store format {obj.get('format')!r}")
        active = obj.get("active")
        highest_obj = obj.get("highest", {})
        assert isinstance(highest_obj, dict)
        return cls(
            policies=tuple(StoredPolicy.from_json(p) for p in _list(obj.get("policies"))),
            active=None if active is None else bytes.fromhex(str(active)),
            enforce=_bool(obj["enforce"]),
            success_audit=_bool(obj["success_audit"]),
            highest={bytes.fromhex(name): HighWater(_parse_version(str(hw["version"])),
                                                    _hex_digest(hw["content_digest"]))
                     for name, hw in highest_obj.items()},
            next_generation=_positive(obj["next_generation"]),
            retired=tuple(StoredPolicy.from_json(p) for p in _list(obj.get("retired"))),
        )


def _list(value: object) -> list[Mapping[str, object]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _positive(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def _hex_digest(value: object) -> str:
    text = str(value)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"bad sha256 digest {text!r}")
    return text


# ------------------------------------------------------------------------- file writing


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data``: tmp file in the same directory, fsync, rename, fsync dir.

    ``durable=False`` skips the fsync of the file (a cache that is checked when read);
    ``sync_dir=False`` leaves the directory's fsync to the caller (one for several files).
    """
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        _fsync_dir(path.parent)


# ---------------------------------------------------------------------------- the store


class PolicyStore:
    """The state directory.  Use ``with store.locked(): ...`` around every read-modify-write.

    ``locked()`` takes an exclusive ``flock`` on ``lock``; ``locked(shared=True)`` a shared one for
    readers.  ``commit`` may only be called while holding the exclusive lock.
    """

    STATE = "state.json"
    POLICIES = "policies"
    LOCK = "lock"
    AUDIT_LOG = "audit.log"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None
        self._exclusive = False

    @classmethod
    def default(cls) -> "PolicyStore":
        return cls(state_dir())

    @property
    def audit_log_path(self) -> Path:
        return self.root / self.AUDIT_LOG

    @property
    def _state_path(self) -> Path:
        return self.root / self.STATE

    @property
    def _policies_dir(self) -> Path:
        return self.root / self.POLICIES

    def exists(self) -> bool:
        return self._state_path.exists()

    def _ensure_dirs(self) -> None:
        try:
            self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
            self._policies_dir.mkdir(mode=0o755, exist_ok=True)
        except OSError as exc:
            raise LifecycleError(_errno_name(exc), f"cannot create the state directory {self.root}: "
                                 f"{exc.strerror} (run as root, or set {STATE_DIR_ENV})") from None

    @contextlib.contextmanager
    def locked(self, *, shared: bool = False) -> Iterator["PolicyStore"]:
        """Hold the store lock (exclusive unless ``shared``) for the duration of the block.

        A shared lock creates nothing and opens the lock file read-only, so readers work on a
        read-only store; with no lock file (no writer ever ran) it locks nothing.
        Re-entering while already locked is allowed (an exclusive lock covers a shared request).
        """
        if self._lock_fd is not None:
            if not shared and not self._exclusive:
                raise LifecycleError("EDEADLK", "cannot upgrade a shared store lock to exclusive")
            yield self
            return
        if shared:
            fd = self._open_reader_lock()
            if fd is None:  # no store yet, or one no writer ever locked: nothing to wait for
                yield self
                return
        else:
            self._ensure_dirs()
            try:
                fd = os.open(self.root / self.LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise LifecycleError(_errno_name(exc), f"cannot open the store lock in {self.root}: "
                                     f"{exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            self._lock_fd, self._exclusive = fd, not shared
            yield self
        finally:
            self._lock_fd, self._exclusive = None, False
            os.close(fd)  # closing the last fd releases the flock

    def _open_reader_lock(self) -> int | None:
        """The lock file opened read-only (a reader creates nothing: the store may be read-only)."""
        try:
            return os.open(self.root / self.LOCK, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LifecycleError(_errno_name(exc), f"cannot open the store lock in {self.root}: "
                                 f"{exc.strerror}") from None

    def load(self) -> StoreState:
        """The committed state (empty if nothing was ever stored)."""
        try:
            raw = self._state_path.read_bytes()
        except FileNotFoundError:
            return StoreState()
        except OSError as exc:
            raise LifecycleError(_errno_name(exc), f"cannot read {self._state_path}: {exc.strerror}") from None
        try:
            return StoreState.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError, AssertionError, AttributeError) as exc:
            raise LifecycleError("EUCLEAN", f"{self._state_path} is corrupt ({exc}); "
                                 f"it is only ever replaced atomically, so it was edited by hand") from None

    def commit(self, state: StoreState, blobs: Mapping[str, bytes] | None = None,
               caches: Mapping[str, bytes] | None = None) -> None:
        """Make ``state`` the committed state, first writing ``blobs`` (file name -> bytes) and
        ``caches`` (the same, but files a crash may lose: readers check them and do without).

        Files not referenced by the new state are removed afterwards.
        """
        if self._lock_fd is None or not self._exclusive:
            raise LifecycleError("ENOLCK", "store commit without holding the exclusive lock")
        self._ensure_dirs()
        try:
            for name, data in (caches or {}).items():
                write_atomic(self._policies_dir / name, data, durable=False, sync_dir=False)
            for name, data in (blobs or {}).items():
                write_atomic(self._policies_dir / name, data, sync_dir=False)
            _fsync_dir(self._policies_dir)  # every blob in place before the state names them
            payload = json.dumps(state.to_json(), indent=1, sort_keys=False).encode() + b"\n"
            write_atomic(self._state_path, payload, 0o644)
        except OSError as exc:
            raise LifecycleError(_errno_name(exc), f"cannot write the policy store in {self.root}: "
                                 f"{exc.strerror}") from None
        self._collect_garbage(state)

    def _collect_garbage(self, state: StoreState) -> None:
        keep = state.referenced_blobs()
        with contextlib.suppress(OSError):
            for path in self._policies_dir.iterdir():
                if path.name not in keep:
                    with contextlib.suppress(OSError):
                        path.unlink()

    def tables(self, policy: StoredPolicy) -> bytes | None:
        """The compiled tables kept for ``policy``, or None if there are none to read."""
        try:
            return (self._policies_dir / policy.tables_name).read_bytes()
        except OSError:
            return None

    def blob(self, policy: StoredPolicy) -> bytes:
        """The submitted blob of ``policy``, checked against its recorded digest."""
        path = self._policies_dir / policy.blob_name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LifecycleError(_errno_name(exc), f"cannot read stored policy {path}: "
                                 f"{exc.strerror}") from None
        if sha256_hex(data) != policy.digest:
            raise LifecycleError("EUCLEAN", f"stored policy {path} does not match its recorded "
                                 f"digest: it was modified on disk")
        return data
