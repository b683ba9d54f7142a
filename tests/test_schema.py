"""The JSON validation layer (io/schema.py): each rule, its message, and sizes before allocation."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from blda_posthoc.errors import InputError
from blda_posthoc.io.jsonfiles import read_parts
from blda_posthoc.io.schema import (
    INT64_MAX,
    MAX_COUNT_SUM,
    MAX_DEPTH,
    Node,
    check_version,
    load_json,
    shard_pair,
)


def node(value: object) -> Node:
    return Node(value, "f.json", "x", "damaged partial block")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (True, "must be an integer, not a boolean (true)"),
        (0.5, "must be an integer, not a number (0.5)"),
        (2.0, "must be an integer, not a number (2.0)"),
        ("2", 'must be an integer, not a string ("2")'),
        (None, "must be an integer, not null"),
        (-1, "-1 is below 0"),
        (11, "11 is above 10"),
    ],
)
def test_integer_refuses(value: object, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        node(value).integer(low=0, high=10)
    assert str(info.value) == f"f.json: damaged partial block (x: {fragment})"


def test_integer_accepts_whole_numbers_in_range() -> None:
    assert node(7).integer(low=0, high=10) == 7
    assert node(INT64_MAX).integer() == INT64_MAX
    with pytest.raises(InputError, match="above"):
        node(INT64_MAX + 1).integer()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (True, "must be a number, not a boolean"),
        ("0.5", "must be a number, not a string"),
        (float("nan"), "is not finite"),
        (float("inf"), "is not finite"),
        (10**400, "out of range"),
        (-7, "-7 is below 0"),
        ([1], "must be a number, not a list"),
    ],
)
def test_number_refuses(value: object, fragment: str) -> None:
    with pytest.raises(InputError, match="x: ") as info:
        node(value).number(low=0.0)
    assert fragment in str(info.value)


def test_number_optional_and_text_choices() -> None:
    assert node(None).number(optional=True) is None
    assert node(3).number() == 3.0 and isinstance(node(3).number(), float)
    assert node("blda").text(choices=["none", "blda"]) == "blda"
    with pytest.raises(InputError, match='"rm -rf" is not one of none, blda'):
        node("rm -rf").text(choices=["none", "blda"])
    with pytest.raises(InputError, match="must be true or false"):
        node(1).boolean()
    with pytest.raises(InputError, match="holds a name twice"):
        node(["a", "a"]).strings(unique=True)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([[1, 2], [3]], "has 1 entries at depth 1"),
        ([1, 2, 3], "has 3 rows"),
        ([[1, 2], [3, 0.5]], "holds a number (0.5), not a whole count"),
        ([[1, 2], [3, "4"]], 'holds a string ("4"), not a whole count'),
        ([[1, 2], [3, True]], "holds a boolean (true), not a whole count"),
        ([[1, 2], [3, -4]], "holds a negative count"),
        ([[1, 2], [3, 2**63]], "beyond int64"),
        ([[1, 2], [3, MAX_COUNT_SUM]], "counts add up to"),
        ([[1, 2], 5], "must be a list"),
        ("abc", "must be a list"),
    ],
)
def test_counts_refuse(value: object, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        node(value).counts((2, 2))
    assert fragment in str(info.value), str(info.value)


def test_counts_and_reals_give_checked_arrays() -> None:
    counts = node([[1, 2], [3, 4]]).counts((2, 2))
    assert counts.dtype == np.int64 and counts.tolist() == [[1, 2], [3, 4]]
    assert node(5).counts(()).shape == ()
    reals = node([0.5, 1]).reals((2,), low=0.0)
    assert reals.dtype == np.float64 and reals.tolist() == [0.5, 1.0]
    with pytest.raises(InputError, match="below 0"):
        node([0.5, -1]).reals((2,), low=0.0)
    with pytest.raises(InputError, match="not finite"):
        node([0.5, float("nan")]).reals((2,))


def test_a_declared_shape_is_checked_before_allocation() -> None:
    """A small list claiming a huge shape is refused without allocating the shape."""
    tracemalloc.start()
    with pytest.raises(InputError, match="rows"):
        node([[0]]).counts((40000, 65536))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_shard_pair_bounds() -> None:
    assert shard_pair(node([2, 3])) == (2, 3)
    for bad, fragment in (
        ([1, 10**9], "is above 1024"),
        ([4, 3], "4 is above 3"),
        ([0, 3], "0 is below 1"),
        ([1], "has 1 entries, not 2"),
        ([1.0, 2], "not a number"),
    ):
        with pytest.raises(InputError) as info:
            shard_pair(node(bad))
        assert fragment in str(info.value), str(info.value)


def test_version_must_be_an_integer() -> None:
    assert check_version(np.int64(2), (1, 2), "s.h5: stats") == 2
    with pytest.raises(
        InputError, match=r'^s.h5: stats version must be an integer, not a string \("2"\)$'
    ):
        check_version("2", (1, 2), "s.h5: stats")
    with pytest.raises(InputError, match="version 3 is not supported"):
        check_version(3, (1, 2), "s.h5: stats")
    with pytest.raises(InputError, match="not a boolean|not a boolean"):
        check_version(True, (1,), "s.h5: stats")


def test_load_json_is_strict_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    for text, fragment in (
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": Infinity}', "Infinity is not a JSON number"),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested deeper"),
        ("[" * 100000, "nested deeper"),
        ("1" * 5000, "not JSON"),  # an integer beyond Python's digit limit
        ("{", "not JSON"),
    ):
        path.write_text(text)
        with pytest.raises(InputError, match="a.json: ") as info:
            load_json(path)
        assert fragment in str(info.value), str(info.value)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="not UTF-8"):
        load_json(path)
    with pytest.raises(InputError, match="too large|larger than"):
        path.write_text("[1, 2, 3]")
        load_json(path, max_bytes=4)
    path.write_text(json.dumps({"a": "[[[[" * 40}))  # brackets inside strings do not count
    assert load_json(path) == {"a": "[[[[" * 40}
    with pytest.raises(InputError, match="no such file"):
        load_json(tmp_path / "missing.json")


def test_read_parts_checks_every_part(tmp_path: Path) -> None:
    def part(k: int, n: int, **extra: object) -> Path:
        path = tmp_path / f"p-{k}-of-{n}.json"
        data = {"format": "blda-x", "version": 1, "partial": {"shard": [k, n]}, **extra}
        path.write_text(json.dumps(data))
        return path

    assert [p.name for p, _ in read_parts([part(2, 2), part(1, 2)], "blda-x")] == [
        "p-1-of-2.json",
        "p-2-of-2.json",
    ]
    with pytest.raises(InputError, match="shard 2/2 is missing"):
        read_parts([part(1, 2)], "blda-x")
    with pytest.raises(InputError, match="not of the same run"):
        read_parts([part(1, 2), part(2, 3)], "blda-x")
    with pytest.raises(InputError, match="version must be an integer"):
        read_parts([part(1, 1, version="1")], "blda-x")
    with pytest.raises(InputError, match="no partial block"):
        read_parts([part(1, 1)], "blda-y")
