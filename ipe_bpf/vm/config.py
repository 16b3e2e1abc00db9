"""Settings of the test VM: where its cache lives, which kernel line it builds and boots."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .lines import DEFAULT_LINE, KernelChoice, KernelLine, parse_kernel

CACHE_ENV = "IPE_BPF_CACHE"
KERNEL_ENV = "IPE_BPF_VM_KERNEL"  # the default of --kernel: a line (6.1, 6.12, 7.x) or a release


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$IPE_BPF_CACHE``, else ``~/.cache/ipe-bpf`` (honouring ``$XDG_CACHE_HOME``)."""
    env = os.environ if env is None else env
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ipe-bpf"


@dataclass(frozen=True)
class VmConfig:
    """Everything that decides where the VM lives and what goes into it."""

    cache_dir: Path
    kernel: str = DEFAULT_LINE  # a line name or an exact release (see lines.py)
    mirror: str | None = None  # None: resolved from the host's apt configuration at build time
    memory_mib: int = 2048
    initramfs_memory_mib: int = 4096
    cpus: int = 2

    def __post_init__(self) -> None:
        parse_kernel(self.kernel)  # a kernel that names no line is an error before any work

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "VmConfig":
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "cache_dir": default_cache_dir(env),
            "kernel": env.get(KERNEL_ENV) or DEFAULT_LINE,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def vm_dir(self) -> Path:
        return self.cache_dir / "vm"

    @property
    def images_dir(self) -> Path:
        return self.vm_dir / "images"

    def debs_dir(self, suite: str) -> Path:
        """The .deb cache of one Debian suite (a sibling of the single debs/ older versions kept)."""
        return self.vm_dir / f"debs-{suite}"

    @property
    def runs_dir(self) -> Path:
        return self.vm_dir / "runs"

    @property
    def lock_path(self) -> Path:
        return self.vm_dir / "build.lock"

    @property
    def wheels_dir(self) -> Path:
        return self.vm_dir / "wheels"

    @property
    def choice(self) -> KernelChoice:
        """The line and (unless it floats) the release --kernel names; EINVAL if it names none."""
        return parse_kernel(self.kernel)

    def resolved_path(self, line: KernelLine) -> Path:
        """Where the release a floating line last resolved to is remembered."""
        return self.vm_dir / "lines" / line.name
