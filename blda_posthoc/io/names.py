"""Reading the ``--class-names`` option: a preset, a comma-separated list or a text file."""

from __future__ import annotations

from pathlib import Path

from blda_posthoc.core.classes import PRESETS
from blda_posthoc.io.errors import InputError


def read_class_names(spec: str) -> list[str]:
    """Resolve a class-names spec.

    Args:
        spec: A preset name (``cityscapes``), a path to a text file with one name per line, or a
            comma-separated list.

    Returns:
        The class names, in channel order.
    """
    if spec.lower() in PRESETS:
        return list(PRESETS[spec.lower()])
    path = Path(spec)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        source = str(path)
    elif "," in spec:
        names = [part.strip() for part in spec.split(",")]
        source = "--class-names"
    else:
        raise InputError(
            f"{spec}: not a preset ({', '.join(PRESETS)}), a file, or a comma-separated list"
        )
    if not names or any(not n for n in names):
        raise InputError(f"{source}: empty class name")
    if len(set(names)) != len(names):
        raise InputError(f"{source}: class names are not unique")
    if len(names) > 255:
        raise InputError(f"{source}: at most 255 classes fit in uint8 trainIds")
    return names
