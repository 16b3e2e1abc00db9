"""A root disk kept between boots (``vm run --state DIR``): reboots in the test VM.

The first boot with DIR copies the cached image's ``root.img`` into ``DIR/root.img`` (sparse)
and notes which image it came from in ``DIR/image``; every boot with DIR then runs on that copy
without ``snapshot=on``, so what the guest wrote (enabled units, /var/lib, /var/log) is there
at the next boot.  A DIR made from another image (its inputs changed since) is refused with
ESTALE rather than booted: remove it to start over.  The copy costs the image's used blocks
(about 0.7 GiB), written once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..errors import VmError
from .image import ROOT_FILE, Image

IMAGE_NOTE = "image"


def state_root(directory: Path, image: Image) -> Path:
    """DIR/root.img, made from ``image`` on first use; ESTALE if DIR came from another image."""
    root, note = directory / ROOT_FILE, directory / IMAGE_NOTE
    if note.is_file():
        made_from = note.read_text().strip()
        if made_from != image.key:
            raise VmError("ESTALE", f"{directory} holds the root disk of VM image {made_from}, not of the "
                                    f"current image {image.key}: remove it to start from the current one")
        if not root.is_file():
            raise VmError("ENOENT", f"{root} is missing: remove {directory} to start over")
        return root
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{ROOT_FILE}.partial"
    done = subprocess.run(["cp", "--sparse=always", str(image.root), str(partial)], capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise VmError("EIO", f"cannot copy {image.root} to {directory}: {done.stderr.strip()}")
    partial.rename(root)
    note.write_text(image.key + "\n")
    return root
