"""Fixtures of the enforcement tests (tests/vm/test_enforce_*.py), inside the test VM.

The BPF program is compiled and loaded once per boot: `kernel` is idempotent (it loads
only if nothing is pinned yet), so importing it into several test modules costs one
compile.  It loads through a separate process that is SIGKILLed once the program is
pinned, so every test also checks that enforcement outlives the loader.

Scratch files live on a loop-mounted ext4 with the verity feature (fs-verity) and on
two dm-verity volumes: one opened before the load (recognised from its live device-mapper
table), one after (captured by the bdev_setintegrity hook where the kernel has it).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ipe_bpf.audit.record import AccessRecord
from ipe_bpf.kernel.events import records
from ipe_bpf.kernel import pins
from ipe_bpf.kernel.maps import PinnedPolicyMaps
from ipe_bpf.policy.compiler import CompiledPolicy, compile_policy
from ipe_bpf.policy.parser import parse_policy

ROOT = Path(__file__).resolve().parents[2]
ATTACKS = Path(__file__).resolve().parent / "attacks"
SCRATCH = Path("/run/ipe-test")
FSV = Path("/mnt/ipe-fsv")
LDSO = Path("/lib64/ld-linux-x86-64.so.2")

_generation = itertools.count(100)


def expected_hooks() -> list[str]:
    """The hooks a load attaches here: those of pins.HOOKS this kernel has (its BTF says so) and
    the loader's program holds; file_open and file_ioctl only where inode_setintegrity is (they
    note for it which verity set-ups it sees: on 6.1 they would cost every open for nothing)."""
    from ipe_bpf.kernel.features import probe

    have = set(probe().hooks)
    if "inode_setintegrity" not in have:
        have -= {"file_open", "file_ioctl"}
    if os.environ.get("IPE_BPF_LOADER") == "bcc":  # the seal's hooks are in the CO-RE object only
        have -= set(pins.SEAL_HOOKS)
    return sorted(h for h in pins.HOOKS if h in have)


def sh(*args: str | Path, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def measure(path: Path) -> str:
    """`fsverity measure` output digest: 'sha256:<hex>'."""
    return sh("fsverity", "measure", path).stdout.split()[0]


def verity_copy(src: Path, dst: Path, extra: bytes = b"") -> str:
    """Copy src to dst (plus extra bytes), make it executable, enable fs-verity; its digest."""
    data = src.read_bytes() + extra
    dst.write_bytes(data)
    dst.chmod(0o755)
    sh("fsverity", "enable", dst)
    return measure(dst)


@dataclass
class DmVerityVolume:
    name: str
    mount: Path
    roothash: str  # hex
    dev: int  # kernel dev_t of /dev/mapper/<name>

    @property
    def property(self) -> str:
        return f"dmverity_roothash=sha256:{self.roothash}"


def make_verity_volume(name: str, files: dict[str, Path],
                       signer: tuple[Path, Path] | None = None) -> DmVerityVolume:
    """An ext4 image with `files`, protected by dm-verity, opened and mounted read-only.

    With ``signer`` (key, certificate) the root hash is signed (PKCS#7, detached) and the
    volume opened with --root-hash-signature: the kernel checks it against its keyrings.
    """
    base = SCRATCH / name
    base.mkdir(parents=True, exist_ok=True)
    content = base / "content"
    content.mkdir(exist_ok=True)
    for fname, src in files.items():
        shutil.copy(src, content / fname)
        (content / fname).chmod(0o755)
    data, hashes = base / "data.img", base / "hash.img"
    sh("mke2fs", "-q", "-t", "ext4", "-b", "4096", "-d", content, data, "8M")
    out = sh("veritysetup", "format", data, hashes).stdout
    roothash = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Root hash"))
    data_loop = sh("losetup", "--show", "-f", "-r", data).stdout.strip()
    hash_loop = sh("losetup", "--show", "-f", "-r", hashes).stdout.strip()
    extra: list[str | Path] = []
    if signer is not None:
        (base / "roothash.txt").write_text(roothash)
        sh("openssl", "smime", "-sign", "-nocerts", "-noattr", "-binary", "-in", base / "roothash.txt",
           "-inkey", signer[0], "-signer", signer[1], "-outform", "der", "-out", base / "roothash.p7s")
        extra = [f"--root-hash-signature={base / 'roothash.p7s'}"]
    sh("veritysetup", "open", data_loop, name, hash_loop, roothash, *extra)
    mount = Path("/mnt") / name
    mount.mkdir(parents=True, exist_ok=True)
    sh("mount", "-o", "ro", "-t", "ext4", f"/dev/mapper/{name}", mount)
    st = os.stat(f"/dev/mapper/{name}")
    dev = (os.major(st.st_rdev) << 20) | os.minor(st.st_rdev)
    return DmVerityVolume(name, mount, roothash, dev)


@dataclass
class Kernel:
    """The loaded program plus the scratch files the tests execute."""

    attack: Path  # static helper, fs-verity, used to run the attacks
    attack_digest: str
    good: Path  # PIE helper copy with fs-verity
    good_digest: str
    bad: Path  # a modified copy of good (one extra byte), fs-verity
    bad_digest: str
    plain: Path  # PIE helper without fs-verity, on the same fs
    lib_good: Path
    lib_good_digest: str
    lib_bad: Path
    lib_bad_digest: str
    early_volume: DmVerityVolume
    hooked_volume: DmVerityVolume
    loader_seconds: float
    compiled: dict[int, CompiledPolicy] = field(default_factory=dict)

    # --- policy
    def activate(self, text: str) -> int:
        """Parse, compile and install a policy; returns its generation."""
        compiled = compile_policy(parse_policy(text.encode()))
        generation = next(_generation)
        self.compiled[generation] = compiled
        with PinnedPolicyMaps() as maps:
            maps.install(compiled, generation)
        return generation

    def reset(self) -> None:
        if not pins.is_loaded():
            return
        with PinnedPolicyMaps() as maps:
            maps.deactivate()
            maps.set_enforce(True)
            maps.set_success_audit(False)
        self.drain()

    def maps(self) -> PinnedPolicyMaps:
        return PinnedPolicyMaps()

    # --- actions
    def run(self, *args: str | Path, timeout: float = 60) -> int:
        """Run the static attack helper; its exit status (0 allowed, 13 EACCES, ...)."""
        return subprocess.run([str(self.attack), *map(str, args)], timeout=timeout).returncode

    def exec_status(self, path: Path, *args: str) -> int:
        """execve(path) through the helper: 0 if it ran and exited 0, 13 if refused."""
        return self.run("exec", path, *(args or ("true",)))

    # --- audit
    def drain(self) -> list[AccessRecord]:
        def rules(generation: int, index: int) -> str | None:
            c = self.compiled.get(generation)
            return c.rule_texts[index] if c is not None and index < len(c.rule_texts) else None

        return list(records(follow=False, rules=rules))

    def audit_for(self, path: Path) -> list[AccessRecord]:
        want = str(path).encode()
        return [r for r in self.drain() if r.path is not None and (r.path == want or want.endswith(b"/" + r.path))]


def _build_helpers() -> dict[str, Path]:
    out = SCRATCH / "build"
    out.mkdir(parents=True, exist_ok=True)
    cflags = ["-nostdlib", "-fno-stack-protector", "-fno-builtin", "-O1"]
    built = {
        "attack-static": ["-static", "-no-pie", *cflags],
        "attack-pie": ["-fPIE", "-pie", *cflags],
    }
    for name, flags in built.items():
        sh("gcc", *flags, "-o", out / name, ATTACKS / "attack.c")
    sh("gcc", "-shared", "-fPIC", "-nostdlib", "-o", out / "lib.so", ATTACKS / "lib.c")
    return {name: out / name for name in (*built, "lib.so")}


def _mount_fsverity_scratch() -> None:
    if os.path.ismount(FSV):
        return
    SCRATCH.mkdir(parents=True, exist_ok=True)
    img = SCRATCH / "fsv.img"
    sh("truncate", "-s", "128M", img)
    sh("mke2fs", "-q", "-t", "ext4", "-b", "4096", "-O", "verity", img)
    FSV.mkdir(parents=True, exist_ok=True)
    sh("mount", "-o", "loop", img, FSV)


def _load_with_killed_loader() -> float:
    """Load through a child process, SIGKILL it once pinned; seconds the load took."""
    started = time.monotonic()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    log = SCRATCH / "loader.stderr"
    with open(log, "w") as err:  # a file, not a pipe: BCC's warnings must never block it
        proc = subprocess.Popen(
            ["python3", "-m", "ipe_bpf.kernel.loader", "load", "--hold"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
        )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "READY":
            break
    else:
        proc.wait()
        raise RuntimeError(f"loader failed (status {proc.returncode}):\n{log.read_text()[-6000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return time.monotonic() - started


_state: dict[str, Kernel] = {}


def get_kernel() -> Kernel:
    if "k" in _state:
        return _state["k"]
    if os.environ.get("IPE_BPF_IN_VM") != "1":
        pytest.fail("kernel tests run inside the test VM only (ipe-bpf vm run -- pytest tests/vm)")
    for m in ("loop", "dm-verity"):
        sh("modprobe", m, check=False)
    _mount_fsverity_scratch()
    bins = _build_helpers()
    early = (
        make_verity_volume("ipe-early", {"prog": bins["attack-pie"], "other": bins["attack-static"]})
        if not Path("/dev/mapper/ipe-early").exists()
        else None
    )
    loader_seconds = 0.0
    if not pins.is_loaded():
        loader_seconds = _load_with_killed_loader()
    hooked = make_verity_volume("ipe-hooked", {"prog": bins["attack-pie"], "other": bins["attack-static"]})
    assert early is not None
    k = Kernel(
        attack=FSV / "attack",
        attack_digest=verity_copy(bins["attack-static"], FSV / "attack"),
        good=FSV / "good",
        good_digest=verity_copy(bins["attack-pie"], FSV / "good"),
        bad=FSV / "bad",
        bad_digest=verity_copy(bins["attack-pie"], FSV / "bad", extra=b"\0"),
        plain=FSV / "plain",
        lib_good=FSV / "libgood.so",
        lib_good_digest=verity_copy(bins["lib.so"], FSV / "libgood.so"),
        lib_bad=FSV / "libbad.so",
        lib_bad_digest=verity_copy(bins["lib.so"], FSV / "libbad.so", extra=b"\0"),
        early_volume=early,
        hooked_volume=hooked,
        loader_seconds=loader_seconds,
    )
    shutil.copy(bins["attack-pie"], k.plain)
    k.plain.chmod(0o755)
    _state["k"] = k
    return k


@pytest.fixture(scope="session")
def kernel() -> Kernel:
    return get_kernel()


@pytest.fixture
def ipe(kernel: Kernel) -> Iterator[Kernel]:
    """The kernel with no policy, enforcing, success_audit off, empty audit; reset after."""
    kernel.reset()
    try:
        yield kernel
    finally:
        kernel.reset()


ALLOW_ALL = "policy_name=allow policy_version=0.0.1\nDEFAULT action=ALLOW\n"


def policy(*rules: str, default: str = "ALLOW", name: str = "t", extra_defaults: str = "") -> str:
    """A policy text: header, global default, optional per-op defaults, rules."""
    lines = [f"policy_name={name} policy_version=0.0.1", f"DEFAULT action={default}"]
    if extra_defaults:
        lines.append(extra_defaults)
    lines.extend(rules)
    return "\n".join(lines) + "\n"
