"""The policy lifecycle: deploy, activate, update, delete, list, enforce, success_audit.

Each operation follows kernel IPE's securityfs behaviour (docs/design.md, section 5), with the same errno
names, in the same order:

- ``deploy``: signature (``ENOKEY``, ``EKEYREJECTED``, ``EBADMSG``, ...; plain text only when
  unsigned policies are explicitly allowed) -> parse (``EBADMSG``/``EINVAL``/``ERANGE``) ->
  ``EEXIST`` if a policy of that name is deployed.  Beyond IPE: ``ESTALE`` if the version is
  lower than the highest ever seen for that name, or equal to it with a different policy text
  (re-deploying the very same text is fine).  Deploying never activates.  Emits 1422.
- ``activate``: ``ENOENT`` if not deployed; no-op if already active; ``EINVAL`` if the active
  policy (of any name) has a greater version; else installs it and emits 1421.
- ``update``: ``ENOENT`` -> signature/parse errors -> ``EINVAL`` if the name differs ->
  ``ESTALE`` if the version is not greater.  Emits 1422; if the old one was active the new one is
  installed at once and 1421 is emitted too.
- ``delete``: ``ENOENT`` if absent, ``EPERM`` if active.  There is no way back to "no policy".
- ``set_enforce`` emits 1404 when the value changes; ``set_success_audit`` emits nothing.

The kernel is reached only through a :class:`PolicyTarget` (the pinned BPF maps in production,
a fake in tests), or not at all when enforcement is not loaded: then every choice is recorded in
the store and :meth:`Lifecycle.apply_active` pushes it to the kernel when ``ipe-bpf load`` runs.
Nothing is half-changed: the kernel is changed before the store; if the kernel refuses, the
store is untouched, and if the store cannot be written, the kernel is put back.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..audit.control_log import ControlLog
from ..audit.policy_records import (
    AUDIT_IPE_CONFIG_CHANGE,
    AUDIT_IPE_POLICY_LOAD,
    AUDIT_MAC_STATUS,
    AuditIdentity,
    PolicyRef,
    Record,
    config_change,
    mac_status,
    policy_load,
)
from ..errors import IpeBpfError, KernelError, LifecycleError
from ..policy.model import text
from .results import Listing, Outcome, PolicyInfo
from .store import PolicyStore, StoredPolicy, StoreState, version_text
from .features import KernelFeatures, unevaluable, unevaluable_effects

if TYPE_CHECKING:  # signatures, parsing and compiling are imported by what uses them: `status` needs none
    from ..policy.compiler import Tables
    from .submission import Compiled, Submission, Trust

__all__ = ["Lifecycle", "Listing", "Outcome", "PolicyInfo", "PolicyTarget", "policy_name"]


@runtime_checkable
class PolicyTarget(Protocol):
    """What the lifecycle needs from the kernel side (PinnedPolicyMaps, or a fake)."""

    def install(self, tables: Tables, generation: int) -> None:
        """Write ``tables`` into the inactive slot, then flip to it atomically."""

    def set_enforce(self, enforce: bool) -> None: ...

    def set_success_audit(self, enabled: bool) -> None: ...


# ---------------------------------------------------------------------------- helpers


def _quote(name: bytes) -> str:
    return f'"{text(name)}"'


def _ref(policy: StoredPolicy) -> PolicyRef:
    return PolicyRef(policy.name, policy.version, bytes.fromhex(policy.digest))


def _version_key(version: tuple[int, int, int]) -> int:
    a, b, c = version
    return (a << 32) | (b << 16) | c


def _stored_content(policy: StoredPolicy, blob: bytes) -> bytes:
    from ..policy import signing

    return signing.extract_content(blob) if policy.signed else blob


def _check_rollback(state: StoreState, sub: Submission) -> None:
    """Beyond IPE: never go below the highest version ever seen, nor change a version's text."""
    known = state.highest.get(sub.name)
    if known is None:
        return
    name, version = _quote(sub.name), sub.version_text
    if _version_key(sub.version) < _version_key(known.version):
        raise LifecycleError("ESTALE", f"policy {name} version {version} is older than "
                             f"{version_text(known.version)}, the highest ever deployed "
                             f"(rollback protection)")
    if sub.version == known.version and sub.content_digest != known.content_digest:
        raise LifecycleError("ESTALE", f"policy {name} version {version} was deployed before "
                             f"with different content (raise the version)")


