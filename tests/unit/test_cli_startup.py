"""What keeps `ipe-bpf` quick to start without changing what it prints (ipe_bpf/cli/__init__.py)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import typer

from ipe_bpf.cli import app

HELP_RUN = textwrap.dedent("""
    import sys
    if sys.argv[1] == "real":  # what typer imports for help, imported before the CLI starts
        import rich.markdown, rich.traceback
    sys.argv = ["ipe-bpf", *sys.argv[2:]]
    from ipe_bpf.cli import main
    try:
        main()
    except SystemExit:
        pass
    print("MODULES", sorted({m.split(".")[0] for m in sys.modules if m.startswith(("markdown_it", "pygments"))}))
""")


def _help(mode: str, *args: str) -> tuple[str, str]:
    env = {**os.environ, "COLUMNS": "100", "TERM": "dumb"}
    out = subprocess.run([sys.executable, "-c", HELP_RUN, mode, *args], capture_output=True, text=True,
                         env=env, check=True).stdout
    text, _, modules = out.rpartition("MODULES ")
    return text, modules.strip()


def test_help_is_unchanged_without_markdown_it_and_pygments() -> None:
    for args in (["--help"], ["policy", "--help"], ["vm", "run", "--help"]):
        deferred, modules = _help("deferred", *args)
        real, real_modules = _help("real", *args)
        assert deferred == real and "Usage: ipe-bpf" in deferred, args
        assert (modules, real_modules) == ("[]", "['markdown_it', 'pygments']"), args


def test_a_usage_error_still_renders() -> None:
    done = subprocess.run([sys.executable, "-m", "ipe_bpf", "policy", "frobnicate"], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 2 and "No such command" in done.stderr and "frobnicate" in done.stderr


def _callbacks(command: object) -> list[object]:
    found = [getattr(command, "callback", None)]
    for sub in getattr(command, "commands", {}).values():
        found += _callbacks(sub)
    return [f for f in found if f is not None]


def test_no_command_has_string_annotations() -> None:
    """typer eval()s string annotations of every command on every start (the module's
    `from __future__ import annotations`): the command modules must not have them."""
    callbacks = _callbacks(typer.main.get_command(app))
    assert len(callbacks) > 30
    stringly = [f"{f.__module__}.{f.__qualname__}" for f in callbacks
                if any(isinstance(a, str) for a in inspect.get_annotations(f).values())]
    assert stringly == []
