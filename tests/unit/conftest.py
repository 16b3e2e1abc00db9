"""Every unit test gets its own per-boot run directory (``$IPE_BPF_RUN_DIR``): the serial
counter and the audit daemon's spool that the lifecycle writes never land in this machine's
/run/ipe-bpf; no service settings file (``$IPE_BPF_CONFIG``) unless it writes one; and 1422
records in the 6.12 format whatever this machine's kernel is (``$IPE_BPF_AUDIT_ERRNO``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _run_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path_factory.mktemp("run")
    monkeypatch.setenv("IPE_BPF_RUN_DIR", str(path))
    monkeypatch.setenv("IPE_BPF_CONFIG", str(path / "absent.conf"))
    monkeypatch.setenv("IPE_BPF_AUDIT_ERRNO", "0")
    return path
