"""Loader pieces that need no kernel: the program text BCC gets, and its -D flags."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ipe_bpf.kernel import loader
from ipe_bpf.kernel.btf import FsverityOffsets
from ipe_bpf.kernel.maps import kernel_dev


def test_compat_header_is_spliced_into_the_main_buffer() -> None:
    text = loader.program_text()
    assert '#include "bcc_compat.h"' not in text
    assert "BPF_RINGBUF_OUTPUT(ipe_events" in text
    assert text.index("BPF_RINGBUF_OUTPUT") < text.index("IPE_HOOK(bprm_check_security")


def test_cflags_carry_sizes_and_btf_offsets_only_when_complete() -> None:
    opts = loader.LoadOptions(rule_entries=123, digest_entries=45)
    full = FsverityOffsets({"IPE_OFF_INODE_VERITY": 8})
    flags = loader.cflags(opts, full)
    assert "-DIPE_RULES_MAX=123" in flags and "-DIPE_DIGESTS_MAX=45" in flags
    assert "-DIPE_OFF_INODE_VERITY=8" in flags and "-DIPE_HAVE_FSVERITY=1" in flags
    none = loader.cflags(opts, FsverityOffsets({}, missing="no fsverity_info"))
    assert not any("FSVERITY" in f or "IPE_OFF" in f for f in none)


def test_kernel_dev_t_encoding() -> None:
    assert kernel_dev(253, 1) == (253 << 20) | 1


def test_control_lock_is_reentrant(tmp_path: Path) -> None:
    """Nested control_lock() in one thread does not deadlock, and excludes other holders.

    Run in a child with a timeout: a non-reentrant lock would block on its own flock forever,
    and the test must fail then, not hang.
    """
    lock = tmp_path / "l"
    code = textwrap.dedent(f"""
        import fcntl, os
        from pathlib import Path
        from ipe_bpf.kernel.pins import control_lock

        lock = Path({str(lock)!r})

        def free() -> bool:
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            finally:
                os.close(fd)

        with control_lock(lock):
            with control_lock(lock):
                assert not free(), "held while nested"
            assert not free(), "still held by the outer block"
        assert free(), "released at the end"
        print("ok")
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("control_lock() deadlocked on its own nested use")
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