# -------------------------------------------------------------------------- lifecycle


class Lifecycle:
    """Policy lifecycle over a store and, if enforcement is loaded, a kernel target."""

    def __init__(
        self,
        store: PolicyStore,
        target: PolicyTarget | None = None,
        *,
        identity: AuditIdentity | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        kernel: Callable[[], KernelFeatures | None] | None = None,
        control: ControlLog | None = None,
    ) -> None:
        self.store = store
        self.target = target
        self._control = control
        self._kernel = kernel  # what this kernel can evaluate (None: not checked)
        self._identity = identity
        self._clock_ns = clock_ns
        self._rule_texts: dict[int, tuple[str, ...]] = {}

    @property
    def identity(self) -> AuditIdentity:
        if self._identity is None:
            self._identity = AuditIdentity.from_proc()
        return self._identity

    @property
    def loaded(self) -> bool:
        return self.target is not None

    @property
    def control(self) -> ControlLog:
        """Where records go: the per-boot serials, the store's audit.log, the daemon's spool."""
        if self._control is None:
            self._control = ControlLog.default(self.store.audit_log_path)
        return self._control

    # ------------------------------------------------------------------- queries

    def state(self) -> StoreState:
        with self.store.locked(shared=True):
            return self.store.load()

    def list(self) -> Listing:
        state = self.state()
        infos = tuple(PolicyInfo.of(p, state) for p in state.policies)
        active = next((info for info in infos if info.active), None)
        return Listing(infos, active, state.enforce, state.success_audit)

    def rule_texts(self, generation: int) -> tuple[str, ...] | None:
        """Rule index -> rule text of the policy installed as ``generation`` (None if unknown).

        Covers deployed policies and the last few replaced or deleted ones, so records still in
        the ring buffer after an update decode with the rules they were decided by.
        """
        cached = self._rule_texts.get(generation)
        if cached is not None:
            return cached
        with self.store.locked(shared=True):
            policy = self.store.load().by_generation(generation)
            if policy is None:
                return None
            texts = self._rule_texts_stored(policy)
        self._rule_texts[generation] = texts
        return texts

    # ------------------------------------------------------------------- operations

    def deploy(self, blob: bytes, trust: Trust, *, allow_unsigned: bool = False,
               source: str | None = None, allow_unevaluable: bool = False,
               activate: bool = False, compiled: Compiled | None = None) -> Outcome:
        """Store a new policy; with ``activate``, also make it the active one, in one commit
        (both or neither).  ``source`` names the blob in errors; ``compiled``, the policy
        compiled on a build host, spares parsing and compiling it here (submission.py)."""
        from .submission import open_submission

        sub = open_submission(blob, trust, allow_unsigned=allow_unsigned, source=source, compiled=compiled)
        accepted = self._check_evaluable(sub, allow_unevaluable)
        with self.store.locked():
            state = self.store.load()
            if state.find(sub.name) is not None:
                raise LifecycleError("EEXIST", f"policy {_quote(sub.name)} is already "
                                     f"deployed (delete it or use update)")
            _check_rollback(state, sub)
            stored = self._new_record(state, sub)
            records = [Record(AUDIT_IPE_POLICY_LOAD, policy_load(_ref(stored), self.identity))]
            new_state, applied = state.with_deployed(stored), False
            old = state.active_policy()
            if activate:
                _check_not_older(old, stored)
                records.append(self._activation_record(old, stored))
                new_state = replace(new_state, active=stored.name)
                applied = self._install(sub.tables, stored.generation)
            outcome = self._commit(state, new_state, records, stored, applied=applied,
                                   blobs={stored.blob_name: sub.blob}, caches=_tables_cache(stored, sub),
                                   undo=lambda: self._restore(old))
            return replace(outcome, warnings=(*sub.warnings, *accepted, *outcome.warnings))

    def activate(self, name: bytes) -> Outcome:
        """Make ``name`` the active policy (installed now if loaded, else at `load`)."""
        with self.store.locked():
            state = self.store.load()
            policy = state.find(name)
            if policy is None:
                raise LifecycleError("ENOENT", f"policy {_quote(name)} is not deployed")
            if state.active == name:
                return Outcome(PolicyInfo.of(policy, state), changed=False, applied=False)
            old = state.active_policy()
            _check_not_older(old, policy)
            records = [self._activation_record(old, policy)]
            applied = self._install(self._stored_tables(policy), policy.generation)
            return self._commit(state, replace(state, active=name), records, policy,
                                applied=applied, undo=lambda: self._restore(old))

    def update(self, name: bytes, blob: bytes, trust: Trust, *,
               allow_unsigned: bool = False, source: str | None = None,
               allow_unevaluable: bool = False, compiled: Compiled | None = None) -> Outcome:
        """Replace deployed policy ``name`` with a strictly newer version of itself."""
        with self.store.locked():
            state = self.store.load()
            old = state.find(name)
            if old is None:
                raise LifecycleError("ENOENT", f"policy {_quote(name)} is not deployed")
            from .submission import open_submission

            sub = open_submission(blob, trust, allow_unsigned=allow_unsigned, source=source, compiled=compiled)
            accepted = self._check_evaluable(sub, allow_unevaluable)
            if sub.name != name:
                raise LifecycleError("EINVAL", f"the new policy is named {_quote(sub.name)},"
                                     f" not {_quote(name)}")
            if _version_key(sub.version) <= _version_key(old.version):
                raise LifecycleError("ESTALE", f"version {sub.version_text} is not greater "
                                     f"than {version_text(old.version)}, the deployed version of "
                                     f"{_quote(name)}")
            _check_rollback(state, sub)
            stored = self._new_record(state, sub)
            records = [Record(AUDIT_IPE_POLICY_LOAD, policy_load(_ref(stored), self.identity))]
            applied = False
            was_active = state.active == name
            if was_active:
                records.append(self._activation_record(old, stored))
                applied = self._install(sub.tables, stored.generation)
            outcome = self._commit(state, state.with_deployed(stored), records, stored,
                                   applied=applied, blobs={stored.blob_name: sub.blob},
                                   caches=_tables_cache(stored, sub),
                                   undo=lambda: self._restore(old))
            return replace(outcome, warnings=(*sub.warnings, *accepted, *outcome.warnings))

    def delete(self, name: bytes) -> Outcome:
        """Remove a deployed policy that is not active."""
        with self.store.locked():
            state = self.store.load()
            policy = state.find(name)
            if policy is None:
                raise LifecycleError("ENOENT", f"policy {_quote(name)} is not deployed")
            if state.active == name:
                raise LifecycleError("EPERM", f"policy {_quote(name)} is active (activate another "
                                     f"policy first; there is no way back to no policy)")
            info = PolicyInfo.of(policy, state)
            self._commit(state, state.without(name), [], policy, applied=False)
            return Outcome(info, changed=True, applied=False)

    def set_enforce(self, enforce: bool) -> Outcome:
        """Enforcing (True) or permissive (False); 1404 only if the value changes."""
        with self.store.locked():
            state = self.store.load()
            applied = self._push(lambda t: t.set_enforce(enforce))
            if state.enforce == enforce:
                return Outcome(None, changed=False, applied=applied)
            records = [Record(AUDIT_MAC_STATUS, mac_status(enforce, state.enforce, self.identity))]
            return self._commit(state, replace(state, enforce=enforce), records, None,
                                applied=applied,
                                undo=lambda: self._push(lambda t: t.set_enforce(state.enforce), quiet=True))

    def set_success_audit(self, enabled: bool) -> Outcome:
        """Audit allowed events too (True) or only denials (False); no audit record."""
        with self.store.locked():
            state = self.store.load()
            applied = self._push(lambda t: t.set_success_audit(enabled))
            if state.success_audit == enabled:
                return Outcome(None, changed=False, applied=applied)
            return self._commit(state, replace(state, success_audit=enabled), [], None,
                                applied=applied, undo=lambda: self._push(
                                    lambda t: t.set_success_audit(state.success_audit), quiet=True))

    def apply_active(self, target: PolicyTarget, *, enforce: bool | None = None) -> PolicyInfo | None:
        """Push the recorded settings and active policy into a freshly loaded kernel.

        For the loader to call once the maps exist (``ipe-bpf load``): sets enforce and
        success_audit first (so the first decision is already in the right mode), then installs
        the active policy under its generation.  ``enforce``, if given, is the boot-time mode
        (``load --permissive`` passes False, a plain ``load`` True, like ``ipe.enforce=``): it
        is recorded without a 1404 record, as the kernel logs none for the command line.
        Otherwise the recorded mode is used.  Emits no audit record.  Returns the installed
        policy, or None if none is active (then everything stays allowed, as in IPE).
        """
        with self.store.locked():
            state = self.store.load()
            mode = state.enforce if enforce is None else enforce
            _call_target(lambda: target.set_enforce(mode))
            _call_target(lambda: target.set_success_audit(state.success_audit))
            if mode != state.enforce:
                self.store.commit(replace(state, enforce=mode))
            policy = state.active_policy()
            if policy is None:
                return None
            _call_target(lambda: target.install(self._stored_tables(policy), policy.generation))
            return PolicyInfo.of(policy, state)

    def rule_text(self, generation: int, index: int) -> str | None:
        """The text of rule ``index`` of policy ``generation``: an audit.record.RuleLookup."""
        texts = self.rule_texts(generation)
        if texts is None or not 0 <= index < len(texts):
            return None
        return texts[index]

    # ------------------------------------------------------------------- internals

    def _check_evaluable(self, sub: Submission, allow: bool) -> tuple[str, ...]:
        """EOPNOTSUPP for a policy using properties this kernel cannot evaluate (FALSE for every
        file here), unless allowed: it must never be evaluated differently without the admin
        saying so.  Allowed: a warning per property, naming the rules it changes."""
        found = self._kernel() if self._kernel is not None else None
        missing = unevaluable(sub.properties, found) if found is not None else ()
        release = os.uname().release
        if missing and not allow:
            what = "; ".join(f"{p.property}: {p.how}" for p in missing)
            raise LifecycleError("EOPNOTSUPP", f"policy {_quote(sub.name)} uses "
                                 f"{', '.join(p.property for p in missing)}, which this kernel "
                                 f"({release}) cannot evaluate ({what}): it would evaluate as FALSE "
                                 f"for every file, and rules testing it would decide differently "
                                 f"than written; --allow-unevaluable accepts that")
        return tuple(f"--allow-unevaluable: {p.property} is always FALSE on this kernel ({release}: "
                     f"{p.how}); rules it changes: {unevaluable_effects(sub.policy, p)}" for p in missing)

    def _new_record(self, state: StoreState, sub: Submission) -> StoredPolicy:
        return StoredPolicy(
            name=sub.name,
            version=sub.version,
            digest=sub.digest,
            content_digest=sub.content_digest,
            generation=state.next_generation,
            signed=sub.signed,
            signer=sub.signer,
            deployed_at=self._now_iso(),
        )

    def _now_iso(self) -> str:
        moment = dt.datetime.fromtimestamp(self._clock_ns() / 1e9, dt.timezone.utc)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _stored_tables(self, policy: StoredPolicy) -> Tables:
        """The tables deploy kept for ``policy`` if they still fit, else compiled from its text."""
        from ..policy import tables_file
        from ..policy.compiler import compile_policy, default_abi
        from ..policy.parser import parse_policy

        blob = self.store.blob(policy)  # EUCLEAN if the policy itself was changed on disk
        kept = self.store.tables(policy)
        found = None if kept is None else tables_file.read(kept, policy.content_digest, default_abi())
        if found is not None:
            return found
        return compile_policy(parse_policy(_stored_content(policy, blob))).tables

    def _rule_texts_stored(self, policy: StoredPolicy) -> tuple[str, ...]:
        from ..policy.parser import parse_policy

        return tuple(map(str, parse_policy(_stored_content(policy, self.store.blob(policy))).rules))

    def _activation_record(self, old: StoredPolicy | None, new: StoredPolicy) -> Record:
        """The 1421 record of ``new`` becoming the active policy in place of ``old``."""
        return Record(AUDIT_IPE_CONFIG_CHANGE, config_change(_ref(old) if old else None, _ref(new), self.identity))

    def _install(self, tables: Tables, generation: int) -> bool:
        return self._push(lambda t: t.install(tables, generation))

    def _push(self, action: Callable[[PolicyTarget], None], *, quiet: bool = False) -> bool:
        """Run ``action`` on the target if loaded; True if it ran."""
        if self.target is None:
            return False
        target = self.target
        try:
            _call_target(lambda: action(target))
        except IpeBpfError:
            if not quiet:
                raise
        return True

    def _commit(
        self,
        state: StoreState,
        new_state: StoreState,
        records: Sequence[Record],
        policy: StoredPolicy | None,
        *,
        applied: bool,
        blobs: dict[str, bytes] | None = None,
        caches: dict[str, bytes] | None = None,
        undo: Callable[[], object] | None = None,
    ) -> Outcome:
        """Commit ``new_state``, then append the records (serials from the per-boot sequence,
        taken before the commit).

        If the commit fails after the kernel was changed (``applied``), ``undo`` puts the kernel
        back as it was.
        """
        try:
            lines = self.control.stamp(records, self._clock_ns())
            self.store.commit(new_state, blobs, caches)
        except IpeBpfError:
            if applied and undo is not None:
                undo()
            raise
        warnings = self.control.append(lines)
        info = PolicyInfo.of(policy, new_state) if policy is not None else None
        return Outcome(info, changed=True, applied=applied, records=lines, warnings=warnings)

    def _restore(self, policy: StoredPolicy | None) -> None:
        """Put the kernel back on ``policy`` (None: no policy, if the target can do that)."""
        try:
            if policy is not None:
                self._install(self._stored_tables(policy), policy.generation)
            elif self.target is not None and hasattr(self.target, "deactivate"):
                _call_target(self.target.deactivate)
        except IpeBpfError:
            pass  # the original error is the one to report


def _check_not_older(active: StoredPolicy | None, policy: StoredPolicy) -> None:
    """Activation never goes back to a lower version than the active policy's (EINVAL)."""
    if active is not None and _version_key(active.version) > _version_key(policy.version):
        raise LifecycleError("EINVAL", f"the active policy {_quote(active.name)} has version "
                             f"{version_text(active.version)}, greater than "
                             f"{version_text(policy.version)} of {_quote(policy.name)}")


def _tables_cache(stored: StoredPolicy, sub: Submission) -> dict[str, bytes]:
    """The submission's tables, kept so that activate compiles nothing (a cache: no fsync)."""
    from ..policy import tables_file

    kept = sub.tables_file or tables_file.write(sub.tables, stored.content_digest)
    return {stored.tables_name: kept}


def _call_target(call: Callable[[], None]) -> None:
    """Run a kernel call; OSError becomes KernelError with its errno name."""
    try:
        call()
    except IpeBpfError:
        raise
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "EIO")
        raise KernelError(name, f"the kernel refused the change: {exc.strerror or exc}") from None


def policy_name(name: str) -> bytes:
    """A policy name from the command line as the raw bytes the policy text holds."""
    return os.fsencode(name)
