"""Typed checks for everything read from JSON: one rule at the boundary, one message shape.

A value read from a file is wrapped in a :class:`Node` that knows where it came from (file and
key path); its accessors return plain Python values or numpy arrays only after checking type,
range, finiteness and shape, and raise :class:`~blda_posthoc.errors.InputError` otherwise::

    data = Node.load(path, context="damaged partial block")
    tau = data["selected"]["tau"].number(low=0.0, optional=True)
    counts = data["partial"]["after"].counts((c + 1,))

Rules every accessor applies: a bool is not a number; a string is not a number; a float is not
an integer (``0.5`` counts are refused, not truncated); numbers are finite; integers fit int64
and the range asked for; arrays have exactly the shape asked for (checked before anything is
allocated); counts are whole numbers >= 0 whose sum stays below :data:`MAX_COUNT_SUM`, so that
adding up :data:`MAX_PARTS` parts can never overflow int64.

Messages read ``"{file}: {context} ({key path}: {problem})"``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blda_posthoc.errors import InputError

INT64_MAX = (1 << 63) - 1
MAX_PARTS = 1024
"""Most shards (parts) of one run a merge adds up (``--shard K/N`` with N at most this)."""
MAX_COUNT_SUM = 1 << 52
"""Most a count array of one part may add up to (``MAX_PARTS`` of them stay below int64)."""
MAX_JSON_BYTES = 1 << 30
"""Largest JSON file read (a larger one is refused before it is read)."""
MAX_DEPTH = 64
"""Deepest nesting of lists and objects accepted in a JSON file."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(path: Path | str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file strictly (no NaN/Infinity, bounded size and nesting).

    Raises:
        InputError: ``{path}: no such file``, ``cannot read``, ``too large`` or ``not JSON``.
    """
    path = Path(path)
    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise InputError(
                f"{path}: {size} bytes, larger than the {max_bytes} a JSON file may be"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a JSON file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not JSON (not UTF-8 text: {exc.reason})") from exc
    if _depth(text) > MAX_DEPTH:
        raise InputError(f"{path}: not JSON this program reads (nested deeper than {MAX_DEPTH})")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # ValueError: also ints beyond 4300 digits
        raise InputError(f"{path}: not JSON ({_first_line(exc)})") from exc


def _depth(text: str) -> int:
    """Deepest bracket nesting of JSON text (an upper bound: brackets in strings count too)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0
    depth = peak = 0
    for char in text:
        if char in "[{":
            depth += 1
            peak = max(peak, depth)
            if peak > MAX_DEPTH:
                break
        elif char in "]}":
            depth -= 1
    if peak <= MAX_DEPTH:
        return peak
    # Brackets inside strings may inflate the count: decide on the parsed text then.
    try:
        return _value_depth(json.loads(text, parse_constant=_reject_constant))
    except (ValueError, RecursionError):
        return peak


