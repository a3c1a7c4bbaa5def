"""What every `tandem` sub-command shares: a clean exit on bad input, and a model option resolved to a path."""
from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from tandem import assets
from tandem.errors import TandemError


def fail(message: str) -> NoReturn:
    """Print `error: message` and exit with status 2, without a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def model_option(option: str, value: str) -> str:
    """An installed model's name or a path, as the path of the model; else exit naming the option."""
    if value.lower() not in assets.REGISTRY and not Path(value).expanduser().exists():
        fail(f"{option}: {value} does not exist")
    try:
        return str(assets.resolve(value))
    except TandemError as e:
        fail(f"{option}: {e}")


def item_range(option: str, value: str) -> tuple[int, int]:
    """`START:STOP` as two integers; else exit naming the option."""
    try:
        start, stop = (int(x) for x in value.split(":"))
    except ValueError:
        fail(f"{option}: expected START:STOP, got {value!r}")
    return start, stop
