"""The guest half of benchmarks/report.py: every measurement, in one boot, as JSON.

Run by report.py inside `ipe-bpf vm run --icount --uefi-db tests/vm/keys/uefi-db-test.pem`
(6.12 guest: kernel IPE and fapolicyd); writes /results/report.json after every step, so a
run cut short still leaves what it measured.

Per policy size N (fs-verity digest rules: N-1 filler digests and the real target's last):
  base        ipe-bpf detached, kernel IPE on an empty allow-all policy, fapolicyd stopped
  ipe-bpf     the CO-RE program attached with the N-rule policy
  kernel IPE  the same policy, signed, when it fits kernel IPE's 64 KiB (permissive: same cost)
  fapolicyd   a trust database of the same files plus filler entries up to N (fapolicyd_peer.py)
in interleaved rounds (base ipe-bpf kernel-IPE kernel-IPE ipe-bpf base; fapolicyd after,
restarting it per size costs its database load).  Each block is one run of the helper
(tests/vm/attacks/attack.c): bench-exec (fork+execve+wait of a static binary), bench-mmap
(mmap PROT_EXEC + munmap), bench-open (open+read 4 KiB+close), on an fs-verity file and a
plain one.  Ratios are medians over blocks against base.  The largest size runs in a child
process (program loaded again there): if it runs out of memory, the rest is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from exec_bench import WORK, Attachment, block, policy_text, prepare  # noqa: E402
from fapolicyd_peer import Fapolicyd, write_config  # noqa: E402
from peer_bench import kernel_ipe_deploy  # noqa: E402

from ipe_bpf.kernel import kernel_ipe, loader, memory, pins  # noqa: E402
from ipe_bpf.kernel.maps import PinnedPolicyMaps  # noqa: E402
from ipe_bpf.policy.compiler import compile_policy  # noqa: E402
from ipe_bpf.policy.model import Action, DigestKey, DigestRow, Op, Policy, RuleList  # noqa: E402

CASES = (("exec", "fsverity"), ("exec", "plain"), ("mmap", "fsverity"), ("mmap", "plain"),
         ("open", "fsverity"), ("open", "plain"))
FAPOLICYD_CASES = tuple(c for c in CASES if c[0] != "mmap")  # fanotify has no mmap event
KERNEL_IPE_MAX = 64 << 10


class Report:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, object] = json.loads(path.read_text()) if path.exists() else {}

    def add(self, key: str, value: object) -> None:
        self.data.setdefault(key, []).append(value)  # type: ignore[union-attr]
        self.save()

    def set(self, key: str, value: object) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))


def model_policy(n: int, digest: str, rng: random.Random) -> Policy:
    """policy_text(n, ...) as the parser reads it (rows of one-digest rules), without a 100 MB text at 1M rules."""
    def row(value: bytes, action: Action, line: int) -> DigestRow:
        return DigestRow((Op.EXECUTE, DigestKey.FSVERITY_DIGEST, b"sha256", value, action, line))

    rules = [row(rng.getrandbits(256).to_bytes(32, "big"), Action.DENY, line) for line in range(3, n + 2)]
    rules.append(row(bytes.fromhex(digest.split(":", 1)[1]), Action.ALLOW, n + 2))
    return Policy(b"bench", (0, 0, 1), Action.ALLOW, (), RuleList(rules))


def timed(argv: list[str]) -> float:
    return timed_cpu(argv)[0]


def timed_cpu(argv: list[str]) -> tuple[float, float]:
    """(elapsed, user + system CPU) seconds of one command.  Under -icount the CPU figure is
    exact; elapsed time also holds the guest's waits for its disks, which the emulator jumps
    over by an amount that depends on the host (a cold page cache costs seconds).  The earlier
    commands' writes are synced first, so that their writeback is not timed here: a 7.x boot
    measured one 1.5 s CPU deploy at 5.0 s elapsed without it."""
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def cli_figures(report: Report, digest: str) -> None:
    """`policy deploy` + `activate` of 100k rules through the CLI, CLI start-up, map memory."""
    text = policy_text(100_000, digest, random.Random(5)).replace("policy_version=0.0.1", "policy_version=1.0.0")
    path = WORK / "bench-100k.pol"
    path.write_text(text)
    before = memory.pinned_memory()
    timed(["ipe-bpf", "policy", "list"])  # warm: the CLI's modules and the policy file in the page cache
    path.read_bytes()
    deploy, deploy_cpu = timed_cpu(["ipe-bpf", "policy", "deploy", "--unsigned", str(path)])
    activate, activate_cpu = timed_cpu(["ipe-bpf", "policy", "activate", "bench"])
    after = memory.pinned_memory()
    switch_text = policy_text(100_000, digest, random.Random(6)).replace(
        "policy_name=bench policy_version=0.0.1", "policy_name=bench_next policy_version=1.0.1")
    switch_path = WORK / "bench-100k-next.pol"
    switch_path.write_text(switch_text)
    switch_path.read_bytes()
    both, both_cpu = timed_cpu(["ipe-bpf", "policy", "deploy", "--activate", "--unsigned", str(switch_path)])
    compiled = compiled_switches(digest)
    report.set("cli", {
        "deploy_100k_s": round(deploy, 2), "activate_100k_s": round(activate, 2),
        "deploy_100k_cpu_s": round(deploy_cpu, 2), "activate_100k_cpu_s": round(activate_cpu, 2),
        # a switch from the active 100k policy to another one in one command
        "deploy_activate_100k_s": round(both, 2), "deploy_activate_100k_cpu_s": round(both_cpu, 2),
        **compiled,
        **cli_start(),
        "memory_before": {m.name: m.memlock for m in before},
        "memory_100k": {m.name: m.memlock for m in after},
    })


def compiled_switches(digest: str) -> dict[str, float]:
    """`policy deploy --activate --compiled`: switches to other 100k-rule policies compiled
    beforehand (`policy compile`, what a build host does; not timed), unsigned (as the text figures
    above), then signed (policy and compiled policy, one throwaway ECDSA P-256 signer)."""
    keys = WORK / "bench-keys"
    keys.mkdir(exist_ok=True)
    key, cert = keys / "signer.key", keys / "signer.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=ipe-bpf bench", "-days", "2"],
                   check=True, capture_output=True)
    figures: dict[str, float] = {}
    for n, (kind, signed) in enumerate((("unsigned", False), ("signed", True))):
        text = policy_text(100_000, digest, random.Random(7 + n)).replace(
            "policy_name=bench policy_version=0.0.1", f"policy_name=bench_{kind} policy_version=1.0.{2 + n}")
        path = WORK / f"bench-100k-{kind}.pol"
        path.write_text(text)
        signing = ["--key", str(key), "--cert", str(cert)] if signed else []
        subprocess.run(["ipe-bpf", "policy", "compile", str(path), "-o", f"{path}.ipec", *signing],
                       check=True, stdout=subprocess.DEVNULL)
        blob = path
        if signed:
            blob = path.with_suffix(".p7s")
            subprocess.run(["ipe-bpf", "policy", "sign", str(path), "-o", str(blob), *signing],
                           check=True, stdout=subprocess.DEVNULL)
        Path(f"{path}.ipec").read_bytes(), blob.read_bytes()  # in the page cache, as the text figures
        trust = ["--trust", str(cert)] if signed else ["--unsigned"]
        elapsed, cpu = timed_cpu(["ipe-bpf", "policy", "deploy", "--activate", *trust, str(blob),
                                  "--compiled", f"{path}.ipec"])
        figures[f"deploy_activate_100k_compiled_{kind}_s"] = round(elapsed, 2)
        figures[f"deploy_activate_100k_compiled_{kind}_cpu_s"] = round(cpu, 2)
    return figures


def measure(helper: Path, targets: dict[str, Path], cases: tuple[tuple[str, str], ...],
            counts: dict[str, int], repeat: dict[str, int]) -> dict[tuple[str, str], list[float]]:
    """ns per operation of each case's blocks: repeat[op] blocks of it (default one)."""
    return {(op, t): [block(helper, op, targets[t], counts[op]) for _ in range(repeat.get(op, 1))]
            for op, t in cases}


