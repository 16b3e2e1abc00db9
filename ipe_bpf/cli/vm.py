"""`ipe-bpf vm build|run|setup`: the bundled test VM (Debian guests on three kernel lines, QEMU)."""

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import VmError
from ..vm.config import KERNEL_ENV, VmConfig
from ..vm.lines import DEFAULT_LINE, LINES
from .common import fail

app = typer.Typer(
    help="The test VM: a Debian guest with BPF LSM (Linux 6.1, 6.12 with kernel IPE, or 7.x) under QEMU.",
    no_args_is_help=True,
)

# Passed on from the host into the guest's command environment.
FORWARDED_ENV = ("IPE_BPF_LOADER",)
KERNEL_HELP = (
    f"Kernel line ({', '.join(line.name for line in LINES)}) or exact release (e.g. 6.1.0-50-cloud-amd64); "
    f"default ${KERNEL_ENV}, else {DEFAULT_LINE}."
)


def _config(kernel: str | None, mirror: str | None = None) -> VmConfig:
    return VmConfig.from_env(kernel=kernel, mirror=mirror)


@app.command()
def build(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the cached image is current.")] = False,
    mirror: Annotated[
        Optional[str], typer.Option(help="Debian mirror URL (default: $IPE_BPF_MIRROR, else this host's apt sources).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the image's manifest as JSON.")] = False,
    kernel: Annotated[Optional[str], typer.Option(help=KERNEL_HELP, show_default=False)] = None,
) -> None:
    """Build the guest image of a kernel line (as root) unless the cached one matches its inputs."""
    from ..vm.image import build_image, image_summary
    from ..vm.progress import RichReporter

    reporter = RichReporter()
    try:
        image = build_image(_config(kernel, mirror), force=force, reporter=reporter)
    except VmError as err:
        fail(f"ipe-bpf vm build: {err}")
    except KeyboardInterrupt:
        fail("ipe-bpf vm build: interrupted (nothing half-built is kept)", 130)
    summary = image_summary(image)
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        reporter.note(
            f"VM image {summary['key']} (line {summary.get('line')}: Linux {summary['kernel_release']}, "
            f"Debian {summary.get('suite')}, built {summary['built_at']} "
            f"in {summary['build_seconds']} s) in {summary['directory']}"
        )


def forwarded_env(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The host's settings the guest's command gets too (the loader choice)."""
    return tuple((name, env[name]) for name in FORWARDED_ENV if env.get(name))


def current_checkout(start: Path) -> Path:
    """The top of the git checkout holding ``start`` (so `vm run` works from a subdirectory)."""
    start = start.resolve()
    for directory in (start, *start.parents):
        if (directory / ".git").exists():
            return directory
    return start


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(help="The command to run as root in /work (after --).")],
    project: Annotated[Optional[Path], typer.Option(
        help="Directory mounted at /work.",
        show_default="the git checkout holding the current directory, else the current directory")] = None,
    results: Annotated[
        Optional[Path], typer.Option(help="Where the guest's /results is copied to.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before a silent guest is killed (0: never).")] = 3600.0,
    initramfs: Annotated[
        bool, typer.Option("--initramfs", help="Boot from an initramfs (/ is the kernel's rootfs).")
    ] = False,
    icount: Annotated[
        bool, typer.Option("--icount", help="Guest time for benchmarks (-icount shift=0,sleep=on): 1 ns per instruction, idle time as real time.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not stream the guest console.")] = False,
    uefi_db: Annotated[Optional[Path], typer.Option(
        "--uefi-db", metavar="CERT",
        help="Boot UEFI (OVMF) with CERT in the firmware's db: the kernel loads it into its .platform "
             "keyring (on 6.12 and 7.x trusted for kernel IPE policies and dm-verity root hash "
             "signatures); adds audit=1.")] = None,
    kernel: Annotated[Optional[str], typer.Option(help=KERNEL_HELP, show_default=False)] = None,
    systemd: Annotated[bool, typer.Option(
        "--systemd", help="Boot with systemd as PID 1 (journald, auditd and enabled units run); the "
                          "command runs once the system is up, then the guest powers off cleanly.")] = False,
    state: Annotated[Optional[Path], typer.Option(
        "--state", metavar="DIR",
        help="Keep the root disk's changes in DIR between boots (made from the image on first use).")] = None,
) -> None:
    """Boot the VM, run COMMAND in /work and exit with its status (125: the guest never reported).

    IPE_BPF_LOADER is passed on into the guest when it is set here.
    """
    from ..vm.progress import RichReporter
    from ..vm.run import NO_REPORT, RunRequest, run_vm

    reporter = RichReporter()
    where = project if project is not None else current_checkout(Path.cwd())
    request = RunRequest(tuple(command), where, results, timeout, initramfs, icount,
                         env=forwarded_env(os.environ), uefi_db=uefi_db, systemd=systemd, state=state)
    try:
        outcome = run_vm(request, _config(kernel), reporter, console=None if quiet else sys.stdout.buffer)
    except VmError as err:
        fail(f"ipe-bpf vm run: {err}", NO_REPORT)
    except KeyboardInterrupt:
        fail("ipe-bpf vm run: interrupted", 130)
    for warning in outcome.warnings:
        reporter.note(f"warning: {warning}")
    if outcome.reason is not None:
        fail(f"ipe-bpf vm run: {outcome.reason}", NO_REPORT)
    reporter.note(f"guest command exited with status {outcome.status} ({outcome.seconds:.1f} s)")
    raise typer.Exit(outcome.status)


@app.command()
def setup(
    check: Annotated[bool, typer.Option("--check", help="Only say what is missing.")] = False,
) -> None:
    """Install the host programs the VM needs (Debian/Ubuntu, as root, with apt-get)."""
    from ..vm.progress import RichReporter
    from ..vm.setup import apply_setup, plan_setup

    plan = plan_setup()
    reporter = RichReporter()
    if plan.complete:
        reporter.note("host prerequisites present (the VM runs under QEMU TCG: no KVM needed)")
        return
    if check:
        fail(f"ipe-bpf vm setup: missing packages: {' '.join(plan.missing_packages)}")
    try:
        with reporter.step(f"apt-get install {' '.join(plan.missing_packages)}"):
            apply_setup(plan)
    except VmError as err:
        fail(f"ipe-bpf vm setup: {err}")
    reporter.note("host prerequisites installed")


def main() -> None:
    app(prog_name="ipe-bpf vm")


if __name__ == "__main__":
    main()
