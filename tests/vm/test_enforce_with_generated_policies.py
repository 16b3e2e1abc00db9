"""Policy generation on the real kernel: generate -> enforce, permissive -> learn -> enforce,
`policy explain --file` against the kernel's decisions, and a packed dm-verity image.

Copies of python3 and coreutils programs live on /work (ext4 with the verity feature); their
libraries are the guest's own (its root disk also has the verity feature, and every run starts
from a fresh snapshot of it, so enabling fs-verity there changes nothing beyond this boot).
Named to run after the other enforcement tests (it enables fs-verity on system libraries)
and before test_enforce_zz_lifecycle, which unloads the program.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ipe_bpf.audit.render import ipe_text, json_line
from ipe_bpf.cli import app
from ipe_bpf.kernel import measure
from ipe_bpf.kernel.features import running_kernel
from ipe_bpf.policy.evaluate import evaluate
from ipe_bpf.policy.model import Op
from ipe_bpf.policy.parser import format_rule, parse_policy

from .kernel_fixtures import ALLOW_ALL, Kernel, get_kernel, ipe, kernel  # noqa: F401
from .test_enforce_differential import _files, _random_policy, exec_under

BASE = Path("/work/.vm-scratch/generate")
COREUTILS = ("ls", "cat", "true", "sort", "sha256sum")
PY_ENV = {**os.environ, "PYTHONHOME": "/usr"}  # a python3 copy outside /usr still finds its library
SSL_IMPORT = "import _ssl; print(_ssl.OPENSSL_VERSION.split()[0])"
VOLUME = "ipe-gen-vol"


def cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (a python3 start costs seconds under emulation)."""
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2 mixes the streams unless told
    except TypeError:
        runner = CliRunner()
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    proc = subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)
    if check and proc.returncode != 0:
        pytest.fail(f"ipe-bpf {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=PY_ENV, timeout=120)


def denied(path: Path) -> bool:
    try:
        subprocess.run([str(path), "--version"], capture_output=True, timeout=60)
    except PermissionError:
        return True
    return False


@pytest.fixture(scope="module")
def tree(kernel: Kernel) -> Path:
    shutil.rmtree(BASE, ignore_errors=True)
    (BASE / "bin").mkdir(parents=True)
    (BASE / "unlisted").mkdir()
    shutil.copy(os.path.realpath("/usr/bin/python3"), BASE / "bin" / "python3")
    for name in COREUTILS:
        shutil.copy(f"/usr/bin/{name}", BASE / "bin" / name)
    shutil.copy("/usr/bin/head", BASE / "unlisted" / "head")
    return BASE


def workload(tree: Path) -> list[subprocess.CompletedProcess[str]]:
    return [run(tree / "bin/ls", "/"), run(tree / "bin/python3", "-c", "print(6 * 7)"),
            run(tree / "bin/python3", "-c", SSL_IMPORT)]


def test_generate_enforce_then_learn_from_permissive(ipe: Kernel, tree: Path) -> None:
    generated = tree / "generated.pol"
    made = cli("policy", "generate", "--enable-verity", "--name", "apps", "-o", generated, tree / "bin")
    assert "read-only" in made.stderr and f"dlopen: {tree / 'bin/python3'}" in made.stderr
    text = generated.read_bytes()
    assert cli("policy", "check", generated).returncode == 0
    policy = parse_policy(text)
    allowed = {str(r.properties[0].digest) for r in policy.rules}
    libc, ldso = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6"), os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    for f in [*(tree / "bin").iterdir(), Path(libc), Path(ldso)]:
        digest = measure.fsverity_digest(f)
        assert digest is not None and str(digest) in allowed, f  # fs-verity enabled, and its rule is there
        assert f"# {os.path.realpath(f)}\n".encode() in text
    assert measure.fsverity_digest(tree / "unlisted/head") is None

    ipe.activate(text.decode())
    ls, answer, ssl = workload(tree)
    assert (ls.returncode, answer.stdout) == (0, "42\n"), (ls.stderr, answer.stderr)
    assert ssl.returncode != 0 and "_ssl" in ssl.stderr  # its C extension is dlopen'ed: not in the closure
    assert denied(tree / "unlisted/head")

    # learn round: the same policy, permissive
    with ipe.maps() as maps:
        maps.set_enforce(False)
    ipe.drain()
    assert all(p.returncode == 0 for p in workload(tree))
    records = ipe.drain()
    assert any(r.action == "DENY" and r.path and b"/lib-dynload/_ssl.cpython-" in r.path
               for r in records), [(r.action, r.hook, r.path) for r in records if r.action == "DENY"][:30]
    (tree / "permissive.log").write_text("".join(ipe_text(r, n) + "\n" for n, r in enumerate(records, 1)))
    (tree / "permissive.json").write_text("".join(json_line(r, n) + "\n" for n, r in enumerate(records, 1)))
    learned = tree / "learned.pol"
    cli("policy", "learn", tree / "permissive.log", "--policy", generated, "--enable-verity", "-o", learned)
    from_json = cli("policy", "learn", tree / "permissive.json", "--policy", generated, "--json").stdout
    assert json.loads(from_json)["unlearnable"] == []
    new = parse_policy(learned.read_bytes())
    assert new.version == (0, 0, 2) and learned.read_bytes().startswith(text.replace(b"0.0.1", b"0.0.2", 1))
    assert len(new.rules) > len(policy.rules)
    ssl_so = f"_ssl.cpython-{sys.version_info.major}{sys.version_info.minor}-x86_64-linux-gnu.so\n"
    assert ssl_so.encode() in learned.read_bytes()

    # a fresh permissive run under the learned policy: nothing denied
    ipe.activate(ALLOW_ALL)
    ipe.activate(learned.read_text())
    ipe.drain()
    assert all(p.returncode == 0 for p in workload(tree))
    again = [r for r in ipe.drain() if r.action == "DENY"]
    assert again == [], [ipe_text(r, 0) for r in again[:5]]

    # and enforcing: the C extension loads, the unlisted program still does not run
    with ipe.maps() as maps:
        maps.set_enforce(True)
    ls, answer, ssl = workload(tree)
    assert (ls.returncode, answer.returncode, ssl.returncode) == (0, 0, 0), ssl.stderr
    assert ssl.stdout.startswith("OpenSSL")
    assert denied(tree / "unlisted/head")


def test_explain_file_agrees_with_the_kernel(ipe: Kernel, tmp_path: Path) -> None:
    rng = random.Random(1420)
    files = list(_files(ipe))
    with ipe.maps() as maps:
        maps.set_success_audit(True)
    measured = {path: measure.measure(path) for path in files}
    here = running_kernel()  # what it cannot evaluate is FALSE
    assert here is not None
    mismatches = []
    for n in range(12):
        text = _random_policy(rng, ipe, n)
        parsed = parse_policy(text.encode())
        kernel = {r.path: r for r in exec_under(ipe, text, files) if r.hook == "BPRM_CHECK"}
        pol = tmp_path / f"p{n}.pol"
        pol.write_text(text)
        for path in files:
            got = kernel[str(path).encode()]
            attrs = measured[path].attributes()
            want = evaluate(parsed, Op.EXECUTE, here.as_evaluated(attrs))
            if got.action != want.action.name:
                mismatches.append((n, str(path), got.action, want.action.name))
            if n < 3:  # the CLI itself, for the first policies
                shown = cli("policy", "explain", pol, "--file", path, "--exit-status", "--json", check=False)
                assert shown.returncode == (0 if got.action == "ALLOW" else 1), shown.stderr
                audit = json.loads(shown.stdout)["audit"]
                assert audit.endswith(f'ino={got.ino} rule="{got.rule}"'), (audit, got.rule)
                assert f'dev="{got.dev.decode()}"' in audit
    assert not mismatches, mismatches


def test_packed_volume_is_allowed_by_its_generated_rule(ipe: Kernel, tree: Path) -> None:
    src = tree / "volume-src"
    src.mkdir(exist_ok=True)
    shutil.copy(ipe.attack, src / "prog")  # static: needs no library
    shutil.copy(ipe.attack, tree / "prog-copy")
    image = tree / "apps.img"
    packed = json.loads(cli("verity", "pack", src, "-o", image, "--json").stdout)
    mount = Path("/mnt") / VOLUME
    cli("verity", "open", image, VOLUME, "--mount", mount)
    try:
        made = cli("policy", "generate", "--no-closure", mount / "prog", tree / "prog-copy", "--enable-verity")
        policy = parse_policy(made.stdout.encode())
        volume_rule = f"op=EXECUTE dmverity_roothash=sha256:{packed['roothash']} action=ALLOW"
        assert volume_rule == packed["rule"] and volume_rule in [format_rule(r).decode() for r in policy.rules]
        assert f"# {mount / 'prog'}\n# dm-verity volume /dev/mapper/{VOLUME}\n{volume_rule}" in made.stdout
        # allow the volume only, not the copy of the same program
        only_volume = made.stdout.split("\n\n")[0] + f"\n{volume_rule}\n"
        ipe.activate(only_volume)
        assert subprocess.run([str(mount / "prog")]).returncode == 0
        assert denied(tree / "prog-copy")
        ipe.activate(ALLOW_ALL)
        (tree / "only.pol").write_text(only_volume)
        shown = cli("policy", "explain", tree / "only.pol", "--file", mount / "prog", "--exit-status", "--json",
                    check=False)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["file"]["dmverity_roothash"] == f"sha256:{packed['roothash']}"
    finally:
        ipe.activate(ALLOW_ALL)
        cli("verity", "close", VOLUME, check=False)
    assert not Path(f"/dev/mapper/{VOLUME}").exists()