def run_size(report: Report, n: int, ctx: dict, att: Attachment, rng: random.Random, args: argparse.Namespace,
             kernel_ipe_on: bool) -> None:
    helper, targets, digest, counts, repeat = ctx["helper"], ctx["targets"], ctx["digest"], ctx["counts"], ctx["repeat"]
    t0 = time.monotonic()
    compiled = compile_policy(model_policy(n, digest, rng))
    t1 = time.monotonic()
    with PinnedPolicyMaps() as maps:
        maps.install(compiled, generation=n)
    t2 = time.monotonic()
    del compiled
    mem = {m.name: m.memlock for m in memory.pinned_memory()}
    report.add("install", {"rules": n, "compile_s": round(t1 - t0, 2), "install_s": round(t2 - t1, 2),
                           "memory": mem})
    states = ["base", "ipe-bpf"]
    if kernel_ipe_on:
        text = policy_text(n, digest, random.Random(n))
        try:
            kernel_ipe_deploy("bench_full", text)
            states.append("kernel IPE")
        except SystemExit as refused:
            report.add("notes", f"{n} rules: {refused}")

    def enter(state: str) -> None:
        att.on() if state == "ipe-bpf" else att.off()
        if kernel_ipe_on:
            kernel_ipe.activate("bench_full" if state == "kernel IPE" else "bench_empty")

    samples: dict[str, dict[tuple[str, str], list[float]]] = {s: {c: [] for c in CASES} for s in states}
    order = states + states[::-1]
    for state in states:  # warm-up, not recorded: page cache, dentries, the cached decisions
        enter(state)
        measure(helper, targets, CASES, counts, repeat)
    for _ in range(args.rounds):
        for state in order:
            enter(state)
            for case, ns in measure(helper, targets, CASES, counts, repeat).items():
                samples[state][case].extend(ns)
    enter("base")
    if not args.no_fapolicyd:
        samples["fapolicyd"] = fapolicyd_samples(report, n, ctx, rng, args)
    base = {c: statistics.median(v) for c, v in samples["base"].items()}
    for state, by_case in samples.items():
        if state == "base":
            continue
        for (op, target), values in by_case.items():
            if not values:
                continue
            ns = statistics.median(values)
            report.add("rows", {"system": state, "rules": n, "op": op, "target": target,
                                "base_ns": round(base[(op, target)]), "ns": round(ns),
                                "ratio": round(ns / base[(op, target)], 4)})
    print(f"# {n} rules measured", file=sys.stderr, flush=True)


