"""load twice, unload restores, unload twice (runs last: it unloads the program)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from ipe_bpf.errors import KernelError
from ipe_bpf.kernel import loader, pins

from .kernel_fixtures import Kernel, expected_hooks, get_kernel, ipe, kernel, policy  # noqa: F401

EACCES = 13


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["python3", "-m", "ipe_bpf", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_loading_twice_is_refused_without_touching_the_loaded_program(kernel: Kernel) -> None:
    r = _cli("load")
    assert r.returncode == 1 and r.stderr.startswith("EEXIST:") and len(r.stderr.strip().splitlines()) == 1
    assert pins.is_loaded()


def test_a_policy_compiled_and_signed_elsewhere_is_enforced_as_compiled(ipe: Kernel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`policy compile` (a build host's job) then `policy deploy --compiled --activate` through the
    CLI: the kernel enforces the compiled tables; tables of another text change nothing."""
    key, cert = tmp_path / "signer.key", tmp_path / "signer.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=build host", "-days", "2"],
                   check=True, capture_output=True)
    signing = ["--key", str(key), "--cert", str(cert)]
    made = {}
    for name, rule in (("deny_bad", f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"),
                       ("deny_good", f"op=EXECUTE fsverity_digest={ipe.good_digest} action=DENY")):
        text = tmp_path / f"{name}.pol"
        text.write_text(policy(rule, name="zzcompiled"))
        for args in (["compile", str(text), "-o", f"{text}.ipec"], ["sign", str(text), "-o", f"{text}.p7s"]):
            r = _cli("policy", *args, *signing)
            assert r.returncode == 0, r.stderr
        made[name] = (f"{text}.p7s", f"{text}.ipec")
    store = {"IPE_BPF_STATE_DIR": str(tmp_path / "store")}  # the suite's own store stays as it is
    (blob, compiled), (_, other) = made["deny_bad"], made["deny_good"]
    r = _cli("policy", "deploy", blob, "--trust", str(cert), "--compiled", other, "--activate", env=store)
    assert r.returncode == 1 and r.stderr.startswith(f"deploy: {other}: EINVAL: compiled from another policy text")
    assert ipe.exec_status(ipe.good) == 0 and ipe.exec_status(ipe.bad) == 0  # no policy installed
    r = _cli("policy", "deploy", blob, "--trust", str(cert), "--compiled", compiled, "--activate", env=store)
    assert r.returncode == 0, r.stderr
    assert 'deployed and activated policy "zzcompiled" 0.0.1' in r.stdout and "enforced now" in r.stdout
    assert ipe.exec_status(ipe.bad) == EACCES
    assert ipe.exec_status(ipe.good) == 0


def test_unload_restores_and_second_unload_is_an_error(ipe: Kernel) -> None:
    ipe.activate(policy(f"op=EXECUTE fsverity_digest={ipe.bad_digest} action=DENY"))
    assert ipe.exec_status(ipe.bad) == EACCES
    assert sorted(loader.attached_link_ids()) == expected_hooks()
    waited = loader.unload()
    assert waited < 10
    assert not pins.is_loaded()
    assert ipe.exec_status(ipe.bad) == 0
    with pytest.raises(KernelError) as e:
        loader.unload()
    assert e.value.errno_name == "ENOENT"
    r = _cli("unload")
    assert r.returncode == 1 and r.stderr.startswith("ENOENT:")
    status = json.loads(_cli("status", "--json").stdout)
    assert status["loaded"] is False and "counters" not in status


def test_load_applies_the_stored_active_policy_and_audit_names_its_rules(kernel: Kernel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """End to end through the CLI: deploy + activate while unloaded, then `load` enforces it."""
    assert not pins.is_loaded()
    text = policy(f"op=EXECUTE fsverity_digest={kernel.bad_digest} action=DENY", name="zzload")
    path = tmp_path / "zz.pol"
    path.write_text(text)
    for args in (["policy", "deploy", str(path), "--unsigned"], ["policy", "activate", "zzload"]):
        r = _cli(*args)
        assert r.returncode == 0, r.stderr
    r = _cli("load")
    assert r.returncode == 0, r.stderr
    assert "active policy: zzload" in r.stdout
    try:
        status = json.loads(_cli("status", "--json").stdout)
        assert status["loaded"] and status["active_policy"]["name"] == "zzload"
        assert status["generation"] == status["active_policy"]["generation"]
        assert any(p["name"] == "zzload" for p in status["policies"])
        assert kernel.exec_status(kernel.bad) == EACCES
        assert kernel.exec_status(kernel.good) == 0
        lines = _cli("audit", "tail").stdout.splitlines()
        assert any(f'path="{kernel.bad}"' in line and
                   f'rule="op=EXECUTE fsverity_digest="sha256":{kernel.bad_digest.split(":")[1].upper()} action=DENY"' in line
                   for line in lines), lines
    finally:
        loader.unload()


@pytest.mark.requires("setintegrity_hooks")  # without inode_setintegrity no signature state is known
def test_signature_checked_before_load_is_known_or_never_taken_as_false(kernel: Kernel) -> None:
    """Signed and unsigned fs-verity files whose signatures the kernel checked before ipe-bpf
    was loaded, kept open across the load (their inodes and verity info stay): the program did
    not see the checks, so `load` tells it (files in use: from their signature metadata), and
    the decisions equal kernel IPE's.  A verity file whose state the program has no record of
    is unknown, and a decision that hangs on it is denied (fail-closed), never taken as FALSE."""
    import struct

    from ipe_bpf.kernel import bpfsys

    from .kernel_fixtures import sh
    from .test_enforce_fsverity_signature import verity_pair

    assert not pins.is_loaded()
    _, mnt, signed, unsigned = verity_pair("early", kernel.good, b"\3\4")
    held = [open(signed, "rb"), open(unsigned, "rb")]  # in use across the load
    try:
        loader.load()
        try:
            kernel.activate(policy("op=EXECUTE fsverity_signature=TRUE action=DENY"))
            assert kernel.exec_status(signed) == EACCES  # as kernel IPE decides: signed
            assert kernel.exec_status(unsigned) == 0  # not signed: allowed
            # forget what load told the program about `unsigned`: its state is unknown now
            with kernel.maps() as maps:
                assert bpfsys.delete(maps.map_fd("ipe_inodes", write=True), struct.pack("=i", held[1].fileno()))
                before = maps.counters().undecidable
            kernel.activate(policy("op=EXECUTE fsverity_signature=TRUE action=DENY"))  # a new epoch
            assert kernel.exec_status(unsigned) == EACCES  # fail-closed, never a guessed FALSE
            kernel.activate(policy(f"op=EXECUTE fsverity_digest={kernel.bad_digest} action=DENY"))
            assert kernel.exec_status(unsigned) == 0  # a policy whose answer does not hang on it
            with kernel.maps() as maps:
                assert maps.counters().undecidable == before + 1
        finally:
            loader.unload()
    finally:
        for f in held:
            f.close()
        sh("umount", mnt, check=False)
