"""JSON files the commands write and read back: strict writing, shard parts, count arrays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from blda_posthoc import outputs
from blda_posthoc.errors import InputError
from blda_posthoc.io.schema import MAX_PARTS, Node, load_json, shard_pair


def write_json(path: Path, data: dict[str, Any], sort_keys: bool = False) -> None:
    """Write strict JSON (``allow_nan=False``), atomically; the same data gives the same bytes."""
    outputs.write_text(
        path, json.dumps(data, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"
    )


def read_report(path: Path, kind: str, what: str) -> dict[str, Any]:
    """Read a JSON file a command wrote, refusing anything but format ``kind``.

    The file is read strictly (see :func:`blda_posthoc.io.schema.load_json`: no NaN, bounded
    size and nesting); its values are checked by the caller (e.g. through :class:`Node`).

    Args:
        path: The file.
        kind: The ``format`` expected (``blda-compare``, ``blda-correct``, ...).
        what: The file in words, for the message (``'blda compare' report``).

    Returns:
        The document (a dict whose ``format`` is ``kind``).
    """
    data = load_json(path)
    if not isinstance(data, dict) or data.get("format") != kind:
        raise InputError(f"{path}: not a {what} (format {kind})")
    return data


def read_parts(paths: list[Path], kind: str) -> list[tuple[Path, Node]]:
    """Read the JSON reports of shards 1..N of one run: each exactly once, the same N.

    Every report is read through :mod:`blda_posthoc.io.schema` (strict JSON, bounded size);
    ``format`` must be ``kind``, ``version`` an integer this program reads and
    ``partial.shard`` a ``[K, N]`` with ``1 <= K <= N <= MAX_PARTS`` (checked before
    anything is sized by N).

    Args:
        paths: The shards' ``--json`` reports.
        kind: The report ``format`` expected (``blda-evaluate``, ``blda-compare``).

    Returns:
        ``(path, report)`` in shard order; each report a :class:`Node` (context ``damaged
        partial block``) whose ``partial`` object has a checked ``shard``.
    """
    if not paths:
        raise InputError("--merge: no part file given")
    if len(paths) > MAX_PARTS:
        raise InputError(f"--merge: {len(paths)} part files, more than the {MAX_PARTS} one run has")
    found: dict[int, tuple[Path, Node]] = {}
    total = None
    for path in paths:
        data = Node.load(path, context="damaged partial block")
        root = data.value
        if (
            not isinstance(root, dict)
            or root.get("format") != kind
            or not isinstance(root.get("partial"), dict)
        ):
            raise InputError(f"{path}: not a shard's {kind} report (no partial block)")
        data["version"].version(READ_VERSIONS)
        k, n = shard_pair(data["partial"]["shard"])
        if total is not None and n != total:
            raise InputError(f"{path}: shard {k}/{n} is not of the same run as {paths[0]}")
        total = n
        if k in found:
            raise InputError(f"{path}: shard {k}/{n} given twice (also {found[k][0]})")
        found[k] = (Path(path), data)
    assert total is not None
    if len(found) != total:
        absent = next(k for k in range(1, total + 1) if k not in found)
        raise InputError(
            f"--merge: shard {absent}/{total} is missing ({len(found)} of {total} parts given)"
        )
    return [found[k] for k in sorted(found)]


READ_VERSIONS = (1,)
"""Versions of the commands' JSON reports this program reads."""


def count_array(value: Any, shape: tuple[int, ...], path: Path | str, key: str) -> np.ndarray:
    """Counts from a shard's report as an int64 array, checked for ``shape`` and signs.

    ``value`` is a :class:`Node` or a parsed JSON value (see :meth:`Node.counts`: whole
    numbers, not bools, floats or strings; no negative count; the shape checked before
    anything is allocated; the sum bounded so that adding up parts cannot overflow).

    Raises:
        InputError: ``{path}: damaged partial block ({key} ...)``.
    """
    node = value if isinstance(value, Node) else Node(value, path, context="damaged partial block")
    return Node(node.value, path, key, "damaged partial block").counts(shape)
