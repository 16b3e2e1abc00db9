"""`ipe-bpf`: a thin typer CLI; every command calls one library function.

Start-up time matters (`ipe-bpf --help` on a small machine): the command modules keep no
`from __future__ import annotations`, since typer would `eval()` every string annotation of
every command each run to build the command tree; and main() defers the two modules typer's
help renderer imports for features ipe-bpf does not use (_defer_unused_rich).
"""

import importlib
import sys
import types
from typing import Annotated, Any, Optional

import typer

from .. import __version__
from . import generate, kernel, policy, seal, service, vm

app = typer.Typer(
    name="ipe-bpf",
    help="IPE integrity policies enforced through BPF LSM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(policy.app, name="policy")
kernel.register(app)
seal.register(app)
service.register(app)
app.add_typer(vm.app, name="vm")
generate.register(app, policy.app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ipe-bpf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    """IPE integrity policies enforced through BPF LSM."""


class _Deferred(type):
    """A stand-in for a class of a module not imported yet: any use imports the real module
    and hands over to the real class."""

    def _real_class(cls) -> Any:
        stub = sys.modules.get(cls.__module__)
        if getattr(stub, "__ipe_bpf_stand_in__", False):
            del sys.modules[cls.__module__]
        return getattr(importlib.import_module(cls.__module__), cls.__name__)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real_class()(*args, **kwargs)

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(cls._real_class(), name)

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, cls._real_class())


def _defer_unused_rich() -> None:
    """typer.rich_utils, imported to render --help and usage errors, imports rich.markdown
    (markdown-it) for rich_markup_mode="markdown" and rich.traceback (pygments) for pretty
    exceptions: ipe-bpf uses neither ("rich" markup, pretty_exceptions_enable=False), and the
    two imports were 0.1 s of a 0.7 s `--help` in the test VM.  Stand-ins import them at first use."""
    for module, name in (("rich.markdown", "Markdown"), ("rich.traceback", "Traceback")):
        if module not in sys.modules:
            stub = types.ModuleType(module)
            stub.__ipe_bpf_stand_in__ = True  # type: ignore[attr-defined]
            setattr(stub, name, _Deferred(name, (), {"__module__": module}))
            sys.modules[module] = stub


def main() -> None:
    _defer_unused_rich()
    app()
