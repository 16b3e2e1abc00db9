"""Which Debian mirror the guest image is built from.

The mirror is never written into the project: it comes from ``$IPE_BPF_MIRROR`` (or the
``--mirror`` option) or else from this machine's own apt configuration: the first enabled
``deb`` source of a Debian release suite, in ``/etc/apt/sources.list.d/*.sources`` (deb822)
or the one-line ``sources.list`` files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmError

MIRROR_ENV = "IPE_BPF_MIRROR"

# Release codenames and aliases of Debian itself (an Ubuntu archive cannot serve trixie).
DEBIAN_SUITES = frozenset(
    {
        "stretch", "buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
        "oldoldstable", "oldstable", "stable", "testing", "unstable",
    }
)


@dataclass(frozen=True)
class AptSource:
    """One ``deb`` source: a URI and the suites it serves."""

    uri: str
    suites: tuple[str, ...]
    origin: str

    @property
    def base_suites(self) -> tuple[str, ...]:
        """Suites without a ``-updates``/``-security``/``-backports`` part."""
        return tuple(s for s in self.suites if "-" not in s and "/" not in s)

    def is_debian_release(self) -> bool:
        return self.uri.startswith(("http://", "https://", "file:")) and any(
            s in DEBIAN_SUITES for s in self.base_suites
        )


def parse_deb822(text: str, origin: str) -> list[AptSource]:
    """The enabled ``Types: deb`` stanzas of a ``.sources`` file."""
    sources: list[AptSource] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            if raw[0] in " \t" and key is not None:
                fields[key] += " " + raw.strip()
                continue
            name, sep, value = raw.partition(":")
            if not sep:
                continue
            key = name.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").strip().lower() in {"no", "false", "0"}:
            continue
        suites = tuple(fields.get("suites", "").split())
        for uri in fields.get("uris", "").split():
            sources.append(AptSource(uri.rstrip("/"), suites, origin))
    return sources


def parse_one_line(text: str, origin: str) -> list[AptSource]:
    """The ``deb`` lines of a one-line-style ``sources.list``."""
    sources: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line[4:])
        words = line.split()
        if len(words) >= 2:
            sources.append(AptSource(words[0].rstrip("/"), (words[1],), origin))
    return sources


def host_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """Every enabled ``deb`` source of the host's apt configuration, in apt's order."""
    found: list[AptSource] = []
    main_list = etc_apt / "sources.list"
    files: list[Path] = [main_list] if main_list.is_file() else []
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in {".list", ".sources"})
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        parser = parse_deb822 if path.suffix == ".sources" else parse_one_line
        found += parser(text, str(path))
    return found


def pick_mirror(sources: Iterable[AptSource]) -> str | None:
    """The URI of the first Debian release source, if any."""
    for source in sources:
        if source.is_debian_release():
            return source.uri
    return None


def resolve_mirror(
    override: str | None = None,
    env: Mapping[str, str] | None = None,
    etc_apt: Path = Path("/etc/apt"),
) -> str:
    """The mirror to build from: the override, ``$IPE_BPF_MIRROR``, else the host's apt."""
    env = os.environ if env is None else env
    for candidate in (override, env.get(MIRROR_ENV)):
        if candidate:
            if "://" not in candidate and not candidate.startswith("file:"):
                raise VmError("EINVAL", f"mirror {candidate!r} is not a URL (expected http://HOST/PATH)")
            return candidate.rstrip("/")
    mirror = pick_mirror(host_sources(etc_apt))
    if mirror is None:
        raise VmError(
            "ENOENT",
            f"no Debian mirror in {etc_apt}/sources.list{{,.d/*}} (this is not a Debian host?): "
            f"set {MIRROR_ENV} or pass --mirror with the URL of a Debian archive mirror",
        )
    return mirror
