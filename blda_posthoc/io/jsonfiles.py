"""JSON files the commands write and read back: strict writing, shard parts, count arrays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from blda_posthoc import outputs
from blda_posthoc.errors import InputError


def write_json(path: Path, data: dict[str, Any], sort_keys: bool = False) -> None:
    """Write strict JSON (``allow_nan=False``), atomically; the same data gives the same bytes."""
    outputs.write_text(
        path, json.dumps(data, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"
    )


def read_report(path: Path, kind: str, what: str) -> dict[str, Any]:
    """Read a JSON file a command wrote, refusing anything but format ``kind``.

    Args:
        path: The file.
        kind: The ``format`` expected (``blda-compare``, ``blda-correct``, ...).
        what: The file in words, for the message (``'blda compare' report``).

    Returns:
        The document (a dict whose ``format`` is ``kind``).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != kind:
        raise InputError(f"{path}: not a {what} (format {kind})")
    return data


def read_parts(paths: list[Path], kind: str) -> list[tuple[Path, dict[str, Any]]]:
    """Read the JSON reports of shards 1..N of one run: each exactly once, the same N.

    Args:
        paths: The shards' ``--json`` reports.
        kind: The report ``format`` expected (``blda-evaluate``, ``blda-compare``).

    Returns:
        ``(path, report)`` in shard order; every report has a ``"partial"`` dict whose
        ``"shard"`` is ``[K, N]``.
    """
    if not paths:
        raise InputError("--merge: no part file given")
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    total = None
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
        except ValueError as exc:
            raise InputError(f"{path}: not JSON ({exc})") from exc
        part = data.get("partial") if isinstance(data, dict) else None
        if not isinstance(part, dict) or data.get("format") != kind:
            raise InputError(f"{path}: not a shard's {kind} report (no partial block)")
        shard = part.get("shard")
        if not (
            isinstance(shard, list)
            and len(shard) == 2
            and all(isinstance(v, int) for v in shard)
            and 1 <= shard[0] <= shard[1]
        ):
            raise InputError(f"{path}: damaged partial block (shard {shard!r})")
        k, n = shard
        if total is not None and n != total:
            raise InputError(f"{path}: shard {k}/{n} is not of the same run as {paths[0]}")
        total = n
        if k in found:
            raise InputError(f"{path}: shard {k}/{n} given twice (also {found[k][0]})")
        found[k] = (Path(path), data)
    assert total is not None
    absent = sorted(set(range(1, total + 1)) - set(found))
    if absent:
        raise InputError(
            f"--merge: shard {absent[0]}/{total} is missing ({len(found)} of {total} parts given)"
        )
    return [found[k] for k in sorted(found)]


def count_array(value: Any, shape: tuple[int, ...], path: Path | str, key: str) -> np.ndarray:
    """Counts from a shard's report as an int64 array, checked for ``shape`` and signs.

    Raises:
        InputError: ``{path}: damaged partial block ({key} ...)`` when the value is not an
            array of whole numbers of that shape, or holds a negative count.
    """
    try:
        array = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"{path}: damaged partial block ({key}: {exc})") from exc
    if array.shape != shape:
        raise InputError(
            f"{path}: damaged partial block ({key} has shape {array.shape}, not {shape})"
        )
    if (array < 0).any():
        raise InputError(f"{path}: damaged partial block ({key} holds a negative count)")
    return array
