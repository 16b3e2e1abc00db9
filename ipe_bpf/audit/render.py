"""Render AccessRecords as IPE's 1420 text (docs/audit-records.md) or as JSON lines."""

from __future__ import annotations

import json

from ..policy.model import untrusted
from .record import AccessRecord

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
