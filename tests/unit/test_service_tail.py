"""`audit tail` from the durable log: last N, follow across rotation, many readers, JSON."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from ipe_bpf.service.config import Config
from ipe_bpf.audit.control_log import append_spool
from ipe_bpf.service.durable import LogWriter
from ipe_bpf.service.records import access_lines
from ipe_bpf.service.tail import daemon_pid, tail_log

from .service_fixtures import access


def cfg_for(tmp: Path) -> Config:
    return Config(log_file=tmp / "audit.log", run_dir=tmp / "run", log_max_size=4096, log_keep=100)


def decision(serial: int, **identity: object) -> list[str]:
    return access_lines(access(pid=serial, **identity), serial)  # type: ignore[arg-type]


def test_last_lines_without_follow(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    with LogWriter(cfg.log_file, cfg.log_max_size, cfg.log_keep) as w:
        for serial in range(1, 21):
            w.append(decision(serial))
        out: list[str] = []
        assert daemon_pid(cfg) is not None
        assert tail_log(out.append, cfg, lines=3, poll=0.01) == 3
    assert out == [decision(s)[0] for s in (18, 19, 20)]
    assert daemon_pid(cfg) is None


def test_json_joins_the_companion(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    with LogWriter(cfg.log_file, cfg.log_max_size, cfg.log_keep) as w:
        w.append(decision(7, uid=1000, auid=1000, ses=2, exe=b"/usr/bin/sh"))
    out: list[str] = []
    tail_log(out.append, cfg, as_json=True, poll=0.01)
    assert len(out) == 1
    obj = json.loads(out[0])
    assert (obj["serial"], obj["uid"], obj["exe"], obj["action"]) == (7, 1000, "/usr/bin/sh", "DENY")
    text: list[str] = []
    tail_log(text.append, cfg, poll=0.01)
    assert text == decision(7, uid=1000, auid=1000, ses=2, exe=b"/usr/bin/sh")  # both lines, as logged


def test_two_followers_each_see_every_record_across_rotations(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    seen: list[list[int]] = [[], []]
    done = threading.Event()
    with LogWriter(cfg.log_file, cfg.log_max_size, cfg.log_keep) as w:
        w.append(decision(0))
        readers = [threading.Thread(target=tail_log, args=(lambda t, i=i: seen[i].append(int(t.split(":")[1].split(")")[0])), cfg),
                                    kwargs=dict(follow=True, lines=0, poll=0.005, stop=done.is_set))
                   for i in range(2)]
        for r in readers:
            r.start()
        time.sleep(0.2)
        for serial in range(1, 301):  # ~75 KiB: about 20 rotations
            w.append(decision(serial, uid=0, auid=0, ses=1, exe=b"/bin/true"))
            if serial % 50 == 0:
                time.sleep(0.05)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(len(s) < 600 for s in seen):
            time.sleep(0.05)
        done.set()
        for r in readers:
            r.join(10)
    expected = [s for serial in range(1, 301) for s in (serial, serial)]  # 1420 + 1300
    assert seen[0] == expected
    assert seen[1] == expected


def test_control_spool_cuts_a_torn_line(tmp_path: Path) -> None:
    spool = tmp_path / "spool.log"
    spool.write_text("type=1404 audit(0.000:9): done\ntype=1404 audit(1.000:1): enforcing=0 old_enfo")
    append_spool(spool, ["type=1404 audit(2.000:2): whole"])  # the torn line was never complete
    assert spool.read_text() == "type=1404 audit(0.000:9): done\ntype=1404 audit(2.000:2): whole\n"
