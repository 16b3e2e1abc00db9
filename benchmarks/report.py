#!/usr/bin/env python3
"""ipe-bpf vs kernel IPE vs fapolicyd across policy sizes: one VM boot, a table and a plot.

    python3 benchmarks/report.py                 # the whole comparison (about an hour under TCG)
    python3 benchmarks/report.py --load-times    # also: program load time per kernel line (4 boots)
    python3 benchmarks/report.py --render DIR    # only redraw DIR/report.md and DIR/overhead.png

Boots the 6.12 test VM once with `--icount` (guest time: 1 ns per instruction, so runs are
deterministic and independent of the host's load) and the test key in UEFI db (kernel IPE takes
only signed policies), runs benchmarks/report_guest.py there (what is measured, and how, is in
its docstring) and writes, from the guest's report.json, into --out (default benchmarks/results):

    report.json    the guest's figures
    report.md      the tables (ratios to no enforcement, per size and system)
    overhead.png   overhead against policy size (log x), exec and mmap/open, one line per system

The plot needs matplotlib (the `bench` extra: pip install -e '.[bench]'); it is installed into
this Python with pip when missing.  --load-times boots 6.1, 6.12 (CO-RE and BCC) and 7.x without
--icount and records how long loading the program takes (emulated wall time) and the CLI's
start-up.  The host's compile time for 100k rules comes from benchmarks/compile_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

SYSTEMS = ("ipe-bpf", "kernel IPE", "fapolicyd")
LOAD_BOOTS = (("6.1", "core"), ("6.12", "core"), ("6.12", "bcc"), ("7.x", "core"))


def ipe_bpf_cli() -> list[str]:
    exe = Path(sys.executable).parent / "ipe-bpf"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ipe_bpf"]


def run_guest(out: Path, guest_args: list[str]) -> int:
    argv = [*ipe_bpf_cli(), "vm", "run", "--icount", "--uefi-db", str(ROOT / "tests/vm/keys/uefi-db-test.pem"),
            "--project", str(ROOT), "--results", str(out / "guest"), "--timeout", "0", "--",
            "python3", "benchmarks/report_guest.py", *guest_args]
    print("+", " ".join(argv), flush=True)
    status = subprocess.run(argv).returncode
    found = out / "guest" / "report.json"
    if found.exists():
        (out / "report.json").write_bytes(found.read_bytes())
    return status


def run_load_times(out: Path) -> list[dict]:
    rows = []
    for kernel, loader in LOAD_BOOTS:
        results = out / f"load-{kernel}-{loader}"
        argv = [*ipe_bpf_cli(), "vm", "run", "--kernel", kernel, "--project", str(ROOT), "--results", str(results),
                "--quiet", "--", "python3", "benchmarks/report_guest.py", "--load-only", "--out", "/results/load.json"]
        print("+", f"IPE_BPF_LOADER={loader}", " ".join(argv), flush=True)
        subprocess.run(argv, env={**os.environ, "IPE_BPF_LOADER": loader})
        found = results / "load.json"
        rows.append(json.loads(found.read_text())["load"] if found.exists()
                    else {"kernel": kernel, "loader": loader, "error": "no result (see the console log)"})
    (out / "load.json").write_text(json.dumps(rows, indent=1))
    return rows


def host_compile_100k() -> dict:
    from compile_bench import measure  # the mixed-rule policy of compile_bench.py

    row = measure(100_000, 1)
    return {"rules": row.rules, "compile_s": round(row.compile_s, 2), "compile_cpu_s": round(row.compile_cpu_s, 2),
            "encode_s": round(row.encode_s, 2), "encode_cpu_s": round(row.encode_cpu_s, 2), "digests": row.digests,
            "rule_entries": row.rule_entries}


def _start(row: dict) -> str:
    """The CLI's start-up figures of a report row (older reports have no `--version`)."""
    version = f"`ipe-bpf --version` {row['version_s']} s, " if "version_s" in row else ""
    return f"{version}`ipe-bpf --help` {row['help_s']} s, `ipe-bpf status` {row['status_s']} s"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else (
        f"{n // 1000}k" if n >= 10_000 and n % 1000 == 0 else str(n))


def render_markdown(data: dict) -> str:
    rows = data.get("rows", [])
    sizes = sorted({r["rules"] for r in rows})
    cases = [("exec", "fsverity"), ("exec", "plain"), ("mmap", "fsverity"), ("mmap", "plain"),
             ("open", "fsverity"), ("open", "plain")]
    by = {(r["system"], r["rules"], r["op"], r["target"]): r for r in rows}
    head = "| system | operation | file | " + " | ".join(_size(n) for n in sizes) + " |"
    out = ["Overhead (time with enforcement / time without; medians of guest time under `--icount`; "
           "`-` = not measured, kernel IPE takes at most 64 KiB of signed policy, fapolicyd sees no mmap):", "",
           head, "|" + "---|" * (3 + len(sizes))]
    for system in SYSTEMS:
        for op, target in cases:
            cells = [by.get((system, n, op, target)) for n in sizes]
            if not any(cells):
                continue
            text = [f"{c['ratio']:.3f}" if c else "-" for c in cells]
            out.append(f"| {system} | {op} | {target} | " + " | ".join(text) + " |")
    base = {(r["op"], r["target"]): r["base_ns"] for r in rows if r["rules"] == sizes[0]} if sizes else {}
    if base:
        out += ["", "Without enforcement: " + ", ".join(f"{op} {t} {ns / 1000:.1f} us" for (op, t), ns in sorted(base.items()))]
    out += ["", *_facts(data)]
    return "\n".join(out) + "\n"


