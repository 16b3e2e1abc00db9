"""The demo the README's first command runs inside the test VM (`scripts/dev demo`).

It shows what the guest kernel offers, then does what an administrator would: load
ipe-bpf, sign a policy that lets exactly one fs-verity-measured program execute, deploy
and activate it, and show an allowed exec, two denied ones (a modified copy of the
program and an ordinary system binary) and the audit records of the denials.

Once the policy is active every new exec and executable mapping is judged, this
process's own `ipe-bpf` subprocesses included; so the steps after activation run
in-process through the library, with everything they need imported beforehand.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .audit.render import ipe_text
from .kernel.events import records
from .kernel.lifecycle import Lifecycle
from .kernel.maps import PinnedPolicyMaps
from .kernel.store import PolicyStore

console = Console(highlight=False)
WORK = Path("/run/ipe-demo")
HELLO_C = r"""
#include <unistd.h>
int main(void) { static const char m[] = "hello from a measured binary\n"; write(1, m, sizeof m - 1); return 0; }
"""


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        return f"unavailable ({err.strerror})"


def show_capabilities() -> bool:
    lsms = _read("/sys/kernel/security/lsm").split(",")
    table = Table(title="Kernel capabilities in the test VM")
    table.add_column("what")
    table.add_column("value")
    table.add_row("kernel", platform.release())
    table.add_row("active LSMs", ",".join(lsms))
    table.add_row("BPF LSM", "yes" if "bpf" in lsms else "NO")
    table.add_row("IPE LSM (built in)", "yes" if "ipe" in lsms else "no")
    table.add_row("kernel BTF", "yes" if Path("/sys/kernel/btf/vmlinux").exists() else "NO")
    table.add_row("bpffs", "yes" if Path("/sys/fs/bpf").is_dir() else "no")
    console.print(table)
    return "bpf" in lsms


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def shell(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run and show a command the way a user would type it."""
    args = [str(a) for a in argv]
    console.print(f"[cyan]# {shlex.join(args)}")
    if args[0] == "ipe-bpf":  # the guest runs the checkout in place, without the console script
        args[:1] = [sys.executable, "-m", "ipe_bpf"]
    done = subprocess.run(args, capture_output=True, text=True)
    out = (done.stdout + done.stderr).rstrip()
    if out:
        console.print(out, markup=False)
    if done.returncode:
        raise SystemExit(f"demo: {args[0]} failed with status {done.returncode}")
    return done


def try_exec(path: Path) -> bool:
    """exec `path` as any program would; True if the kernel let it run."""
    console.print(f"[cyan]# {path}")
    try:
        done = subprocess.run([str(path)], capture_output=True, text=True)
    except PermissionError as err:
        console.print(f"[red]denied[/]: {err.strerror} (errno {err.errno})")
        return False
    console.print(f"[green]allowed[/]: {done.stdout.strip()}")
    return True


def prepare_files() -> tuple[Path, Path, str]:
    """A verity-capable scratch fs with a measured program and a modified copy of it."""
    WORK.mkdir(parents=True, exist_ok=True)
    image, mount = WORK / "fsv.img", WORK / "apps"
    mount.mkdir(exist_ok=True)
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-b", "4096", "-O", "verity", str(image)], check=True)
    subprocess.run(["modprobe", "loop"], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    source = WORK / "hello.c"
    source.write_text(HELLO_C)
    good, bad = mount / "hello", mount / "hello-patched"
    shell("gcc", "-static", "-O2", "-o", good, source)
    bad.write_bytes(good.read_bytes() + b"\0")  # one byte appended: a different file
    bad.chmod(0o755)
    for path in (good, bad):
        shell("fsverity", "enable", path)
    digest = shell("fsverity", "measure", good).stdout.split()[0]
    shell("fsverity", "measure", bad)
    return good, bad, digest


def sign_policy(digest: str) -> tuple[Path, Path]:
    trust = WORK / "trust"
    trust.mkdir(exist_ok=True)
    key, cert = WORK / "signing.key", trust / "signing.pem"
    shell("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=ipe-bpf demo signer",
          "-keyout", key, "-out", cert)
    policy = WORK / "demo.pol"
    policy.write_text(
        "policy_name=demo policy_version=1.0.0\n"
        "DEFAULT action=ALLOW\n"
        "DEFAULT op=EXECUTE action=DENY\n"
        f"op=EXECUTE fsverity_digest={digest} action=ALLOW\n"
    )
    console.print(policy.read_text(), markup=False)
    signed = WORK / "demo.p7s"
    shell("ipe-bpf", "policy", "sign", policy, "--key", key, "--cert", cert, "-o", signed)
    return signed, trust


def main() -> int:
    if not show_capabilities():
        console.print("[red]This kernel has no BPF LSM: run the demo in the test VM (scripts/dev demo).")
        return 1
    os.environ.setdefault("IPE_BPF_STATE_DIR", tempfile.mkdtemp(prefix="ipe-bpf-state-"))
    step("1. load the BPF-LSM program (compiled with BCC; pinned, so it outlives this process)")
    shell("ipe-bpf", "load")
    step("2. a program to trust: fs-verity on, digest measured; and a patched copy")
    good, bad, digest = prepare_files()
    step("3. an IPE policy allowing exactly that digest to execute, signed (PKCS#7) and deployed")
    signed, trust = sign_policy(digest)
    shell("ipe-bpf", "policy", "deploy", signed, "--trust", trust)
    shell("ipe-bpf", "policy", "activate", "demo")
    step("4. executions under the policy")
    allowed = try_exec(good)
    patched_denied = not try_exec(bad)
    system_denied = not try_exec(Path("/usr/bin/uname"))
    step("5. the audit records (IPE 1420 format)")
    lifecycle = Lifecycle(PolicyStore.default())
    audited = [r for r in records(follow=False, rules=lifecycle.rule_text)]
    for serial, record in enumerate(audited, 1):
        console.print(ipe_text(record, serial), markup=False)
    step("6. back to permissive, then unload")
    # in-process: under this policy not even python3 may be exec'd for `ipe-bpf enforce off`
    with PinnedPolicyMaps() as maps:
        outcome = Lifecycle(PolicyStore.default(), maps).set_enforce(False)
    console.print("# ipe-bpf enforce off  (done in-process; it logs:)", style="cyan")
    for line in outcome.records:
        console.print(line, markup=False)
    shell("ipe-bpf", "unload")
    ok = allowed and patched_denied and system_denied and len(audited) >= 2
    console.print("[green]demo complete[/]" if ok else "[red]demo did not show the expected decisions[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
