"""The default loader: the prebuilt CO-RE object (bpf/ipe_bpf.bpf.o) through libbpf.so.1.

No compiler and no kernel headers on the target: libbpf relocates the object against the
running kernel's BTF, the loader sizes the maps, leaves out the hooks this kernel does not
have or would not use (bpf_program__set_autoload), tells the program what it probed (.rodata,
frozen), loads and attaches.  Pinning is the caller's (loader.py), the same for both loaders.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

from ..bpf_files import OBJECT, bpf_file
from ..errors import KernelError
from . import libbpf
from .features import KernelFeatures

RINGBUF_PAGE = 4096
DEVICE_ENTRIES = 1024


@dataclass
class CoreProgram:
    """A loaded, attached CO-RE object: fds for the caller to pin, then close()."""

    obj: int
    links: dict[str, int] = field(default_factory=dict)  # hook -> struct bpf_link *

    def map_fd(self, name: str) -> int:
        m = libbpf.lib().bpf_object__find_map_by_name(self.obj, name.encode())
        if not m:
            raise KernelError("ENOENT", f"map {name} not found in {OBJECT}")
        return libbpf.check(libbpf.lib().bpf_map__fd(m), f"map {name}")

    def link_fds(self) -> dict[str, int]:
        return {hook: libbpf.check(libbpf.lib().bpf_link__fd(link), f"link {hook}")
                for hook, link in self.links.items()}

    def attach(self) -> None:
        """Attach every loaded program (an LSM link each)."""
        lib = libbpf.lib()
        for hook, prog in _programs(self.obj).items():
            if hook in self.links or not _is_loaded(prog):
                continue
            self.links[hook] = libbpf.check_ptr(lib.bpf_program__attach(prog), f"attach the {hook} program")

    def close(self) -> None:
        """Drop this process's references (pinned links and maps stay)."""
        lib = libbpf.lib()
        for link in self.links.values():
            lib.bpf_link__destroy(link)  # closes our fd; a pinned link stays attached
        self.links.clear()
        if self.obj:
            lib.bpf_object__close(self.obj)
            self.obj = 0


def _programs(obj: int) -> dict[str, int]:
    """hook name -> struct bpf_program * (section lsm/<hook>)."""
    lib = libbpf.lib()
    found: dict[str, int] = {}
    prog = lib.bpf_object__next_program(obj, None)
    while prog:
        section = (lib.bpf_program__section_name(prog) or b"").decode()
        if section.startswith("lsm/"):
            found[section.removeprefix("lsm/")] = prog
        prog = lib.bpf_object__next_program(obj, prog)
    return found


def _is_loaded(prog: int) -> bool:
    return libbpf.lib().bpf_program__fd(prog) >= 0


def _set_max_entries(obj: int, name: str, entries: int) -> None:
    lib = libbpf.lib()
    m = libbpf.check_ptr(lib.bpf_object__find_map_by_name(obj, name.encode()), f"map {name} in {OBJECT}")
    libbpf.check(lib.bpf_map__set_max_entries(m, entries), f"size map {name}")


def _set_rodata(obj: int, features: KernelFeatures) -> None:
    """The frozen load-time settings (ipe_load in ipe_bpf.bpf.c: fsverity_kfunc, fsv_sig_hook, dm_hook)."""
    lib = libbpf.lib()
    m = lib.bpf_object__next_map(obj, None)
    while m:
        if (lib.bpf_map__name(m) or b"").endswith(b".rodata"):
            size = ctypes.c_size_t()
            if not lib.bpf_map__initial_value(m, ctypes.byref(size)) or size.value < 3:
                raise KernelError("EINVAL", f"{OBJECT}: .rodata has no load settings")
            data = ctypes.create_string_buffer(size.value)
            data[0] = 1 if features.fsverity == "kfunc" else 0
            data[1] = 1 if "inode_setintegrity" in features.hooks else 0
            data[2] = 1 if "bdev_setintegrity" in features.hooks else 0
            libbpf.check(lib.bpf_map__set_initial_value(m, data, size.value), "set the load settings")
            return
        m = lib.bpf_object__next_map(obj, m)
    raise KernelError("EINVAL", f"{OBJECT} has no .rodata map (not built by scripts/build-bpf?)")


def _leave_out_unused(obj: int, features: KernelFeatures) -> None:
    """Load only the programs of the hooks worth attaching here (KernelFeatures.useful_hooks)."""
    lib = libbpf.lib()
    useful = set(features.useful_hooks)
    for hook, prog in _programs(obj).items():
        if hook not in useful:
            libbpf.check(lib.bpf_program__set_autoload(prog, False), f"leave out {hook}")


LOAD_LOG = Path("/run/ipe-bpf/load.log")


def _refused(err: int) -> KernelError:
    """The verifier said no: keep its whole log in LOAD_LOG, name the file in the error."""
    failure = libbpf.failure("the kernel refused the BPF program", err)
    try:
        LOAD_LOG.parent.mkdir(parents=True, exist_ok=True)
        LOAD_LOG.write_text("\n".join(libbpf.full_log()) + "\n")
        failure.message += f"; verifier log: {LOAD_LOG}"
    except OSError:
        pass
    return failure


def load_program(features: KernelFeatures, ringbuf_pages: int) -> CoreProgram:
    """Open, size, load and attach the object; the caller pins, then calls close()."""
    lib = libbpf.lib()
    path = bpf_file(OBJECT)
    if not path.is_file():
        raise KernelError("ENOENT", f"{path} missing (run scripts/build-bpf, or reinstall ipe-bpf)")
    with libbpf.collecting_log():
        obj = libbpf.check_ptr(lib.bpf_object__open_file(str(path).encode(), None), f"open {path}")
        program = CoreProgram(obj)
        try:
            _set_max_entries(obj, "ipe_devices", DEVICE_ENTRIES)
            _set_max_entries(obj, "ipe_events", ringbuf_pages * RINGBUF_PAGE)
            _set_rodata(obj, features)
            _leave_out_unused(obj, features)
            ret = lib.bpf_object__load(obj)
            if ret < 0:
                raise _refused(-ret)
            program.attach()
        except BaseException:
            program.close()
            raise
    return program
