"""fapolicyd (the guest's Debian package) as a peer in benchmarks/report_guest.py.

fapolicyd judges `open` and `execve` through fanotify permission events (FAN_OPEN_PERM,
FAN_OPEN_EXEC_PERM) answered by its daemon in user space; it sees no mmap.  Here it runs with
the file trust backend only: a trust database of the benchmark's own files (path, size, sha256,
`integrity = sha256`) plus filler entries up to the policy size, and rules that look every
access up in it and deny executing anything untrusted on the benchmark's scratch mount:

    allow perm=any all : trust=1
    deny_audit perm=execute all : dir=/mnt/ipe-bench/
    allow perm=any all : all

It is started by the benchmark (never at boot: the image leaves its unit disabled) and is ready
once an untrusted copy of the helper on the scratch mount is refused.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

ETC = Path("/etc/fapolicyd")
DB = Path("/var/lib/fapolicyd")
RUN = Path("/run/fapolicyd")
SCRATCH = "/mnt/ipe-bench/"
RULES = f"allow perm=any all : trust=1\ndeny_audit perm=execute all : dir={SCRATCH}\nallow perm=any all : all\n"


def _conf(entries: int) -> str:
    db_mb = max(50, entries * 400 // (1 << 20) + 50)  # lmdb's map size: generous per entry
    return (f"permissive = 0\nnice_val = 0\nq_size = 800\nuid = fapolicyd\ngid = fapolicyd\n"
            f"do_stat_report = 0\ndetailed_report = 0\ndb_max_size = {db_mb}\nsubj_cache_size = 1549\n"
            f"obj_cache_size = 8191\nwatch_fs = ext4,tmpfs\ntrust = file\nintegrity = sha256\n"
            f"syslog_format = rule,dec,perm,pid,exe,:,path,trust\nrpm_sha256_only = 0\n"
            f"allow_filesystem_mark = 0\nreport_interval = 0\n")


def _trust_line(path: Path) -> str:
    data = path.read_bytes()
    return f"{path} {len(data)} {hashlib.sha256(data).hexdigest()}\n"


def write_config(files: list[Path], entries: int, rng: random.Random) -> None:
    """Rules, configuration and a trust database of `files` plus filler up to `entries`."""
    ETC.mkdir(parents=True, exist_ok=True)
    for name in ("compiled.rules", "fapolicyd.rules"):
        (ETC / name).write_text(RULES)
    (ETC / "fapolicyd.conf").write_text(_conf(entries))
    shutil.rmtree(ETC / "trust.d", ignore_errors=True)
    with open(ETC / "fapolicyd.trust", "w") as out:
        for f in files:
            out.write(_trust_line(f))
        for i in range(max(0, entries - len(files))):
            out.write(f"/opt/filler/{i:07d} 4096 {rng.getrandbits(256):064x}\n")
    for d in (DB, RUN):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        shutil.chown(d, "fapolicyd", "fapolicyd")


class Fapolicyd:
    """The daemon in the foreground (--debug-deny: only denials are logged)."""

    def __init__(self, helper: Path, untrusted: Path, log: Path) -> None:
        self.helper, self.untrusted, self.log = helper, untrusted, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    def start(self, timeout: float = 1800) -> None:
        t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["fapolicyd", "--debug-deny"], stdout=log, stderr=log,
                                         start_new_session=True)
        while subprocess.run([self.helper, "exec", self.untrusted, "true"]).returncode == 0:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fapolicyd exited with {self.proc.returncode} (log: {self.log})")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("fapolicyd never started refusing")
            time.sleep(0.2)
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
