"""The repository documents itself: references point at docs/ sections that exist, never outside."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# bpf/ (the lead's C side) is checked once its comments point at docs/ too.
SCANNED = ("ipe_bpf", "bpf", "tests", "policies", "docs", "benchmarks", "scripts", "README.md", "pyproject.toml")
OUTSIDE = re.compile(r"\.\./shared|/work/shared|spec section|spec §|DESIGN §|IPE\.md")
# A docs reference, optionally followed by `, section N` or by `, "Title"` (comment markers allowed
# between the lines of a wrapped reference).
REFERENCE = re.compile(r'docs/([\w-]+\.md)(?:,[\s#]*section (\d+)|,[\s#]*"([^"]+)")?')


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--", *SCANNED], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an unpacked tarball): walk the tree
        return [p for top in SCANNED for p in ([REPO / top] if (REPO / top).is_file() else (REPO / top).rglob("*"))
                if p.is_file()]
    return [REPO / line for line in out.stdout.splitlines() if (REPO / line).is_file()]


def _texts() -> list[tuple[Path, str]]:
    found = []
    for path in _tracked():
        try:
            found.append((path, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # binary test data
    return found


def _headings(doc: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")]


def test_nothing_points_outside_the_repository() -> None:
    this = Path(__file__).resolve()
    offenders = [f"{p.relative_to(REPO)}: {m.group(0)!r}" for p, text in _texts() if p != this
                 for m in OUTSIDE.finditer(text)]
    assert offenders == []


def test_every_docs_reference_exists() -> None:
    problems = []
    for path, text in _texts():
        for m in REFERENCE.finditer(text):
            name, number, title = m.groups()
            doc = REPO / "docs" / name
            where = path.relative_to(REPO)
            if not doc.is_file():
                problems.append(f"{where}: docs/{name} does not exist")
                continue
            headings = _headings(doc)
            if number is not None and not any(h.startswith(f"{number}. ") for h in headings):
                problems.append(f"{where}: docs/{name} has no section {number}")
            if title is not None and not any(h.endswith(title) for h in headings):
                problems.append(f"{where}: docs/{name} has no section {title!r}")
    assert problems == []


@pytest.mark.parametrize("name", ["policy-language.md", "audit-records.md", "design.md"])
def test_docs_exist(name: str) -> None:
    assert (REPO / "docs" / name).read_text().startswith("# ")
