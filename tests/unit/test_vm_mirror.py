"""Which Debian mirror the VM image is built from: host apt sources and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipe_bpf.errors import VmError
from ipe_bpf.vm.mirror import parse_deb822, parse_one_line, pick_mirror, resolve_mirror

DEB822 = """\
Types: deb deb-src
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_stanzas() -> None:
    sources = parse_deb822(DEB822, "x.sources")
    assert [s.uri for s in sources] == ["http://mirror.example/debian", "http://security.example/debian-security"]
    assert sources[0].base_suites == ("bookworm",)
    assert sources[1].base_suites == ()
    assert pick_mirror(sources) == "http://mirror.example/debian"


def test_deb822_disabled_and_source_only_stanzas_are_ignored() -> None:
    text = """\
Types: deb
URIs: http://off.example/debian
Suites: trixie
Enabled: no

Types: deb-src
URIs: http://src.example/debian
Suites: trixie

Types: deb
URIs: http://on.example/debian
Suites: stable
"""
    assert pick_mirror(parse_deb822(text, "x")) == "http://on.example/debian"


def test_one_line_sources_with_options_and_comments() -> None:
    text = """\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://one.example/debian/ bookworm main # trailing
deb http://one.example/debian-security bookworm-security main
"""
    sources = parse_one_line(text, "sources.list")
    assert [s.uri for s in sources] == ["http://one.example/debian", "http://one.example/debian-security"]
    assert pick_mirror(sources) == "http://one.example/debian"


def test_an_ubuntu_archive_is_not_a_debian_mirror() -> None:
    text = "deb http://archive.example/ubuntu noble main\ndeb http://archive.example/ubuntu noble-updates main\n"
    assert pick_mirror(parse_one_line(text, "x")) is None


def _etc(tmp_path: Path, sources: str | None = None, listed: str | None = None) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    if sources is not None:
        (etc / "sources.list.d" / "debian.sources").write_text(sources)
    if listed is not None:
        (etc / "sources.list").write_text(listed)
    (etc / "sources.list.d" / "other.list.disabled").write_text("deb http://ignored.example/debian sid main\n")
    return etc


def test_resolve_from_host_config(tmp_path: Path) -> None:
    assert resolve_mirror(env={}, etc_apt=_etc(tmp_path, sources=DEB822)) == "http://mirror.example/debian"


def test_sources_list_comes_before_the_parts_directory(tmp_path: Path) -> None:
    etc = _etc(tmp_path, sources=DEB822, listed="deb http://first.example/debian trixie main\n")
    assert resolve_mirror(env={}, etc_apt=etc) == "http://first.example/debian"


def test_option_beats_env_beats_host(tmp_path: Path) -> None:
    etc = _etc(tmp_path, sources=DEB822)
    env = {"IPE_BPF_MIRROR": "http://env.example/debian/"}
    assert resolve_mirror(None, env, etc) == "http://env.example/debian"
    assert resolve_mirror("file:///srv/mirror", env, etc) == "file:///srv/mirror"


def test_no_mirror_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VmError) as caught:
        resolve_mirror(env={}, etc_apt=_etc(tmp_path))
    assert caught.value.errno_name == "ENOENT"
    assert "IPE_BPF_MIRROR" in caught.value.message


def test_a_mirror_must_be_a_url() -> None:
    with pytest.raises(VmError):
        resolve_mirror("not a url", env={})
