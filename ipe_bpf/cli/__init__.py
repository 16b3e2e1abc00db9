"""`ipe-bpf`: a thin typer CLI; every command calls one library function."""

from __future__ import annotations

from typing import Annotated, Optional

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


def main() -> None:
    app()
