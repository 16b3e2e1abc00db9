"""Run inside the test VM by test_seal_reboot.py, once per boot: `python3 seal_reboot_guest.py 1|2`.

Boot 1 deploys a policy denying /work/denied, loads with `seal = yes` (the boot unit's path) and
tries to switch enforcement off; boot 2, on the same state directory, finds nothing loaded, loads
without the setting and switches enforcement off and unloads.  Every observation goes to
/results/boot<N>.json for the host to judge.  The ipe-bpf commands run in this process (the CLI
takes 10 to 20 s to start under emulation), through the same app.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ipe_bpf.cli import app

WORK = Path("/work")
DENIED = WORK / "denied"


def ipe(*args: str, **env: str) -> dict[str, object]:
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        runner = CliRunner()
    r = runner.invoke(app, list(args), env=env)
    return {"rc": r.exit_code, "out": r.stdout, "err": r.stderr}


def status() -> dict[str, object]:
    return json.loads(str(ipe("status", "--json")["out"]))


def run_denied() -> int:
    """0 if /work/denied ran, else the errno its exec failed with."""
    try:
        return subprocess.run([str(DENIED)]).returncode
    except OSError as err:
        return err.errno or -1


def main(boot: int) -> None:
    os.environ["IPE_BPF_RUN_DIR"] = "/run/ipe-bpf-test"
    os.environ["IPE_BPF_STATE_DIR"] = str(WORK / "state")
    DENIED.write_bytes(Path("/bin/true").read_bytes())  # the same bytes each boot: the same digest
    DENIED.chmod(0o755)
    subprocess.run(["fsverity", "enable", str(DENIED)], check=True)
    seen: dict[str, object] = {"bpffs": sorted(os.listdir("/sys/fs/bpf")), "before": status()}
    if boot == 1:
        digest = subprocess.run(["fsverity", "measure", str(DENIED)], check=True, capture_output=True,
                                text=True).stdout.split()[0]
        policy = WORK / "reboot.pol"
        policy.write_text(f"policy_name=reboot policy_version=1.0.0\nDEFAULT action=ALLOW\n"
                          f"op=EXECUTE fsverity_digest={digest} action=DENY\n")
        seen["deploy"] = ipe("policy", "deploy", str(policy), "--unsigned")
        seen["activate"] = ipe("policy", "activate", "reboot")
        (WORK / "seal.conf").write_text("seal = yes\n")
        seen["load"] = ipe("load", IPE_BPF_CONFIG=str(WORK / "seal.conf"))
    else:
        seen["load"] = ipe("load", IPE_BPF_CONFIG=str(WORK / "no.conf"))
    seen["status"] = status()
    seen["denied"] = run_denied()
    seen["enforce off"] = ipe("enforce", "off")
    seen["denied after enforce off"] = run_denied()
    seen["unload"] = ipe("unload")
    Path(f"/results/boot{boot}.json").write_text(json.dumps(seen, indent=1))
    if boot == 1:  # the state directory, for the next boot
        subprocess.run(["cp", "-a", str(WORK / "state"), "/results/state"], check=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
