"""Running the build's helper programs with their output logged and summarised."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..errors import VmError
from .progress import StepHandle


def run_logged(argv: Sequence[str], log: Path, step: StepHandle | None = None, cwd: Path | None = None) -> None:
    """Run ARGV with stdout+stderr appended to LOG, feeding its last line to STEP.

    Raises VmError(EIO) with the last output line and the log path when it fails.
    """
    last = ""
    with log.open("ab") as sink:
        sink.write(("$ " + " ".join(argv) + "\n").encode())
        sink.flush()
        try:
            proc = subprocess.Popen(
                list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd
            )
        except OSError as err:
            raise VmError("ENOENT", f"cannot run {argv[0]}: {err.strerror}") from None
        assert proc.stdout is not None
        pending = b""
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                sink.write(chunk)
                pending += chunk
                *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
                for line in lines:
                    text = line.decode(errors="replace").strip()
                    if text:
                        last = text
                        if step is not None:
                            step.update(text)
            rc = proc.wait()
        except BaseException:
            # interrupted: let the program clean up (mmdebstrap unmounts its chroot), then insist
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if rc != 0:
        tail = last or "(no output)"
        raise VmError("EIO", f"{Path(argv[0]).name} failed with exit status {rc}: {tail} (full log: {log})")