def _value_depth(value: Any) -> int:
    stack = [(value, 1)]
    peak = 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            peak = max(peak, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return peak


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _show(value: Any, limit: int = 40) -> str:
    """A value as a message shows it (JSON spelling, shortened)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _described(value: Any) -> str:
    """``a string ("2")``, ``a boolean (true)``, ``null``: what a refused value is."""
    return "null" if value is None else f"{_kind(value)} ({_show(value)})"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class Node:
    """A value read from a JSON file, and where it is (file and key path).

    Args:
        value: The parsed value.
        source: The file, for messages.
        key: Its key path inside the file (``partial.rows[2].tau``); empty for the root.
        context: What a failure is called (``damaged partial block``, ``invalid report``).
    """

    def __init__(
        self, value: Any, source: Path | str, key: str = "", context: str = "invalid content"
    ) -> None:
        self.value = value
        self.source = source
        self.key = key
        self.context = context

    @classmethod
    def load(cls, path: Path | str, *, context: str = "invalid content") -> Node:
        """The root of the JSON file ``path`` (see :func:`load_json`)."""
        return cls(load_json(path), path, "", context)

    # -- navigation

    def error(self, problem: str) -> InputError:
        """The error for this value: ``{file}: {context} ({key}: {problem})``."""
        where = f"{self.key}: " if self.key else ""
        return InputError(f"{self.source}: {self.context} ({where}{problem})")

    def _child(self, key: str | int, value: Any) -> Node:
        label = (
            f"{self.key}[{key}]"
            if isinstance(key, int)
            else (f"{self.key}.{key}" if self.key else str(key))
        )
        return Node(value, self.source, label, self.context)

    def __getitem__(self, key: str | int) -> Node:
        """A required entry of an object (str key) or list (int index)."""
        if isinstance(key, int):
            items = self.entries()
            if not -len(items) <= key < len(items):
                raise self.error(f"has no entry {key}")
            return items[key]
        mapping = self.fields()
        if key not in mapping:
            raise self._child(key, None).error("missing")
        return mapping[key]

    def get(self, key: str) -> Node | None:
        """An optional entry of an object: None when absent or null."""
        mapping = self.fields()
        child = mapping.get(key)
        return None if child is None or child.value is None else child

    @property
    def is_null(self) -> bool:
        """Whether the value is JSON ``null``."""
        return self.value is None

    # -- containers

    def fields(self, *, keys: Iterable[str] = ()) -> dict[str, Node]:
        """The entries of a JSON object; ``keys`` must all be present."""
        if not isinstance(self.value, dict):
            raise self.error(f"must be an object, not {_kind(self.value)}")
        for key in keys:
            if key not in self.value:
                raise self._child(key, None).error("missing")
        return {str(k): self._child(str(k), v) for k, v in self.value.items()}

    def entries(self, *, length: int | None = None, max_length: int | None = None) -> list[Node]:
        """The items of a JSON list (of exactly ``length``, or at most ``max_length`` items)."""
        if not isinstance(self.value, list):
            raise self.error(f"must be a list, not {_kind(self.value)}")
        n = len(self.value)
        if length is not None and n != length:
            raise self.error(f"has {n} entries, not {length}")
        if max_length is not None and n > max_length:
            raise self.error(f"has {n} entries, more than {max_length}")
        return [self._child(i, v) for i, v in enumerate(self.value)]

    # -- scalars

    def integer(self, *, low: int | None = None, high: int | None = None) -> int:
        """A whole number (not a bool, float or string) within ``[low, high]`` and int64."""
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"must be an integer, not {_described(value)}")
        low = -INT64_MAX - 1 if low is None else low
        high = INT64_MAX if high is None else high
        if value < low:
            raise self.error(f"{_show(value)} is below {low}")
        if value > high:
            raise self.error(f"{_show(value)} is above {high}")
        return int(value)

    def number(
        self,
        *,
        low: float | None = None,
        high: float | None = None,
        optional: bool = False,
    ) -> float | None:
        """A finite number (int or float, not a bool or string) within ``[low, high]``.

        With ``optional`` a ``null`` gives None.
        """
        value = self.value
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(f"must be a number, not {_described(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise self.error(f"{_show(value)} is out of range") from None
        if not math.isfinite(number):
            raise self.error(f"{_show(value)} is not finite")
        if low is not None and number < low:
            raise self.error(f"{number:g} is below {low:g}")
        if high is not None and number > high:
            raise self.error(f"{number:g} is above {high:g}")
        return number

    def real(self, *, low: float | None = None, high: float | None = None) -> float:
        """:meth:`number`, required (``null`` refused)."""
        value = self.number(low=low, high=high)
        assert value is not None
        return value

    def string(
        self,
        *,
        choices: Sequence[str] | None = None,
        max_length: int = 4096,
        optional: bool = False,
    ) -> str | None:
        """A string (of at most ``max_length`` characters, one of ``choices`` when given)."""
        value = self.value
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.error(f"must be a string, not {_described(value)}")
        if len(value) > max_length:
            raise self.error(f"longer than {max_length} characters")
        if choices is not None and value not in choices:
            raise self.error(f"{_show(value)} is not one of {', '.join(choices)}")
        return value

    def text(self, *, choices: Sequence[str] | None = None, max_length: int = 4096) -> str:
        """:meth:`string`, required (``null`` refused)."""
        value = self.string(choices=choices, max_length=max_length)
        assert value is not None
        return value

    def boolean(self) -> bool:
        """``true`` or ``false`` (not 0/1, not a string)."""
        if not isinstance(self.value, bool):
            raise self.error(f"must be true or false, not {_kind(self.value)}")
        return self.value

    def strings(self, *, max_length: int | None = None, unique: bool = False) -> list[str]:
        """A list of non-empty strings."""
        items = [n.text() for n in self.entries(max_length=max_length)]
        if any(not s for s in items):
            raise self.error("holds an empty string")
        if unique and len(set(items)) != len(items):
            raise self.error("holds a name twice")
        return items

    def version(self, supported: Sequence[int]) -> int:
        """A format ``version``: an integer, one of ``supported``."""
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"version must be an integer, not {_described(value)}")
        if value not in supported:
            wanted = ", ".join(str(v) for v in supported)
            raise self.error(f"version {value} is not supported (this program reads {wanted})")
        return int(value)

    # -- arrays

    def _nested(self, shape: tuple[int, ...]) -> list[Any]:
        """The leaves of a nested list of exactly ``shape``, row-major (shape checked first)."""
        leaves: list[Any] = []
        level: list[tuple[Any, str]] = [(self.value, self.key)]
        for depth, size in enumerate(shape):
            nxt: list[tuple[Any, str]] = []
            for item, key in level:
                if not isinstance(item, list):
                    raise Node(item, self.source, key, self.context).error(
                        f"must be a list (shape {shape}), not {_kind(item)}"
                    )
                if len(item) != size:
                    got = f"{len(item)} entries at depth {depth}" if depth else f"{len(item)} rows"
                    raise self.error(f"has {got}, expected shape {shape}")
                if depth == len(shape) - 1:
                    leaves.extend(item)
                else:
                    nxt.extend((v, f"{key}[{i}]") for i, v in enumerate(item))
            level = nxt
        if not shape:
            leaves = [self.value]
        return leaves

    def counts(self, shape: tuple[int, ...], *, max_sum: int = MAX_COUNT_SUM) -> np.ndarray:
        """Whole counts >= 0 of exactly ``shape`` as int64 (adding up to at most ``max_sum``).

        A bare integer is a count of shape ``()``.
        """
        leaves = self._nested(tuple(shape))
        total = 0
        for value in leaves:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.error(f"holds {_described(value)}, not a whole count")
            if value < 0:
                raise self.error("holds a negative count")
            if value > INT64_MAX:
                raise self.error(f"holds {value}, beyond int64")
            total += value
        if total > max_sum:
            raise self.error(f"counts add up to {total}, more than {max_sum}")
        return np.array(leaves, dtype=np.int64).reshape(shape)

    def reals(
        self, shape: tuple[int, ...], *, low: float | None = None, high: float | None = None
    ) -> np.ndarray:
        """Finite numbers (not bools or strings) of exactly ``shape`` as float64."""
        leaves = self._nested(tuple(shape))
        for value in leaves:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self.error(f"holds {_described(value)}, not a number")
        try:
            array = np.array(leaves, dtype=np.float64).reshape(shape)
        except OverflowError:
            raise self.error("holds a number out of range") from None
        if not np.isfinite(array).all():
            raise self.error("holds a value that is not finite")
        if low is not None and (array < low).any():
            raise self.error(f"holds a value below {low:g}")
        if high is not None and (array > high).any():
            raise self.error(f"holds a value above {high:g}")
        return array


def check_version(value: Any, supported: Sequence[int], where: str) -> int:
    """A file's ``version`` (JSON or an HDF5 attribute): an integer, one of ``supported``.

    Args:
        value: The recorded value (Python or numpy integer; anything else is refused).
        supported: Versions this program reads.
        where: ``{file}: {what}`` for messages, e.g. ``"s.h5: stats"``.

    Raises:
        InputError: ``{where} version must be an integer, not a string ("2")`` or
            ``{where} version 3 is not supported (this program reads 1, 2)``.
    """
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool) or not isinstance(value, int):
        shown = "missing" if value is None else _described(value)
        raise InputError(f"{where} version must be an integer, not {shown}")
    if value not in supported:
        wanted = ", ".join(str(v) for v in supported)
        raise InputError(f"{where} version {value} is not supported (this program reads {wanted})")
    return value


def shard_pair(node: Node, *, max_parts: int = MAX_PARTS) -> tuple[int, int]:
    """A recorded ``[K, N]`` shard: integers with ``1 <= K <= N <= max_parts``."""
    k_node, n_node = node.entries(length=2)
    n = n_node.integer(low=1, high=max_parts)
    k = k_node.integer(low=1, high=n)
    return k, n
