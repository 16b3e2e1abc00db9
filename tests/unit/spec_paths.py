"""Where the shared IPE spec lives: ../shared/spec beside the checkout, or $IPE_BPF_SPEC_DIR."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def spec_dir() -> Path:
    override = os.environ.get("IPE_BPF_SPEC_DIR")
    return Path(override) if override else REPO.parent / "shared" / "spec"
