"""The README cannot rot: every command it shows parses against the real CLI, and its Python example runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer.main

from mr2ft.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def readme_commands() -> list[list[str]]:
    """Every ``mr2ft ...`` line of the README's bash blocks, as argv after ``mr2ft`` (comments dropped)."""
    commands = []
    for block in code_blocks("bash"):
        block = re.sub(r"\\\n\s*", " ", block)  # a command continued over several lines is one command
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            words = shlex.split(line)
            if "mr2ft" in words and words[0] in ("mr2ft", "accelerate"):
                commands.append(words[words.index("mr2ft") + 1 :])
    return commands


def test_readme_shows_every_job():
    jobs = {c[0] for c in readme_commands()}
    assert {"probe", "finetune", "report", "compare", "study", "recipes"} <= jobs
    assert "make demo" in README.read_text() and "make test" in README.read_text()


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses(argv):
    """Options exist and values have the right types (click parses without running the command)."""
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    cmd, args = group, list(argv)
    while isinstance(cmd, click.Group):
        name, args = args[0], args[1:]
        cmd = cmd.get_command(ctx, name)
        assert cmd is not None, f"README shows an unknown command {name!r}"
    cmd.make_context(cmd.name, args)


def test_readme_python_example_runs():
    (block,) = [b for b in code_blocks("python") if "MR2Loss" in b]
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["out"]["loss"].ndim == 0
    assert namespace["criterion"].stats.seen.any()


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
