"""What a Debian mirror serves: the kernel releases in a suite's package index.

Only used to choose a kernel's name (the newest of a floating line, or the release to name when
a pinned one is gone); mmdebstrap then downloads and verifies everything it installs against
the archive's signed Release file.
"""

from __future__ import annotations

import gzip
import lzma
import re
import urllib.error
import urllib.request

from ..errors import VmError
from .lines import FLAVOUR, KernelLine, newest_release

INDEXES = (("Packages.xz", lzma.decompress), ("Packages.gz", gzip.decompress))
_IMAGE = re.compile(r"^Package: linux-image-(\S+" + re.escape(FLAVOUR) + r")$", re.M)


def index_url(mirror: str, suite: str, name: str) -> str:
    return f"{mirror.rstrip('/')}/dists/{suite}/main/binary-amd64/{name}"


def fetch_index(mirror: str, suite: str, timeout: float = 120) -> str:
    """The text of SUITE's main amd64 package index on MIRROR (xz, else gz)."""
    last = ""
    for name, unpack in INDEXES:
        url = index_url(mirror, suite, name)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                return unpack(reply.read()).decode("utf-8", errors="replace")
        except urllib.error.HTTPError as err:
            last = f"{url}: HTTP {err.code}"
        except urllib.error.URLError as err:
            if not isinstance(err.reason, FileNotFoundError):  # file: mirrors
                raise VmError("ENETUNREACH", f"cannot read {url}: {err.reason}") from None
            last = f"{url}: no such file"
        except (OSError, lzma.LZMAError, EOFError) as err:
            raise VmError("ENETUNREACH", f"cannot read {url}: {err}") from None
    raise VmError("ENOENT", f"{mirror} has no package index for {suite} ({last})")


def kernel_releases(index: str) -> list[str]:
    """The cloud kernel releases a package index offers (``linux-image-<release>`` packages)."""
    return sorted(set(_IMAGE.findall(index)))


def served_release(line: KernelLine, mirror: str) -> str:
    """The newest release of LINE its suite on MIRROR serves; ENOENT if it serves none."""
    found = newest_release(line, kernel_releases(fetch_index(mirror, line.kernel_suite)))
    if found is None:
        raise VmError(
            "ENOENT",
            f"{mirror} {line.kernel_suite} serves no {line.name} kernel (linux-image-{line.series}*{FLAVOUR})",
        )
    return found
