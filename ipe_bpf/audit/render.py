"""Render ring-buffer records as audit text or JSON lines (docs/audit-records.md): decisions
(AccessRecord) as IPE's 1420, refused attempts against the seal (SealRecord) as 1121."""

from __future__ import annotations

import json

from ..policy.model import untrusted
from .policy_records import AUDIT_TRUSTED_APP
from .record import AccessRecord, SealRecord

AUDIT_IPE_ACCESS = 1420


def ipe_fields(r: AccessRecord) -> str:
    """The body of a 1420 record, fields in the spec's exact order."""
    if r.path is None:
        where = "path=? dev=? ino=?"
    else:
        dev = "?" if r.dev is None else untrusted(r.dev)
        where = f"path={untrusted(r.path)} dev={dev} ino={r.ino}"
    return (
        f"ipe_op={r.op} ipe_hook={r.hook} enforcing={1 if r.enforcing else 0} pid={r.pid} "
        f"comm={untrusted(r.comm)} {where} rule=\"{r.rule}\""
    )


def ipe_text(r: AccessRecord, serial: int) -> str:
    """A full audit line: `type=1420 audit(<sec>.<msec>:<serial>): <fields>`."""
    sec = int(r.timestamp)
    msec = int((r.timestamp - sec) * 1000)
    return f"type={AUDIT_IPE_ACCESS} audit({sec}.{msec:03d}:{serial}): {ipe_fields(r)}"


def _text(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8", "backslashreplace")


def json_line(r: AccessRecord, serial: int) -> str:
    return json.dumps(
        {
            "type": AUDIT_IPE_ACCESS,
            "serial": serial,
            "time": round(r.timestamp, 6),
            "ipe_op": r.op,
            "ipe_hook": r.hook,
            "enforcing": 1 if r.enforcing else 0,
            "pid": r.pid,
            "comm": _text(r.comm),
            "path": _text(r.path),
            "path_is_name_only": r.path_is_name_only,
            "dev": _text(r.dev),
            "ino": r.ino,
            "rule": r.rule,
            "action": r.action,
            "source": r.source,
            "rule_index": r.rule_index,
            "generation": r.generation,
            "uid": r.uid,
            "auid": r.auid,
            "ses": r.ses,
            "exe": _text(r.exe),
        },
        sort_keys=False,
    )


# ------------------------------------------------------------------ refused attempts (seal)


def seal_fields(r: SealRecord) -> str:
    """The body of a refused attempt: what, on what, and who (docs/seal.md)."""
    target = "?" if r.target is None else untrusted(r.target)
    ident = "?" if r.object_id is None else str(r.object_id)
    exe = "?" if r.exe is None else untrusted(r.exe)
    return (f"op=seal_refused attempt={r.attempt} detail={r.detail} target={target} id={ident} "
            f"pid={r.pid} comm={untrusted(r.comm)} uid={r.uid} auid={r.auid} ses={r.ses} exe={exe} "
            f"lsm=ipe res=0")


def seal_text(r: SealRecord, serial: int) -> str:
    sec = int(r.timestamp)
    msec = int((r.timestamp - sec) * 1000)
    return f"type={AUDIT_TRUSTED_APP} audit({sec}.{msec:03d}:{serial}): {seal_fields(r)}"


def seal_json(r: SealRecord, serial: int) -> str:
    return json.dumps({"type": AUDIT_TRUSTED_APP, "serial": serial, "time": round(r.timestamp, 6),
                       "op": "seal_refused", "attempt": r.attempt, "detail": r.detail,
                       "target": _text(r.target), "id": r.object_id, "pid": r.pid, "comm": _text(r.comm),
                       "uid": r.uid, "auid": r.auid, "ses": r.ses, "exe": _text(r.exe)})


def any_text(r: "AccessRecord | SealRecord", serial: int) -> str:
    return seal_text(r, serial) if isinstance(r, SealRecord) else ipe_text(r, serial)


def any_json(r: "AccessRecord | SealRecord", serial: int) -> str:
    return seal_json(r, serial) if isinstance(r, SealRecord) else json_line(r, serial)