def _repeat(env: dict) -> str:
    extra = {op: k for op, k in env.get("repeat", {}).items() if k > 1}
    return "".join(f", {k} {op} blocks per state and round" for op, k in extra.items())


def _facts(data: dict) -> list[str]:
    lines = []
    env = data.get("env")
    if env:
        lines.append(f"- guest kernel {env['kernel']}, loader {env['loader']}, {env['rounds']} rounds, "
                     f"blocks of {env['counts']}{_repeat(env)}; loading and attaching the program took {env['load_s']} s of guest time")
    for row in data.get("install", []):
        mem = row.get("memory", {})
        lines.append(f"- {_size(row['rules'])} rules, ipe-bpf: compile {row['compile_s']} s + install "
                     f"{row['install_s']} s (guest, library calls); map memory {_mib(sum(mem.values()))} "
                     f"(ipe_digests {_mib(mem.get('ipe_digests', 0))}, ipe_rules {_mib(mem.get('ipe_rules', 0))})")
    cli = data.get("cli")
    if cli:
        mem = cli["memory_100k"]
        cpu = (f" (CPU {cli['deploy_100k_cpu_s']} s + {cli['activate_100k_cpu_s']} s; the rest is waiting on the "
               f"virtual disk)" if "deploy_100k_cpu_s" in cli else "")
        lines.append(f"- CLI, 100k rules: `ipe-bpf policy deploy` {cli['deploy_100k_s']} s + `policy activate` "
                     f"{cli['activate_100k_s']} s of guest time{cpu}; map memory then {_mib(sum(mem.values()))}; "
                     f"{_start(cli)}")
        if "deploy_activate_100k_s" in cli:
            lines.append(f"- CLI, a switch to another 100k-rule policy in one command (`policy deploy --activate`): "
                         f"{cli['deploy_activate_100k_s']} s of guest time (CPU {cli['deploy_activate_100k_cpu_s']} s)")
        if "deploy_activate_100k_compiled_unsigned_s" in cli:
            lines.append("- CLI, the same switch with the policy compiled on a build host (`policy compile`, then "
                         "`policy deploy --activate --compiled`): " + "; ".join(
                             f"{kind} {cli[f'deploy_activate_100k_compiled_{kind}_s']} s of guest time "
                             f"(CPU {cli[f'deploy_activate_100k_compiled_{kind}_cpu_s']} s)" for kind in ("unsigned", "signed")))
    for row in data.get("fapolicyd_start", []):
        lines.append(f"- fapolicyd with {_size(row['rules'])} trust entries: ready after {row['seconds']} s")
    host = data.get("host_compile")
    if host:
        lines.append(f"- host compile of 100k mixed rules (compile_bench.py): {host['compile_s']} s "
                     f"(cpu {host['compile_cpu_s']} s) + packing the tables {host['encode_s']} s"
                     f"{' (cpu ' + str(host['encode_cpu_s']) + ' s)' if 'encode_cpu_s' in host else ''}; {host['digests']} digests, "
                     f"{host['rule_entries']} rule entries")
    for row in data.get("load", []):
        what = f"{row['load_s']} s" if "load_s" in row else row.get("error", "?")
        extra = f", {_start(row)}" if "help_s" in row else ""
        lines.append(f"- load ({row.get('loader')}) on {row.get('kernel')}: {what}{extra} (emulated wall time)")
    lines += [f"- note: {n}" for n in data.get("notes", [])]
    return lines


def ensure_matplotlib():  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib>=3.5"], check=True)
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_plot(data: dict, path: Path) -> None:
    plt = ensure_matplotlib()
    rows = data.get("rows", [])
    panels = (("exec", "exec (fork+execve+wait)"), ("mmap", "mmap PROT_EXEC + munmap"), ("open", "open+read+close"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.6), sharey=False)
    styles = {"ipe-bpf": "tab:blue", "kernel IPE": "tab:red", "fapolicyd": "tab:green"}
    for ax, (op, title) in zip(axes, panels):
        for system in SYSTEMS:
            for target, dash in (("fsverity", "-"), ("plain", "--")):
                pts = sorted((r["rules"], r["ratio"]) for r in rows
                             if r["system"] == system and r["op"] == op and r["target"] == target)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], dash, marker="o", color=styles[system],
                            label=f"{system}, {target} file")
        ax.set_xscale("log")
        ax.axhline(1.05, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(title)
        ax.set_xlabel("policy size (rules / trust entries)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time / time without enforcement")
    axes[0].legend(fontsize=8)
    fig.suptitle("Overhead against policy size (guest time, QEMU --icount; dotted: 1.05)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(out: Path) -> None:
    data = json.loads((out / "report.json").read_text())
    for name in ("load.json", "host_compile.json"):
        if (out / name).exists():
            data[name.split(".")[0]] = json.loads((out / name).read_text())
    (out / "report.md").write_text(render_markdown(data))
    render_plot(data, out / "overhead.png")
    print((out / "report.md").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--render", type=Path, help="only render this directory's report.json")
    ap.add_argument("--load-times", action="store_true", help="also boot each kernel line to time the program's load")
    ap.add_argument("--no-measure", action="store_true", help="skip the --icount comparison boot")
    args, guest_args = ap.parse_known_args()
    if args.render:
        render(args.render)
        return 0
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_compile.json").write_text(json.dumps(host_compile_100k(), indent=1))
    status = 0
    if not args.no_measure:
        status = run_guest(out, guest_args)
    if args.load_times:
        run_load_times(out)
    render(out)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
