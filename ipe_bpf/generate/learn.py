"""`policy learn`: the rules that would have allowed what a permissive run denied (audit2allow).

Input: IPE 1420 records, as `ipe-bpf audit tail --json` prints them (JSON lines) or as text in
kernel IPE's format (`... ipe_op=EXECUTE ipe_hook=BPRM_CHECK ... path="..." dev="..." ino=N
rule="DEFAULT op=EXECUTE action=DENY"`, from `audit tail`, the kernel's audit log or dmesg).
A record names a file, not its digest: each denied file is measured here and now (dm-verity
volume, else fs-verity digest); a file replaced since (another inode) is not learned.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IpeBpfError
from ..kernel import measure
from ..policy.evaluate import evaluate
from ..policy.model import Action, Op, Policy
from .emit import Grant, check, merged_text, policy_text
from .plan import Options, Plan, grant_for

_FIELD = re.compile(r'(\w+)=("(?:[^"]*)"|\S+)')
NO_VERITY_HINT = ("has no fs-verity digest and is not on a dm-verity volume: learn with --enable-verity "
                  "(or run `ipe-bpf policy generate --enable-verity` on it)")


@dataclass(frozen=True)
class Denial:
    """One denied access from a record: the op and the file as the record names it."""

    op: str
    path: bytes | None  # None: no file (anonymous memory, kernel_load_data)
    ino: int | None
    name_only: bool = False


def _untrusted(value: str) -> bytes:
    """Undo audit_log_untrustedstring(): "quoted" text, or the bytes in uppercase hex."""
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        return value[1:-1].encode("utf-8", "surrogateescape")
    try:
        return bytes.fromhex(value)
    except ValueError:
        return value.encode("utf-8", "surrogateescape")


def _from_json(obj: dict[str, object]) -> Denial | None:
    rule = str(obj.get("rule", ""))
    denied = obj.get("action") == "DENY" if "action" in obj else rule.endswith("action=DENY")
    if obj.get("type", 1420) != 1420 or not denied:
        return None
    path = obj.get("path")
    ino = obj.get("ino")
    return Denial(str(obj.get("ipe_op", "")),
                  None if path is None else str(path).encode("utf-8", "surrogateescape"),
                  ino if isinstance(ino, int) else None, bool(obj.get("path_is_name_only", False)))


def _from_text(line: str) -> Denial | None:
    if "ipe_op=" not in line or " rule=" not in line:  # only 1420 records have both
        return None
    fields = dict(_FIELD.findall(line[line.index("ipe_op="):]))
    rule = fields.get("rule", "")
    if not rule.rstrip('"').endswith("action=DENY"):
        return None
    path = fields.get("path", "?")
    ino = fields.get("ino", "?")
    return Denial(fields.get("ipe_op", ""), None if path == "?" else _untrusted(path),
                  int(ino) if ino.isdigit() else None)


def parse_records(lines: Iterable[str]) -> list[Denial]:
    """The denials among 1420 records (JSON lines or text); other lines are ignored."""
    found = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            denial = _from_json(obj) if isinstance(obj, dict) else None
        else:
            denial = _from_text(line)
        if denial is not None:
            found.append(denial)
    return found


@dataclass
class Learned:
    grants: list[Grant] = field(default_factory=list)
    unlearnable: list[str] = field(default_factory=list)  # "what: why"
    already: list[str] = field(default_factory=list)  # allowed by the base policy already
    plan: Plan = field(default_factory=Plan)
    text: bytes = b""


def _op(name: str) -> Op | None:
    return Op.__members__.get(name) if name != "UNKNOWN" else None


def _learn_one(d: Denial, options: Options, plan: Plan, base: Policy | None, out: Learned) -> None:
    op = _op(d.op)
    shown = "(no file)" if d.path is None else os.fsdecode(d.path)
    if op is None:
        out.unlearnable.append(f"{d.op} {shown}: no rule can name this op")
        return
    if d.path is None:
        out.unlearnable.append(f"{d.op} {shown}: anonymous memory or a load without a file has no property "
                               f"a rule can allow")
        return
    if d.name_only:
        out.unlearnable.append(f"{d.op} {shown}: the record has only the file's name (path too long)")
        return
    path = os.fsdecode(d.path)
    try:
        st = os.stat(path)
    except OSError as err:
        out.unlearnable.append(f"{d.op} {path}: {err.strerror} here")
        return
    if d.ino is not None and st.st_ino != d.ino:
        out.unlearnable.append(f"{d.op} {path}: replaced since it was audited (inode {d.ino}, now {st.st_ino})")
        return
    try:
        before = measure.measure(Path(path))
    except IpeBpfError as err:
        out.unlearnable.append(f"{d.op} {path}: {err.errno_name}: {err.message}")
        return
    if base is not None and evaluate(base, op, before.attributes()).action is Action.ALLOW:
        out.already.append(f"{d.op} {path}")
        return
    if before.volume is None and before.fsverity is None and not options.enable_verity:
        out.unlearnable.append(f"{d.op} {path}: {NO_VERITY_HINT}")
        return
    refused = len(plan.refused)
    grant = grant_for(path, op, options, plan)
    if len(plan.refused) > refused:
        out.unlearnable.append(f"{d.op} {plan.refused[-1]}")
        return
    out.grants.append(grant)


def learn(denials: list[Denial], options: Options, base_text: bytes | None = None,
          name: str = "learned", version: str = "0.0.1") -> Learned:
    """Grants for every learnable denial, merged into `base_text` (version bumped) if given."""
    out = Learned()
    base = check(base_text) if base_text is not None else None
    seen: set[tuple[str, bytes | None]] = set()
    for d in denials:
        if (d.op, d.path) in seen:
            continue
        seen.add((d.op, d.path))
        _learn_one(d, options, out.plan, base, out)
    header = [f"learned by ipe-bpf policy learn from {len(denials)} denied access(es)"]
    if base_text is not None:
        out.text = merged_text(base_text, out.grants, header)
    else:
        ops = {g.op for g in out.grants} or {Op.EXECUTE}
        out.text = policy_text(name, version, out.grants, header, ops)
    return out


def read_lines(path: Path | None, stdin: Iterable[str]) -> list[str]:
    if path is None:
        return list(stdin)
    try:
        return path.read_text(errors="surrogateescape").splitlines()
    except OSError as err:
        raise IpeBpfError("ENOENT" if isinstance(err, FileNotFoundError) else "EIO",
                          err.strerror or "cannot read", path=str(path)) from None
