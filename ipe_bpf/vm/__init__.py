"""The ipe-bpf test VM: a Debian trixie guest whose Linux 6.12 has BPF LSM and IPE, under QEMU.

Entry points:

- :func:`run_in_vm` (``ipe-bpf vm run``): boot once, run a command as root in ``/work`` (the
  project), stream the console, copy ``/results`` back, return the command's exit status
  (125 when the guest never reported).  Builds the image first if there is none.
- :func:`build_image` (``ipe-bpf vm build``): mmdebstrap + mke2fs, cached by input hash.
- :func:`plan_setup` / :func:`apply_setup` (``ipe-bpf vm setup``): host prerequisites.

Layout: ``config`` (settings, cache paths), ``mirror`` (Debian mirror from the host's apt),
``image`` (build and cache), ``qemu`` (command line), ``disks`` (work/control/results disks),
``console`` (marker parsing), ``run`` (one boot), ``setup`` and ``host`` (host checks),
``guest/`` (package list and the PID-1 script).
"""

from __future__ import annotations

from .config import VmConfig
from .image import Image, build_image, find_image
from .run import NO_REPORT, RunOutcome, RunRequest, run_in_vm, run_vm
from .setup import apply_setup, plan_setup

__all__ = [
    "NO_REPORT",
    "Image",
    "RunOutcome",
    "RunRequest",
    "VmConfig",
    "apply_setup",
    "build_image",
    "find_image",
    "plan_setup",
    "run_in_vm",
    "run_vm",
]
