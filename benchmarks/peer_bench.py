"""Exec and mmap latency: ipe-bpf vs the kernel's own IPE, same policy (a benchmark, not a test).

Run inside the test VM booted with the test key in UEFI db (kernel IPE only takes policies
signed by a key in its keyrings) and deterministic time:

    ipe-bpf vm run --icount --uefi-db tests/vm/keys/uefi-db-test.pem -- \\
        python3 benchmarks/peer_bench.py [--rules 10,550]

For each size N the policy is N fs-verity digest rules with the target's digest last (kernel
IPE scans rules in order, so this is its worst case; ipe-bpf does the same lookups for any N).
Three states, in interleaved rounds (S0 S1 S2 S2 S1 S0):
  S0 base:       ipe-bpf detached; kernel IPE on an empty allow-all policy
  S1 ipe-bpf:    ipe-bpf attached with the N-rule policy; kernel IPE on the empty policy
  S2 kernel IPE: ipe-bpf detached; kernel IPE on the N-rule policy
Both kernel IPE policies share one version, so switching between them is allowed.  Kernel IPE
stays permissive throughout (it cannot be unloaded; a mistake must not lock the VM up).
Reported: medians per operation and the ratios S1/S0 and S2/S0.

Measured 2026-11-28 (`vm run --icount --uefi-db ...`, guest time, --rounds 3 --execs 100
--mmaps 1000; exec = fork + execve + wait of a static binary; mmap = PROT_EXEC mmap + munmap
of the fs-verity target):

    rules   op     base        ipe-bpf            kernel IPE
       10   exec   333411 ns   334392 ns (1.003)  337413 ns  (1.012)
       10   mmap    10638 ns    13182 ns (1.239)   12804 ns  (1.204)
      550   exec   326328 ns   335239 ns (1.027)  567101 ns  (1.738)
      550   mmap    10643 ns    13203 ns (1.241)  125306 ns (11.774)

550 rules is about the most kernel IPE takes (a 1000-rule policy, over 100 KB signed, is refused
with EMSGSIZE: its cap is 64 KiB).  Kernel IPE walks the rules in order for every event, so
its cost grows with the policy; ipe-bpf's does not (100k rules: see exec_bench.py).  At 10
rules the two are within a few percent of each other.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exec_bench import Attachment, block, policy_text, prepare  # noqa: E402

from ipe_bpf.kernel import kernel_ipe  # noqa: E402
from ipe_bpf.kernel.maps import PinnedPolicyMaps  # noqa: E402
from ipe_bpf.policy.compiler import compile_policy  # noqa: E402
from ipe_bpf.policy.parser import parse_policy  # noqa: E402
from ipe_bpf.policy.signing import sign_policy  # noqa: E402

KEYS = Path(__file__).resolve().parents[1] / "tests/vm/keys"
VERSION = "9.9.9"  # above anything the test suite activated in this boot


def kernel_ipe_deploy(name: str, text: str) -> None:
    """Sign (the test key) and deploy a policy to kernel IPE, or update it if deployed."""
    text = text.replace("policy_name=bench policy_version=0.0.1", f"policy_name={name} policy_version={VERSION}")
    blob = sign_policy(text.encode(), (KEYS / "uefi-db-test.key").read_bytes(),
                       (KEYS / "uefi-db-test.pem").read_bytes())
    if kernel_ipe.is_deployed(name):
        kernel_ipe.delete(name)
    try:
        kernel_ipe.deploy(blob)
    except OSError as exc:  # EMSGSIZE: kernel IPE takes at most 64 KiB of signed policy
        raise SystemExit(f"kernel IPE refused the {len(blob)}-byte policy {name}: {exc.strerror}") from None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", default="10,550")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of S0 S1 S2 S2 S1 S0")
    ap.add_argument("--execs", type=int, default=100)
    ap.add_argument("--mmaps", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    kernel_ipe.set_enforce(False)
    kernel_ipe.set_success_audit(False)
    helper, verity, _plain, digest = prepare()
    att = Attachment()
    rng = random.Random(1)
    kernel_ipe_deploy("bench_empty", "policy_name=bench policy_version=0.0.1\nDEFAULT action=ALLOW\n")
    kernel_ipe.activate("bench_empty")
    results = []
    for n in (int(x) for x in args.rules.split(",")):
        text = policy_text(n, digest, rng)
        with PinnedPolicyMaps() as maps:
            maps.install(compile_policy(parse_policy(text.encode())), generation=n)
        kernel_ipe_deploy("bench_full", text)

        def state(s: str) -> None:
            att.on() if s == "S1" else att.off()
            kernel_ipe.activate("bench_full" if s == "S2" else "bench_empty")

        for kind, count in (("exec", args.execs), ("mmap", args.mmaps)):
            samples: dict[str, list[float]] = {"S0": [], "S1": [], "S2": []}
            for _ in range(args.rounds):
                for s in ("S0", "S1", "S2", "S2", "S1", "S0"):
                    state(s)
                    samples[s].append(block(helper, kind, verity, count))
            base, ours, peer = (statistics.median(samples[s]) for s in ("S0", "S1", "S2"))
            row = {"rules": n, "op": kind, "base_ns": round(base), "ipe_bpf_ns": round(ours),
                   "kernel_ipe_ns": round(peer), "ipe_bpf_ratio": round(ours / base, 4),
                   "kernel_ipe_ratio": round(peer / base, 4)}
            results.append(row)
            if not args.json:
                print(f"rules={n:>6} {kind:4} base {base:>10.0f} ns  ipe-bpf {ours:>10.0f} ns "
                      f"({ours / base:.3f})  kernel IPE {peer:>10.0f} ns ({peer / base:.3f})", flush=True)
    kernel_ipe.activate("bench_empty")
    att.on()
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