def fapolicyd_samples(report: Report, n: int, ctx: dict, rng: random.Random,
                      args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    helper, targets = ctx["helper"], ctx["targets"]
    write_config([helper, *targets.values()], n, rng)
    daemon = Fapolicyd(helper, ctx["untrusted"], WORK / "fapolicyd.log")
    out: dict[tuple[str, str], list[float]] = {c: [] for c in FAPOLICYD_CASES}
    try:
        daemon.start()
        measure(helper, targets, FAPOLICYD_CASES, ctx["counts"], ctx["repeat"])  # warm-up (its caches), not recorded
        report.add("fapolicyd_start", {"rules": n, "seconds": round(daemon.start_seconds, 2)})
        for _ in range(args.rounds * 2):
            for case, ns in measure(helper, targets, FAPOLICYD_CASES, ctx["counts"], ctx["repeat"]).items():
                out[case].extend(ns)
    except (RuntimeError, subprocess.CalledProcessError) as err:
        report.add("notes", f"fapolicyd at {n} entries: {err}")
    finally:
        daemon.stop()
    return out


def load_figures(report: Report) -> None:
    """The loader's time to load and attach (loader as $IPE_BPF_LOADER), and CLI start-up."""
    t0 = time.monotonic()
    loaded = loader.load()
    seconds = time.monotonic() - t0
    report.set("load", {"kernel": os.uname().release, "loader": loaded.loader, "load_s": round(seconds, 2),
                        **cli_start()})


def cli_start() -> dict[str, float]:
    """Start-up (`--version`: imports and the command tree), `--help` (rich renders it) and
    `status`, each the fastest of three runs."""
    return {f"{name}_s": round(min(timed(["ipe-bpf", *argv]) for _ in range(3)), 3)
            for name, argv in (("version", ["--version"]), ("help", ["--help"]), ("status", ["status"]))}


def setup(args: argparse.Namespace) -> dict:
    helper, verity, plain, digest = prepare()
    untrusted = verity.parent / "untrusted"
    untrusted.write_bytes(helper.read_bytes())
    untrusted.chmod(0o755)
    return {"helper": helper, "targets": {"fsverity": verity, "plain": plain}, "digest": digest,
            "untrusted": untrusted, "counts": {"exec": args.execs, "mmap": args.mmaps, "open": args.opens},
            "repeat": {"exec": args.exec_blocks}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,550,10000,100000")
    ap.add_argument("--big", default="1000000", help="sizes run in a child process ('' for none)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--execs", type=int, default=100)
    ap.add_argument("--exec-blocks", type=int, default=3,
                    help="exec blocks per state and round: an exec block varies by ~0.5 %% with the kernel's "
                         "page allocations, longer blocks do not average that out, more blocks do")
    ap.add_argument("--mmaps", type=int, default=2000)
    ap.add_argument("--opens", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("/results/report.json"))
    ap.add_argument("--child", action="store_true", help="(internal) the big sizes")
    ap.add_argument("--no-fapolicyd", action="store_true")
    ap.add_argument("--big-fapolicyd", action="store_true",
                    help="fapolicyd at the --big sizes too (its trust database loads at ~1.6 s per 1k entries: "
                         "about half an hour of guest time at 1M)")
    ap.add_argument("--load-only", action="store_true", help="only the program's load time and CLI start-up")
    ap.add_argument("--cli-only", action="store_true", help="only load, the CLI figures (100k deploy + activate, "
                                                             "map memory, start-up)")
    args = ap.parse_args()
    report = Report(args.out)
    if args.load_only:
        load_figures(report)
        return
    if args.cli_only:
        WORK.mkdir(parents=True, exist_ok=True)
        loader.load()
        cli_figures(report, "sha256:" + "00" * 32)
        return
    rng = random.Random(1)
    ctx = setup(args)
    if args.child:
        t0 = time.monotonic()
        loader.load()  # the tables are sized per policy: no bigger maps to ask for
        report.add("notes", f"sizes {args.sizes}: reloaded in a child process in {time.monotonic() - t0:.1f} s")
        att = Attachment()
        for n in (int(s) for s in args.sizes.split(",")):
            run_size(report, n, ctx, att, rng, args, kernel_ipe_on=False)
        return
    with_peer = kernel_ipe.IPE_FS.is_dir()  # 6.1 has no kernel IPE: ipe-bpf alone
    if with_peer:
        kernel_ipe.set_enforce(False)
        kernel_ipe.set_success_audit(False)
        kernel_ipe_deploy("bench_empty", "policy_name=bench policy_version=0.0.1\nDEFAULT action=ALLOW\n")
        kernel_ipe.activate("bench_empty")
    else:
        report.add("notes", "no kernel IPE in this kernel")
    t0 = time.monotonic()
    loaded = loader.load()
    report.set("env", {"kernel": os.uname().release, "loader": loaded.loader,
                       "load_s": round(time.monotonic() - t0, 2), "rounds": args.rounds,
                       "counts": ctx["counts"], "repeat": ctx["repeat"], "time": "guest ns (--icount: 1 ns per instruction)"})
    cli_figures(report, ctx["digest"])
    att = Attachment()
    for n in (int(s) for s in args.sizes.split(",")):
        run_size(report, n, ctx, att, rng, args, kernel_ipe_on=with_peer)
    att.on()
    if args.big:
        att.off()  # this process holds the links and programs: let them go, the child loads afresh
        for fd in att.prog_fds:
            os.close(fd)
        loader.unload()
        argv = [sys.executable, __file__, "--child", "--sizes", args.big, "--out", str(args.out),
                "--rounds", str(args.rounds), "--execs", str(args.execs), "--exec-blocks", str(args.exec_blocks),
                "--mmaps", str(args.mmaps),
                "--opens", str(args.opens), *([] if args.big_fapolicyd and not args.no_fapolicyd else ["--no-fapolicyd"])]
        if not args.big_fapolicyd:
            Report(args.out).add("notes", f"sizes {args.big}: no fapolicyd (--big-fapolicyd measures it; its trust "
                                          f"database loads at ~1.6 s per 1k entries)")
        status = subprocess.run(argv).returncode
        if status:
            Report(args.out).add("notes", f"sizes {args.big}: child exited with status {status}"
                                          f"{' (killed: out of memory?)' if status < 0 or status == 137 else ''}")


if __name__ == "__main__":
    main()
