"""Settings of the test VM: where its cache lives, which guest it builds and boots."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "IPE_BPF_CACHE"
KERNEL_ENV = "IPE_BPF_VM_KERNEL"
BACKPORTS_ENV = "IPE_BPF_VM_BACKPORTS"  # 1: also use SUITE-backports (newer kernels)

SUITE = "trixie"
# The guest kernel, pinned: trixie's 6.12 cloud flavour (BPF LSM and IPE in the default LSM
# list, BTF, fs-verity, dm-verity).  The package name carries the ABI; its Debian version was
# 6.12.117-1 when this was pinned (2026-11-28).  Override with $IPE_BPF_VM_KERNEL if the
# archive stops serving it.
KERNEL_RELEASE = "6.12.117+deb13-cloud-amd64"


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
    kernel_release: str = KERNEL_RELEASE
    suite: str = SUITE
    backports: bool = False  # add the SUITE-backports archive (kernel and linux-base from it)
    mirror: str | None = None  # None: resolved from the host's apt configuration at build time
    memory_mib: int = 2048
    initramfs_memory_mib: int = 4096
    cpus: int = 2

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "VmConfig":
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "cache_dir": default_cache_dir(env),
            "kernel_release": env.get(KERNEL_ENV) or KERNEL_RELEASE,
            "backports": env.get(BACKPORTS_ENV, "").strip().lower() in ("1", "yes", "true", "on"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def vm_dir(self) -> Path:
        return self.cache_dir / "vm"

    @property
    def images_dir(self) -> Path:
        return self.vm_dir / "images"

    @property
    def debs_dir(self) -> Path:
        return self.vm_dir / "debs"

    @property
    def runs_dir(self) -> Path:
        return self.vm_dir / "runs"

    @property
    def lock_path(self) -> Path:
        return self.vm_dir / "build.lock"

    @property
    def kernel_packages(self) -> tuple[str, str]:
        return (f"linux-image-{self.kernel_release}", f"linux-headers-{self.kernel_release}")
