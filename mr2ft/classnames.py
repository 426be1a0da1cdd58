"""Class names and prompt templates read from the user's files, for CLIP's text heads.

Owns: :func:`read_name_file` (one name per line, a JSON list, or a JSON object renaming classes),
:func:`rename_classes` (apply such a file to a dataset's class names), :func:`read_templates` (prompt templates
holding ``{}``) and :func:`prompt_names`. ``zeroshot``, ``eval`` and ``finetune --head zeroshot`` (WiSE-FT) use them.
Library level: imports only :mod:`mr2ft.errors`.
"""

from __future__ import annotations

import json
from pathlib import Path

from mr2ft.errors import UserError


def read_name_file(path: str | Path, what: str) -> list[str] | dict[str, str]:
    """A list of names (one per line, or a JSON list) or a JSON object mapping old names to new ones.

    Raises:
        UserError: missing or unreadable file, or not one of those shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; give one name per line, or JSON")
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{what} file {path} is not valid JSON ({e.msg} at line {e.lineno}); fix it") from None
        ok_list = isinstance(data, list) and all(isinstance(v, str) for v in data)
        ok_map = isinstance(data, dict) and all(isinstance(v, str) for v in data.values())
        if not (ok_list or ok_map):
            raise UserError(f"{what} file {path} must hold a JSON list of strings or an object of name: new name")
        return data
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise UserError(f"{what} file {path} is empty; write one name per line")
    return names


def rename_classes(names: list[str], mapping: list[str] | dict[str, str] | None, source: str) -> list[str]:
    """Apply a ``--class-names`` file to a dataset's class names.

    A JSON object renames the names it holds. A list gives the names in class order, or, for class folders named
    by index (ImageNetV2's ``0`` .. ``999``), the name of each index.

    Raises:
        UserError: a list that fits neither way.
    """
    if mapping is None:
        return list(names)
    if isinstance(mapping, dict):
        return [mapping.get(n, n) for n in names]
    if len(mapping) == len(names):
        return list(mapping)
    if all(n.isdigit() for n in names) and max(int(n) for n in names) < len(mapping):
        return [mapping[int(n)] for n in names]
    raise UserError(
        f"--class-names {source} lists {len(mapping)} names for {len(names)} classes; give one name per class "
        "in class order, or a JSON object mapping folder names to class names"
    )


def read_templates(path: str | Path | None) -> list[str] | None:
    """Prompt templates from a file (one per line, or a JSON list), each holding ``{}``; None for the defaults.

    Raises:
        UserError: missing file, a JSON object, or a template without ``{}``.
    """
    if path is None:
        return None
    templates = read_name_file(path, "--templates")
    if isinstance(templates, dict):
        raise UserError(f"--templates {path} must list templates (one per line or a JSON list), not a JSON object")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UserError(
            f"template {bad[0]!r} in {path} has no '{{}}' for the class name; write e.g. 'a photo of a {{}}.'"
        )
    return templates


def prompt_names(class_names: list[str], path: str | Path | None) -> list[str]:
    """The names put into the prompts: the dataset's class names, renamed by a ``--class-names`` file."""
    mapping = read_name_file(path, "--class-names") if path is not None else None
    return rename_classes(class_names, mapping, str(path))


__all__ = ["prompt_names", "read_name_file", "read_templates", "rename_classes"]
