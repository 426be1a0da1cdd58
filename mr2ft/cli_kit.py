"""How the command line talks to the user, for :mod:`mr2ft.cli`: one ``error:`` line and exit code 2 for every
mistake (a :class:`UserError`, a Click usage error, a full disk or read-only folder), the cheap checks that run
before torch or any job is imported, how a command's options are gathered, and the --help panels and defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from mr2ft import runs
from mr2ft.errors import UserError

try:  # the Click that Typer runs: its own copy from Typer 0.20 on, the click package before
    from typer._click import exceptions as _click
except ImportError:  # pragma: no cover
    from click import exceptions as _click

# --debug (or MR2FT_DEBUG): errors keep their traceback. Set by the CLI's callback on every invocation.
DEBUG = {"on": bool(os.environ.get("MR2FT_DEBUG"))}


class OneLineErrors(TyperGroup):
    """Click's usage errors as one ``error:`` line and exit code 2, instead of Typer's five-line box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # Exit(n) comes back as n
        except _click.NoArgsIsHelpError as e:  # the help was printed already
            code = e.exit_code
        except typer.Abort:
            typer.echo("aborted", err=True)
            code = 1
        except _click.ClickException as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
            message = " ".join(e.format_message().split()).rstrip(".")
            typer.echo(f"error: {message[:1].lower()}{message[1:]}{hint}", err=True)
            code = 2
        sys.exit(code if isinstance(code, int) else 0)


# A file system refusing a write is the user's to fix (free space, another folder), not a bug: what, and the fix.
_FREE = "free some space or choose another --out / --cache-dir (a run folder is left as it was before)"
_WRITABLE = "choose a folder you can write to (--out / --cache-dir) or fix its permissions"
DISK_ERRORS = {
    errno.ENOSPC: ("no space left on the device", _FREE),
    errno.EDQUOT: ("the disk quota is used up", _FREE),
    errno.EROFS: ("the file system is read-only", _WRITABLE),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("permission denied", _WRITABLE),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter --out / --cache-dir"),
}


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`UserError` (or a full disk, a read-only folder) into one line on stderr and exit code 2 (a
    traceback only with --debug); let go of every run folder the command claimed."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if DEBUG["on"]:
                raise
            typer.echo(f"error: {e.message}", err=True)
            raise typer.Exit(code=2) from None
        except OSError as e:
            if DEBUG["on"] or e.errno not in DISK_ERRORS:
                raise
            what, fix = DISK_ERRORS[e.errno]
            typer.echo(f"error: {what}{f' ({e.filename})' if e.filename else ''}; {fix}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None
        finally:
            runs.release()

    return wrapper


# ---- gathering and checking a command's settings ----------------------------------------------------------


def _grid(text: str | None, option: str) -> tuple[float, ...] | None:
    """Parse a comma-separated grid of numbers (their ranges are checked with the config)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} must be comma-separated numbers such as 0.5,1,2, got {text!r}") from None


def settings(ctx: typer.Context, *grids: str) -> dict[str, Any]:
    """The command's options exactly as Click parsed them (``None``: not typed), grids parsed into tuples."""
    values = dict(ctx.params)
    for name in grids:
        values[name] = _grid(values[name], "--" + name.replace("_", "-"))
    return values


def check_paths(
    dataset: str | None, out: str | None, overwrite: bool | None, cache_dir: str | None = None, resumable: bool = False
) -> None:
    """The cheap checks before the job module (and torch) is imported: a dataset path that does not exist, an
    --out or --cache-dir that cannot be written, an --out another run holds (claimed here, released by
    :func:`user_errors`)."""
    spec = dataset or ""
    looks_like_path = "/" in spec or os.sep in spec or spec.startswith((".", "~"))
    if looks_like_path and not spec.startswith(("hf:", "wds:")) and not Path(spec).expanduser().exists():
        raise UserError(
            f"dataset {spec!r} is neither an existing folder or CSV file nor a known name; give a path, "
            "hf:NAME[:CONFIG], or a known name such as cifar100 or fashion-mnist"
        )
    if cache_dir:
        runs.check_folder_path(Path(cache_dir), "--cache-dir")
    if out:
        runs.check_run_dir(Path(out), overwrite=bool(overwrite), resumable=resumable)


# --help groups the options of probe, finetune and study into these panels (anything else: Advanced).
PANELS = {
    "Model": "backbone model weights normalize pool image_size head templates class_names",
    "Data": "dataset image_column label_column val_fraction shots max_per_class test_max_per_class "
    "skip_bad_images follow_links num_workers randaugment mixup cutmix samples_per_class",
    "Training": "loss optimizer lr mixed_precision weight_decay layer_decay drop_path epochs batch_size grad_accum "
    "grad_clip warmup_epochs warmup_steps min_lr model_ema label_smoothing seed seeds max_steps early_stop mode blr "
    "schedule lr_steps converge_tol standardize",
    "MR2": "c_bar lambda_rep p momentum margin_mode temperature_factor",
    "Validation sweeps": "sweep_wd wd_grid sweep_cbar sweep_temperature cbar_grid sweep_criterion jtt_upweight n_boot",
    "Output": "out overwrite recipe baseline resume checkpoint_every eval_every wise_alpha report_to",
    "Speed and memory": "grad_checkpointing compile channels_last",
}
PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names.split()}


def documented(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give each option of a command its help panel and, in --help, the default it takes from ``cls``.

    The options default to None (so that a recipe can set what the user did not type); the default shown is the
    config's own. Each command gets its own copy of a shared option (the defaults differ: probe's lr is not
    finetune's).
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        params = []
        for param in sig.parameters.values():
            info = param.default
            if isinstance(info, typer.models.OptionInfo):
                info = copy.copy(info)
                info.rich_help_panel = info.rich_help_panel or PANEL_OF.get(param.name, "Advanced")
                shown = _shown(defaults.get(param.name))
                info.show_default = shown if shown is not None else False
                param = param.replace(default=info)
            params.append(param)
        fn.__signature__ = sig.replace(parameters=params)
        return fn

    return decorate


def _shown(default: Any) -> str | None:
    """A config default as --help shows it (None: nothing to show)."""
    if default is None or default == "" or default is dataclasses.MISSING:
        return None
    if isinstance(default, bool):
        return "yes" if default else "no"
    if isinstance(default, tuple):
        return ",".join(f"{v:g}" for v in default)
    return f"{default:g}" if isinstance(default, float) else str(default)
