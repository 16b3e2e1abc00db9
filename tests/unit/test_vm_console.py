"""Reading the guest console: marker lines, nonces, panics."""

from __future__ import annotations

from ipe_bpf.vm.console import ConsoleState, split_lines


def test_status_and_results_markers() -> None:
    state = ConsoleState("abc")
    for line in ["hello", "IPE-BPF-VM-STATUS abc 3", "IPE-BPF-VM-RESULTS abc ok"]:
        state.feed(line)
    assert state.status == 3 and state.results == "ok" and state.finished


def test_a_marker_with_another_nonce_is_ignored() -> None:
    state = ConsoleState("abc")
    state.feed("IPE-BPF-VM-STATUS zzz 0")
    state.feed("IPE-BPF-VM-RESULTS zzz ok")
    assert state.status is None and not state.finished


def test_marker_after_output_without_newline() -> None:
    state = ConsoleState("n1")
    state.feed("partial output without newlineIPE-BPF-VM-STATUS n1 0")
    assert state.status == 0


def test_the_first_status_wins_and_nonsense_is_ignored() -> None:
    state = ConsoleState("n")
    state.feed("IPE-BPF-VM-STATUS n x")
    state.feed("IPE-BPF-VM-STATUS n 999")
    state.feed("IPE-BPF-VM-STATUS n 7")
    state.feed("IPE-BPF-VM-STATUS n 8")
    assert state.status == 7


def test_init_failure() -> None:
    state = ConsoleState("n")
    state.feed("IPE-BPF-VM-FAIL data disks (serial ctl, work, results) not found")
    assert state.finished and state.status is None
    assert state.failure == "data disks (serial ctl, work, results) not found"


def test_kernel_panic() -> None:
    state = ConsoleState("n")
    state.feed("[    3.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)")
    assert state.finished and state.panic == "VFS: Unable to mount root fs on unknown-block(0,0)"


def test_tail_keeps_the_last_lines() -> None:
    state = ConsoleState("n")
    for i in range(50):
        state.feed(str(i))
    assert state.tail[-1] == "49" and len(state.tail) == 20 and state.lines == 50


def test_split_lines_strips_cr_and_keeps_the_rest() -> None:
    lines, rest = split_lines(b"a\r\nb\n\xffc\r\npart")
    assert lines == ["a", "b", "\ufffdc"] and rest == b"part"


def test_watchdog_listing_is_noticed() -> None:
    state = ConsoleState("n")
    state.feed("IPE-BPF-VM-WATCHDOG still running after 570 s; processes (pid state wchan command):")
    assert state.watchdog and not state.finished
