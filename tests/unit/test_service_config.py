"""ipe-bpf.conf: defaults, every key, and one-line errors naming file and line."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from ipe_bpf.errors import ServiceError
from ipe_bpf.service.config import Config, load_config, parse_config


def test_missing_file_gives_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "absent.conf", environ={"IPE_BPF_RUN_DIR": str(tmp_path / "run")})
    assert cfg == Config(run_dir=tmp_path / "run")
    assert cfg.log_file == Path("/var/log/ipe-bpf/audit.log")
    assert cfg.fsync_batches and cfg.journal and cfg.kernel_audit == "auto"


def test_every_key(tmp_path: Path) -> None:
    conf = tmp_path / "ipe-bpf.conf"
    conf.write_text(
        "# comment line\n"
        "log_file = /srv/log/ipe.log   # trailing comment\n"
        "log_max_size=64K\n"
        "log_keep = 3\n"
        "\n"
        "log_fsync = none\n"
        "journal = no\n"
        "kernel_audit = yes\n"
        "ring_buffer_size = 1M\n"
        "boot_failure = emergency\n"
    )
    cfg = load_config(conf, environ={})
    assert cfg.log_file == Path("/srv/log/ipe.log")
    assert cfg.log_max_size == 64 << 10
    assert cfg.log_keep == 3
    assert not cfg.fsync_batches
    assert cfg.journal is False
    assert cfg.kernel_audit == "yes"
    assert cfg.ring_buffer_size == 1 << 20
    assert cfg.ringbuf_pages == (1 << 20) // mmap.PAGESIZE
    assert cfg.boot_failure == "emergency"
    assert cfg.run_dir == Path("/run/ipe-bpf")


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("jornal = yes\n", 1, "unknown key 'jornal'"),
        ("# ok\njournal = maybe\n", 2, "journal: expected yes or no"),
        ("\n\nlog_keep = 0\n", 3, "log_keep"),
        ("log_file = relative/path\n", 1, "absolute path"),
        ("ring_buffer_size = 3000\n", 1, "power of two"),
        ("ring_buffer_size = 12K\n", 1, "power of two"),
        ("log_max_size = 10X\n", 1, "expected a size"),
        ("kernel_audit = always\n", 1, "expected auto or yes or no"),
        ("journal\n", 1, "expected `key = value`"),
        ("journal = yes\njournal = no\n", 2, "set twice (first on line 1)"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    conf = tmp_path / "ipe-bpf.conf"
    conf.write_text(text)
    with pytest.raises(ServiceError) as caught:
        load_config(conf, environ={})
    message = str(caught.value)
    assert message.startswith(f"{conf}:{line}: EINVAL: "), message
    assert words in message
    assert "\n" not in message


def test_not_utf8(tmp_path: Path) -> None:
    conf = tmp_path / "ipe-bpf.conf"
    conf.write_bytes(b"journal = \xff\n")
    with pytest.raises(ServiceError, match="EILSEQ"):
        load_config(conf, environ={})


def test_environment_chooses_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "other.conf"
    conf.write_text("log_keep = 9\n")
    assert load_config(environ={"IPE_BPF_CONFIG": str(conf)}).log_keep == 9


def test_parse_names_the_source() -> None:
    with pytest.raises(ServiceError) as caught:
        parse_config("x = 1", "/etc/ipe-bpf/ipe-bpf.conf")
    assert str(caught.value).startswith("/etc/ipe-bpf/ipe-bpf.conf:1: EINVAL: unknown key 'x'")
