"""The ``mr2ft`` command line: parses options, resolves the config, calls the library. No training logic here."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from mr2ft import __version__
from mr2ft.errors import UserError

app = typer.Typer(
    name="mr2ft",
    help="Fine-tune pretrained vision backbones with MR2 and see, class by class, what happened to the hard classes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEBUG = {"on": bool(os.environ.get("MR2FT_DEBUG"))}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mr2ft {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """mr2ft: MR2 margin regularization for fine-tuning and probing vision backbones."""
    DEBUG["on"] = DEBUG["on"] or debug


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`UserError` into one line on stderr and exit code 2 (a traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if DEBUG["on"]:
                raise
            typer.echo(f"error: {e.message}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


# ---- commands -------------------------------------------------------------------------------------------------


def run() -> None:  # pragma: no cover - console entry used by ``python -m mr2ft``
    app(prog_name="mr2ft")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
