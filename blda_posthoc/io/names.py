"""Reading the ``--class-names`` option: a preset, a comma-separated list, a text or JSON file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blda_posthoc.core.classes import PRESETS
from blda_posthoc.errors import InputError

MAX_CLASSES = 255
"""Class ids are uint8 trainIds and 255 is ignore."""
MIN_CLASSES = 2
"""A segmentation needs two classes at least (one class leaves nothing to decide or correct)."""

JSON_KEYS = ("classes", "class_names")
"""Keys of a JSON object that hold the list of names (``{"classes": [...]}``, as many datasets
ship; ``class_names`` as the stores and stats files write it)."""


def describe_names(names: Sequence[str], limit: int = 6) -> str:
    """A short human-readable form of parsed names for error messages.

    Example:
        >>> describe_names(["road", "sidewalk", "building"])
        "3 names: 'road', 'sidewalk', 'building'"
    """
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} name{'s' if len(names) != 1 else ''}: {shown}{more}"


def unnamed_classes_note(num_classes: int, path: Path | str) -> str:
    """The note printed when a store's classes were named ``class_0 ...`` for lack of names."""
    return (
        f"note: no --class-names: the {num_classes} classes are named "
        f"class_0..class_{num_classes - 1}; name them later with "
        f"`blda info --rename-classes NAMES {path}` (NAMES as for --class-names)"
    )


def read_class_names(spec: str) -> list[str]:
    """Resolve a class-names spec.

    Args:
        spec: A preset name (``cityscapes``); a path to a JSON file holding a list of names or
            an object ``{"classes": [...]}``; a path to a text file with one name per line
            (blank lines skipped); or a comma-separated list.

    Returns:
        The class names, in channel order.

    Raises:
        InputError: the spec is none of these, or the names are empty, repeated or more than
            255; the message shows what was parsed.
    """
    if spec.lower() in PRESETS:
        return list(PRESETS[spec.lower()])
    path = Path(spec)
    if _is_file(path):
        names = _names_from_file(path)
        source = str(path)
    elif "," in spec:
        names = [part.strip() for part in spec.split(",")]
        source = f"--class-names {spec!r}"
    elif path.suffix.lower() in (".json", ".txt") or "/" in spec:
        raise InputError(f"{spec}: no such class-names file")
    else:
        raise InputError(
            f"--class-names {spec!r}: not a preset ({', '.join(PRESETS)}), a file, or a "
            "comma-separated list"
        )
    return check_class_names(names, source)


def check_class_names(names: object, source: str | Path) -> list[str]:
    """The one rule for class names, wherever they come from (an option, a store, a stats file).

    Args:
        names: The parsed names.
        source: Where they came from, for messages.

    Returns:
        ``names``: a list of 2 to 255 unique, non-empty strings.

    Raises:
        InputError: Anything else; the message shows what was parsed.
    """
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{source}: class names must be a list of strings")
    if not names:
        raise InputError(f"{source}: no class names found")
    empty = [k for k, n in enumerate(names) if not n]
    if empty:
        raise InputError(
            f"{source}: class {empty[0]} has an empty name (parsed {describe_names(names)})"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(
            f"{source}: class names are not unique ({', '.join(map(repr, repeated))} repeated; "
            f"parsed {describe_names(names)})"
        )
    if len(names) > MAX_CLASSES:
        raise InputError(
            f"{source}: at most {MAX_CLASSES} classes fit in uint8 trainIds "
            f"(parsed {len(names)} names)"
        )
    if len(names) < MIN_CLASSES:
        raise InputError(
            f"{source}: class names give only {describe_names(names)}; a segmentation needs at "
            f"least {MIN_CLASSES} classes"
        )
    return names


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for strings no file can have (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _names_from_file(path: Path) -> list[str]:
    """Names from a JSON file (by extension or by content) or a text file, one per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read class names ({exc})") from exc
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped.startswith(("[", "{")):
        return _names_from_json(path, text)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _names_from_json(path: Path, text: str) -> list[str]:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict):
        key = next((k for k in JSON_KEYS if k in data), None)
        if key is None:
            raise InputError(
                f"{path}: a JSON object needs a {JSON_KEYS[0]!r} list of names; found keys "
                f"{sorted(data)[:8]}"
            )
        data = data[key]
    if not isinstance(data, list):
        raise InputError(
            f'{path}: expected a JSON list of class names or {{"classes": [...]}}, got '
            f"{type(data).__name__} {json.dumps(data)[:60]}"
        )
    bad = [item for item in data if not isinstance(item, str)]
    if bad:
        raise InputError(
            f"{path}: class names must be strings; got {json.dumps(bad[0])[:40]} "
            f"(parsed {len(data)} entries)"
        )
    return [item.strip() for item in data]
