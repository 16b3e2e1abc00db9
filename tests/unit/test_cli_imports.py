"""The CLI starts fast: importing it (what every `ipe-bpf ...` and `--help` pays before typer
runs) loads typer and the command tree, never the library a command needs only once it runs.

Each command imports its library modules in its body; a top-level import in any ipe_bpf/cli
module would pull its whole chain (the policy model parses bpf/ipe_bpf.h, signing imports
cryptography, the kernel side ctypes and libbpf...) into every start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Modules a fresh `import ipe_bpf.cli` must not load (prefixes: a package and its submodules).
HEAVY = (
    "ipe_bpf.policy",  # model/layout/structs parse the shared header; parser, compiler, signing
    "ipe_bpf.kernel",
    "ipe_bpf.audit",
    "ipe_bpf.service",
    "ipe_bpf.generate",
    "cryptography",
    "elftools",
    "rich",  # typer imports it for --help itself; plain output needs none of it
    "pydantic",
)


def loaded_after(statement: str) -> list[str]:
    """The modules a fresh interpreter holds after running `statement`."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])  # the last line: what the statement printed comes first


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_importing_the_cli_loads_no_library_module() -> None:
    modules = loaded_after("import ipe_bpf.cli")
    assert "ipe_bpf.cli.kernel" in modules and "typer" in modules  # the command tree is there
    assert heavy(modules) == []


def test_building_the_command_tree_loads_no_library_module() -> None:
    """typer turns every command's signature into click options at each start (even for
    `--help`): that must not need the library either."""
    modules = loaded_after("import typer.main, ipe_bpf.cli\ntyper.main.get_command(ipe_bpf.cli.app)")
    assert heavy(modules) == []


def test_an_unsigned_policy_is_opened_without_cryptography() -> None:
    """`policy deploy --unsigned` of a big policy pays for parsing, not for the X.509 stack."""
    modules = loaded_after("from ipe_bpf.kernel.submission import open_submission\n"
                           "open_submission(b'policy_name=p policy_version=1.0.0\\nDEFAULT action=ALLOW\\n', (),"
                           " allow_unsigned=True)")
    assert "ipe_bpf.policy.compiler" in modules and [m for m in modules if m.startswith("cryptography")] == []


def test_deploying_an_unsigned_compiled_policy_loads_no_parser_compiler_rich_or_cryptography(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`policy deploy --unsigned --compiled` (the 100k-rule switch of docs/performance.md) pays for
    hashing and installing, not for modules it does not use."""
    from ipe_bpf.policy import tables_file

    text = b"policy_name=p policy_version=1.0.0\nDEFAULT action=ALLOW\nop=EXECUTE boot_verified=TRUE action=DENY\n"
    (tmp_path / "p.pol").write_bytes(text)
    (tmp_path / "p.ipec").write_bytes(tables_file.compile_text(text)[0])
    argv = ["policy", "deploy", "--unsigned", str(tmp_path / "p.pol"), "--compiled", str(tmp_path / "p.ipec")]
    modules = loaded_after(
        f"import os, sys\nos.environ['IPE_BPF_STATE_DIR'] = {str(tmp_path / 'state')!r}\n"
        f"sys.argv = ['ipe-bpf', *{argv!r}]\nimport ipe_bpf.cli\ntry:\n    ipe_bpf.cli.main()\n"
        "except SystemExit as e:\n    assert not e.code, e.code")
    assert "ipe_bpf.kernel.submission" in modules and (tmp_path / "state").is_dir()  # it did deploy
    assert [m for m in modules if m in ("ipe_bpf.policy.parser", "rich", "cryptography")] == []
