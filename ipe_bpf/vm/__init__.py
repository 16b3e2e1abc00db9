"""The ipe-bpf test VM: Debian guests with BPF LSM on three kernel lines, under QEMU.

Lines (``lines.py``): ``6.1`` (bookworm, no kernel IPE), ``6.12`` (trixie, kernel IPE, BCC; the
default) and ``7.x`` (trixie-backports' newest); each has its own cached image.

Entry points:

- :func:`run_in_vm` (``ipe-bpf vm run``): boot once, run a command as root in ``/work`` (the
  project), stream the console, copy ``/results`` back, return the command's exit status
  (125 when the guest never reported).  Builds the image first if there is none.
- :func:`build_image` (``ipe-bpf vm build``): mmdebstrap + mke2fs, cached by input hash.
- :func:`plan_setup` / :func:`apply_setup` (``ipe-bpf vm setup``): host prerequisites.

Layout: ``config`` (settings, cache paths), ``lines`` (kernel lines), ``releases``
(which release a line means), ``archive`` (a mirror's package index), ``mirror`` (Debian mirror from the host's apt), ``wheels`` (the
guest's Python packages), ``inputs`` (what an image is built from, its key, mmdebstrap's
command line), ``image`` (build and cache), ``qemu`` (command line), ``disks`` (work/control/results disks),
``console`` (marker parsing), ``run`` (one boot), ``setup`` and ``host`` (host checks),
``guest/`` (package lists, the PID-1 script, the ``ipe-bpf`` wrapper).
"""

from __future__ import annotations

# Nothing is imported here: `ipe-bpf` starts without loading the VM tooling (import the modules).
