"""The audit daemon's state for ``ipe-bpf status`` and ``ipe-bpf service status``."""

from __future__ import annotations

import json
import time

from .config import Config
from .durable import writer_pid


STATUS = "auditd.status"  # in the run dir, written by the daemon


def daemon_status(cfg: Config) -> dict[str, object]:
    """``running``, ``pid``, and the daemon's last status report with its age.

    The report (``<run dir>/auditd.status``, rewritten every second) says how many records
    wait in the ring buffer (``ring_pending``), how far behind each sink is (``lag_bytes``),
    and what was written and lost; a report from a daemon that is no longer running is marked
    ``stale``.
    """
    pid = writer_pid(cfg.log_file)
    out: dict[str, object] = {"running": pid is not None, "pid": pid, "log": str(cfg.log_file)}
    try:
        report = json.loads((cfg.run_dir / STATUS).read_text())
    except (OSError, ValueError):
        return out
    out["report"] = report
    out["report_age_seconds"] = round(time.time() - int(report.get("updated_ns", 0)) / 1e9, 1)
    out["stale"] = pid is None or report.get("pid") != pid
    return out
