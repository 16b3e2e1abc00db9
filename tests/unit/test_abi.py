"""C and Python share every number through bpf/ipe_bpf.h: the two sides cannot disagree.

Python's enums take their values from the header's #defines; these tests fail when a name
exists on one side only, or when Python restates a number the header defines.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

import pytest

from ipe_bpf.audit.record import Hook, PathKind
from ipe_bpf.errors import KernelError
from ipe_bpf.kernel import syscalls
from ipe_bpf.policy.evaluate import Source
from ipe_bpf.policy.layout import default_header
from ipe_bpf.policy.model import Action, Op

PACKAGE = Path(__file__).resolve().parents[2] / "ipe_bpf"

ENUMS: list[tuple[str, type[enum.Enum]]] = [
    ("IPE_OP_", Op),
    ("IPE_ACTION_", Action),
    ("IPE_SOURCE_", Source),
    ("IPE_HOOK_", Hook),
    ("IPE_PATH_", PathKind),
]


def header_names(prefix: str) -> dict[str, int]:
    """NAME -> value of every `#define <prefix>NAME <value>` (counts and sizes excluded)."""
    sizes = {"MAX", "SCRATCH"}
    return {name[len(prefix):]: value for name, value in default_header().constants.items()
            if name.startswith(prefix) and name[len(prefix):] not in sizes}


@pytest.mark.parametrize(("prefix", "members"), ENUMS, ids=[p for p, _ in ENUMS])
def test_python_names_are_the_headers(prefix: str, members: type[enum.Enum]) -> None:
    assert set(header_names(prefix)) == {m.name for m in members}


@pytest.mark.parametrize(("prefix", "members"), ENUMS, ids=[p for p, _ in ENUMS])
def test_python_values_are_the_headers(prefix: str, members: type[enum.Enum]) -> None:
    number = {m.name: (m.number if isinstance(m, Source) else m.value) for m in members}
    assert number == header_names(prefix)


def test_counts() -> None:
    c = default_header().constant
    assert c("IPE_NR_OPS") == len(Op)
    assert c("IPE_NR_HOOKS") == len(Hook)


def test_no_python_module_restates_a_header_number() -> None:
    """No `[_][IPE_]NAME[, ...] = <number>` for a header constant, no quoted hook name list."""
    names = "|".join(n.removeprefix("IPE_") for n in default_header().constants)
    assignment = re.compile(rf"^[ \t]*[\w, \t]*\b_?(?:IPE_)?(?:{names})\b[\w, \t]*=[ \t]*\(?[ \t]*\d", re.MULTILINE)
    quoted = re.compile("|".join(f'"{hook.name}"' for hook in Hook))
    found = [f"{p.relative_to(PACKAGE)}: {m.group(0).strip()}" for p in PACKAGE.rglob("*.py")
             for pattern in (assignment, quoted) for m in pattern.finditer(p.read_text())]
    assert found == []


def test_every_syscall_the_package_makes_is_in_the_table_for_every_architecture() -> None:
    used = {m.group(1) for p in PACKAGE.rglob("*.py")
            for m in re.finditer(r'syscalls\.number\("(\w+)"', p.read_text())}
    assert used == {"bpf", "statx"}
    for machine, table in syscalls.SYSCALLS.items():
        assert used <= set(table), machine
    assert syscalls.number("bpf", "x86_64") == 321
    assert syscalls.number("bpf", "aarch64") == 280
    assert syscalls.number("statx", "x86_64") == 332
    assert syscalls.number("statx", "aarch64") == 291


def test_unknown_architecture_is_enosys() -> None:
    with pytest.raises(KernelError) as info:
        syscalls.number("bpf", "vax")
    assert info.value.errno_name == "ENOSYS" and "vax" in str(info.value)
