"""Fuzzing every reader: random bytes, mutated valid files, random small arrays.

Each reader must either succeed or raise :class:`InputError` (a one-line ``error:``), never
another exception, a crash or a hang. Examples are derandomised and bounded so that the whole
module runs in CI in well under a minute.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from blda_posthoc.errors import InputError
from blda_posthoc.io.images import read_label, read_rgb
from blda_posthoc.io.stats import read_stats, write_stats
from blda_posthoc.io.store import LogitStore, StoreWriter
from blda_posthoc.pipelines.corrections import CorrectionSpec, load_correction, read_compare_choice
from blda_posthoc.pipelines.fit_stats import FitOptions, fit_store
from blda_posthoc.pipelines.import_logits import _load as read_npy
from blda_posthoc.pipelines.info import describe_file

EXAMPLES = int(os.environ.get("BLDA_FUZZ_EXAMPLES", "60"))
"""Examples per test; CI runs the fixed default, a deeper local run sets a larger number."""
# Arrays of float16 drawn from wider floats overflow to inf on purpose (hostile values).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=10),
    derandomize=EXAMPLES <= 60,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
WORK = Path(tempfile.mkdtemp(prefix="blda-fuzz-"))


def _valid_store() -> bytes:
    path = WORK / "valid.h5"
    rng = np.random.default_rng(0)
    with StoreWriter(path, ["road", "car", "sky"], dtype="float16") as writer:
        for index in range(3):
            label = rng.integers(0, 3, (12, 16)).astype(np.uint8)
            # Logits that carry the labels, so that the calibrations fit (positive scales).
            onehot = np.eye(3, dtype=np.float32)[label[::2, ::2]].transpose(2, 0, 1)
            logits = (4 * onehot + rng.normal(0, 3, (3, 6, 8))).astype(np.float32)
            writer.write(f"city/img_{index}", logits, label)
    return path.read_bytes()


VALID_STORE = _valid_store()


def read_store_fully(path: Path) -> None:
    """Everything a command reads from a store; only InputError may come out."""
    with contextlib.suppress(InputError):
        describe_file(path)
    try:
        with LogitStore([path]) as store:
            store.has_labels()
            store.logit_range()
            for name in store.names:
                store.size(name)
                record = store.read(name)
                assert np.isfinite(record.logits).all()
    except InputError:
        pass


def write_bytes(name: str, data: bytes) -> Path:
    path = WORK / name
    path.write_bytes(data)
    return path


flips = st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=12
)


def mutate(data: bytes, changes: list[tuple[float, int]]) -> bytes:
    raw = bytearray(data)
    for where, value in changes:
        raw[int(where * len(raw))] = value
    return bytes(raw)


# ------------------------------------------------------------------------------------ stores


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_as_a_store(data: bytes) -> None:
    read_store_fully(write_bytes("random.h5", data))


@FUZZ
@given(flips)
def test_flipped_bytes_in_a_store(changes: list[tuple[float, int]]) -> None:
    read_store_fully(write_bytes("flipped.h5", mutate(VALID_STORE, changes)))


@FUZZ
@given(st.floats(0, 1, exclude_max=True))
def test_truncated_store(fraction: float) -> None:
    read_store_fully(write_bytes("cut.h5", VALID_STORE[: int(fraction * len(VALID_STORE))]))


OBJECTS = ["/", "/images", "/images/city%2Fimg_0", "/images/city%2Fimg_1"]
ATTRS = ["format", "version", "class_names", "dtype", "name", "height", "width", "logit_min",
         "logit_max", "has_label", "complete"]  # fmt: skip
values = st.one_of(
    st.none(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.just('["a", "b"]'),
    st.just("[" + ", ".join(f'"c{i}"' for i in range(300)) + "]"),
    hnp.arrays(np.float64, st.integers(0, 3)),
)
datasets = st.one_of(
    hnp.arrays(
        st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.uint8, np.bool_]),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
    st.none(),
)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(OBJECTS), st.sampled_from(ATTRS), values),
        min_size=1,
        max_size=4,
    ),
    st.lists(
        st.tuples(st.sampled_from(OBJECTS[2:]), st.sampled_from(["logits", "label"]), datasets),
        max_size=2,
    ),
)
def test_edited_store_metadata_and_datasets(
    attr_edits: list[tuple[str, str, object]], data_edits: list[tuple[str, str, object]]
) -> None:
    path = write_bytes("edited.h5", VALID_STORE)
    with h5py.File(path, "a") as f:
        for obj, key, value in attr_edits:
            if value is None:
                if key in f[obj].attrs:
                    del f[obj].attrs[key]
            else:
                with contextlib.suppress(TypeError, ValueError):  # values HDF5 cannot store
                    f[obj].attrs[key] = value
        for obj, key, value in data_edits:
            if key in f[obj]:
                del f[obj][key]
            if value is not None:
                f[obj][key] = value
    read_store_fully(path)


@FUZZ
@given(
    hnp.arrays(
        st.sampled_from([np.float16, np.float32, np.float64]),
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
        elements=st.floats(width=16, allow_nan=True, allow_infinity=True)
        | st.sampled_from([1e30, -1e30, 7e4, -7e4, 65504.0]),
    ),
    st.sampled_from(["float16", "float32"]),
)
def test_random_small_arrays_through_the_writer(array: np.ndarray, dtype: str) -> None:
    path = WORK / f"arrays-{dtype}.h5"
    for leftover in (path, Path(f"{path}.partial")):
        leftover.unlink(missing_ok=True)
    try:
        with StoreWriter(path, ["a", "b"], dtype=dtype) as writer:
            writer.write("x", array)
    except InputError:
        assert not path.exists()
        return
    with LogitStore([path]) as store:
        got = store.read("x").logits
    np.testing.assert_array_equal(got, array.astype(dtype).astype(np.float32))


@pytest.mark.parametrize("size", [(16384, 16384), (65536, 65536), (8192, 1 << 20)])
def test_store_declaring_a_huge_image_is_refused_before_allocating(size) -> None:
    """A few KB declaring an image of billions of logits: refused by its declared size."""
    path = write_bytes("huge.h5", VALID_STORE)
    with h5py.File(path, "a") as f:
        group = f["images/city%2Fimg_0"]
        group.attrs["height"], group.attrs["width"] = size
        del group["label"]
    with LogitStore([path]) as store, pytest.raises(InputError) as caught:
        for _ in store.iter_images(with_label=True):
            pass
    message = str(caught.value)
    assert message.startswith(f"{path}: image 'city/img_0': image size {size[0]}x{size[1]}")
    assert "GiB" in message or "out of range" in message, message


# ------------------------------------------------------------------------------------- stats


def _valid_stats(estimator: str) -> bytes:
    path = WORK / f"valid-{estimator}.h5"
    with LogitStore([WORK / "valid.h5"]) as store:
        stats = fit_store(
            store, FitOptions(labels="gt", estimator=estimator, bins=64, sample_pixels=200)
        )
    write_stats(path, stats)
    return path.read_bytes()


VALID_STATS = {kind: _valid_stats(kind) for kind in ("hist", "gmm")}
STATS_METHODS = ["blda", "calibrated-blda", "vector-scaling", "cbst", "em-map"]


def read_stats_fully(path: Path, method: str = "blda") -> None:
    """Read a stats file and build a correction from it; only InputError may come out."""
    with contextlib.suppress(InputError):
        describe_file(path)
    try:
        stats = read_stats(path)
        load_correction(CorrectionSpec(method=method, stats=path), stats.class_names)
    except InputError:
        pass


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_as_stats(data: bytes) -> None:
    read_stats_fully(write_bytes("random-stats.h5", data))


@FUZZ
@given(st.sampled_from(sorted(VALID_STATS)), flips, st.sampled_from(STATS_METHODS))
def test_flipped_bytes_in_stats(kind: str, changes: list[tuple[float, int]], method: str) -> None:
    read_stats_fully(write_bytes("flipped-stats.h5", mutate(VALID_STATS[kind], changes)), method)


STATS_ATTRS = ["format", "version", "class_names", "estimator", "grid_lo", "grid_hi",
               "grid_bins", "settings", "lo", "hi", "bins"]  # fmt: skip
STATS_DATA = ["cells/counts", "anchors/counts", "cells/gmm/weights", "cells/gmm/sigmas",
              "predicted", "confidence/counts", "sample/logits", "sample/labels",
              "calibration/vector/scale", "calibrated/cells/counts"]  # fmt: skip


stats_values = values | st.sampled_from(
    [
        '{"min_pixels": "100"}',
        '{"min_pixels": -3}',
        '{"labels": 3}',
        '{"calibration": 5}',
        '{"calibration": {"kind": "vector"}}',
        '{"sources": "a.h5"}',
        '{"components": 0}',
        '["road", "car"]',
        '["road", "car", "car"]',
        '["road", "", "sky"]',
        '["road"]',
        "road,car,sky",
    ]
)


@FUZZ
@given(
    st.sampled_from(sorted(VALID_STATS)),
    st.lists(
        st.tuples(
            st.sampled_from(["/", "/confidence/counts", "/calibrated"]),
            st.sampled_from(STATS_ATTRS),
            stats_values,
        ),
        max_size=3,
    ),
    st.lists(st.tuples(st.sampled_from(STATS_DATA), datasets), max_size=2),
    st.sampled_from(STATS_METHODS),
)
def test_edited_stats(
    kind: str,
    attr_edits: list[tuple[str, str, object]],
    data_edits: list[tuple[str, object]],
    method: str,
) -> None:
    path = write_bytes("edited-stats.h5", VALID_STATS[kind])
    with h5py.File(path, "a") as f:
        for obj, key, value in attr_edits:
            if obj not in f:
                continue
            if value is None:
                if key in f[obj].attrs:
                    del f[obj].attrs[key]
            else:
                with contextlib.suppress(TypeError, ValueError):
                    f[obj].attrs[key] = value
        for key, value in data_edits:
            if key in f:
                del f[key]
            if value is not None:
                f[key] = value
    read_stats_fully(path, method)


@FUZZ
@given(
    st.sampled_from(sorted(VALID_STATS)),
    st.sampled_from(STATS_DATA),
    st.sampled_from(STATS_METHODS),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["zeros", "huge", "large", "random"]),
)
def test_stats_with_valid_shapes_and_hostile_values(
    kind: str, key: str, method: str, seed: int, fill: str
) -> None:
    path = write_bytes("values-stats.h5", VALID_STATS[kind])
    with h5py.File(path, "a") as f:
        if key not in f:
            return
        old = f[key][()]
        rng = np.random.default_rng(seed)
        if fill == "zeros":
            new = np.zeros_like(old)
        elif old.dtype.kind == "f":
            scale = {"huge": 1e30, "large": 1e6}.get(fill, 10.0)
            new = (rng.standard_normal(old.shape) * scale).astype(old.dtype)
        else:
            high = np.iinfo(old.dtype).max if fill == "huge" else min(1000, np.iinfo(old.dtype).max)
            new = rng.integers(0, high, old.shape, dtype=old.dtype, endpoint=True)
        del f[key]
        f[key] = new
    read_stats_fully(path, method)


def _edited_stats(tmp_path: Path, edit) -> Path:
    path = tmp_path / "edited.h5"
    path.write_bytes(VALID_STATS["hist"])
    with h5py.File(path, "a") as f:
        edit(f)
    return path


def _replace(f: h5py.File, key: str, value: np.ndarray) -> None:
    del f[key]
    f[key] = value


STATS_CASES = {
    "settings of the wrong type": (
        lambda f: f.attrs.__setitem__("settings", '{"min_pixels": "100", "labels": "gt"}'),
        'settings: min_pixels is "100", expected a whole number >= 0',
    ),
    "calibration record of the wrong type": (
        lambda f: f["calibrated"].attrs.__setitem__("settings", '{"calibration": 5}'),
        "calibrated settings: calibration is 5",
    ),
    "calibrated class names differ": (
        lambda f: f["calibrated"].attrs.__setitem__("class_names", '["road", "car", "bus"]'),
        "calibrated statistics name other classes",
    ),
    "calibrated class count differs": (
        lambda f: (
            f["calibrated"].attrs.__setitem__("class_names", '["road", "car"]'),
            _replace(f, "calibrated/cells/counts", np.zeros((2, 2, 64), np.int64)),
        ),
        "calibrated statistics name other classes",
    ),
    "one class": (
        lambda f: f.attrs.__setitem__("class_names", '["road"]'),
        "needs at least 2 classes",
    ),
    "repeated class names": (
        lambda f: f.attrs.__setitem__("class_names", '["road", "car", "car"]'),
        "not unique",
    ),
    "empty class name": (
        lambda f: f.attrs.__setitem__("class_names", '["road", "", "sky"]'),
        "empty name",
    ),
    "grid too fine for float32": (
        lambda f: (f.attrs.__setitem__("grid_lo", 1e6), f.attrs.__setitem__("grid_hi", 1e6 + 1)),
        "logit grid [1e+06, 1e+06] with 64 bins is out of range",
    ),
    "grid beyond the logit limit": (
        lambda f: f.attrs.__setitem__("grid_hi", 1e300),
        "out of range",
    ),
    "absurd confidence grid": (
        lambda f: f["confidence/counts"].attrs.__setitem__("hi", 1e308),
        "confidence grid",
    ),
    "calibration scale 0": (
        lambda f: _replace(f, "calibration/temperature/scale", np.zeros(3)),
        "calibration/temperature/scale holds 0; scales lie in (0, 10000]",
    ),
    "negative calibration scale": (
        lambda f: _replace(f, "calibration/vector/scale", np.array([1.0, -2.0, 1.0])),
        "calibration/vector/scale holds -2",
    ),
    "unknown calibration": (
        lambda f: (
            f.create_dataset("calibration/platt/scale", data=np.ones(3)),
            f.create_dataset("calibration/platt/bias", data=np.zeros(3)),
        ),
        "unknown calibration 'platt'",
    ),
}


@pytest.mark.parametrize("case", sorted(STATS_CASES))
def test_stats_reader_refuses(tmp_path: Path, case: str) -> None:
    edit, fragment = STATS_CASES[case]
    path = _edited_stats(tmp_path, edit)
    with pytest.raises(InputError) as caught:
        read_stats(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and fragment in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("names", "fragment"),
    [
        (["road", "car", "car"], "not unique"),
        (["road", "", "sky"], "empty name"),
        (["road"], "needs at least 2 classes"),
    ],
)
def test_write_stats_refuses_what_read_stats_refuses(
    tmp_path: Path, names: list[str], fragment: str
) -> None:
    stats = read_stats(write_bytes("valid-copy.h5", VALID_STATS["hist"]))
    stats.class_names = names
    with pytest.raises(InputError, match=fragment):
        write_stats(tmp_path / "out.h5", stats)
    assert not (tmp_path / "out.h5").exists()


def test_stats_scale_refused_in_writing_too(tmp_path: Path) -> None:
    stats = read_stats(write_bytes("valid-copy.h5", VALID_STATS["hist"]))
    assert stats.extras is not None and "vector" in stats.extras.calibrations
    scale, bias = stats.extras.calibrations["vector"]
    stats.extras.calibrations["vector"] = (np.zeros_like(scale), bias)
    with pytest.raises(InputError, match="cannot write these statistics .*scales lie in"):
        write_stats(tmp_path / "out.h5", stats)
    assert not (tmp_path / "out.h5").exists()


# ------------------------------------------------------------------------ images and arrays


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


VALID_PNGS = [
    _png(np.random.default_rng(1).integers(0, 19, (20, 30)).astype(np.uint8)),
    _png(np.random.default_rng(2).integers(0, 256, (20, 30, 3)).astype(np.uint8)),
]


def read_images(path: Path) -> None:
    for reader in (read_label, read_rgb):
        with contextlib.suppress(InputError):
            reader(path)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_as_an_image(data: bytes) -> None:
    read_images(write_bytes("random.png", b"\x89PNG\r\n\x1a\n" + data))
    read_images(write_bytes("random2.png", data))


@FUZZ
@given(st.sampled_from(VALID_PNGS), flips, st.floats(0.05, 1))
def test_mutated_images(png: bytes, changes: list[tuple[float, int]], keep: float) -> None:
    read_images(write_bytes("mutated.png", mutate(png, changes)[: max(8, int(keep * len(png)))]))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


VALID_NPY = _npy(np.random.default_rng(3).normal(size=(3, 4, 5)).astype(np.float32))


def read_array(path: Path) -> None:
    with contextlib.suppress(InputError):
        read_npy(path)


@FUZZ
@given(st.binary(max_size=1024))
def test_random_bytes_as_npy(data: bytes) -> None:
    read_array(write_bytes("random.npy", data))
    read_array(write_bytes("random2.npy", b"\x93NUMPY\x01\x00" + data))


@FUZZ
@given(flips, st.floats(0.05, 1))
def test_mutated_npy(changes: list[tuple[float, int]], keep: float) -> None:
    header = VALID_NPY[:128]  # mutate the header, where the shape and dtype live
    data = mutate(header, changes) + VALID_NPY[128:]
    read_array(write_bytes("mutated.npy", data[: max(1, int(keep * len(data)))]))


@FUZZ
@given(
    st.sampled_from(["<f4", ">f8", "<f2", "<i4", "|O", "<c8", "<U3"]),
    st.text(alphabet="0123456789, ()-", max_size=24),
    st.sampled_from(["False", "True", "1"]),
)
def test_hand_written_npy_headers(descr: str, shape: str, order: str) -> None:
    header = f"{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}"
    header = header.ljust(118) + "\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
    read_array(write_bytes("header.npy", data + bytes(64)))


# ------------------------------------------------------------------------------------ JSON

JSON_EXAMPLES = int(os.environ.get("BLDA_JSON_FUZZ_EXAMPLES", "30"))
"""Examples per JSON reader; CI keeps 30, a one-off deep run sets e.g. 2000."""
JSON_FUZZ = settings(FUZZ, max_examples=JSON_EXAMPLES, derandomize=JSON_EXAMPLES <= 60)
NAMES2 = ["road", "car"]
EMPTY_BINS = {"count": [0] * 15, "confidence_sum": [0.0] * 15, "correct_sum": [0] * 15}


def _json_parts(k: int) -> dict[str, dict]:
    """Shard ``k`` of 2 of a valid report of every command that merges (two classes)."""
    shard = [k, 2]
    matrix = [[3, 1, 0], [0, 2, 1]]
    bins = {**EMPTY_BINS, "count": [0] * 14 + [6], "confidence_sum": [0.0] * 14 + [5.5]}
    bins["correct_sum"] = [0] * 14 + [5]
    return {
        "evaluate": {
            "format": "blda-evaluate",
            "version": 1,
            "settings": {"labels": "store"},
            "partial": {
                "shard": shard,
                "class_names": NAMES2,
                "counts": {
                    "num_images": 1,
                    "num_missing_predictions": 0,
                    "num_unlabelled_predictions": 0,
                },
                "before": {"confusion": matrix, "ece_bins": bins},
                "after": None,
            },
        },
        "compare": {
            "format": "blda-compare",
            "version": 1,
            "class_names": NAMES2,
            "stores": ["t.h5"],
            "settings": {"stats": "s.h5"},
            "split": None,
            "tau_auto": {},
            "skipped_methods": {},
            "partial": {
                "shard": shard,
                "names": [f"img{k}"],
                "rows": [
                    {"method": "none", "tau": None, "auto": False, "held": matrix, "select": None},
                    {"method": "blda", "tau": 0.5, "auto": False, "held": matrix, "select": None},
                ],
            },
        },
        "correct": {
            "format": "blda-correct",
            "version": 1,
            "class_names": NAMES2,
            "settings": {"tau": 0.5},
            "images": 1,
            "changed_pixels": 1,
            "pixels_before": [4, 3],
            "pixels_after": [3, 4],
            "flow": [[3, 1], [0, 3]],
            "partial": {"shard": shard, "num_images": 2},
        },
        "relabel": {
            "format": "blda-relabel",
            "version": 1,
            "complete": True,
            "class_names": NAMES2,
            "stores": ["t.h5"],
            "settings": {},
            "statistics": {},
            "thresholds": None,
            "partial": {
                "shard": shard,
                "num_images": 1,
                "after": [3, 3, 1],
                "flows": {"argmax": [[3, 0, 1], [0, 3, 0], [0, 0, 0]]},
                "quality": {"argmax": matrix},
            },
        },
        "diagnose": {
            "format": "blda-diagnose",
            "version": 1,
            "class_names": NAMES2,
            "statistics": {"path": "s.h5", "fingerprint": "0123456789abcdef"},
            "partial": {
                "shard": shard,
                "predicted": [4, 3],
                "confusion": matrix,
                "anchors": None,
                "num_images": 1,
            },
        },
    }


VALID_CHOICE = {
    "format": "blda-compare",
    "version": 1,
    "selected": {"method": "blda", "tau": 0.5},
    "settings": {"stats": "s.h5", "anchors": "a.h5", "stats_fingerprint": "0123456789abcdef"},
}


def _merger(command: str):
    from blda_posthoc.pipelines.compare import merge_reports
    from blda_posthoc.pipelines.correct import merge_summaries
    from blda_posthoc.pipelines.diagnose import merge_counts
    from blda_posthoc.pipelines.evaluate import merge_partials
    from blda_posthoc.pipelines.relabel import merge_manifests

    return {
        "evaluate": merge_partials,
        "compare": merge_reports,
        "correct": merge_summaries,
        "relabel": merge_manifests,
        "diagnose": merge_counts,
    }[command]


MERGES = ["evaluate", "compare", "correct", "relabel", "diagnose"]


def _paths_of(value: object, here: tuple = ()) -> list[tuple]:
    """Every key path of a JSON document (the root too)."""
    found = [here]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths_of(child, (*here, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths_of(child, (*here, index))
    return found


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([0, 1, 2, -1, 2**31, 2**63 - 1, 2**63, 10**9]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["none", "blda", "rm -rf", "2", "", "argmax", "relabelled"]),
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def _edit(document: object, edits: list[tuple[float, str, object]]) -> object:
    """Replace or delete the values at (relative) positions among the document's key paths."""
    import copy

    document = copy.deepcopy(document)
    for where, action, value in edits:
        paths = _paths_of(document)
        path = paths[int(where * len(paths))]
        if not path:
            document = value
            continue
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if action == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return document


edits = st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(["set", "delete"]), json_values),
    min_size=1,
    max_size=4,
)


def _write_json(name: str, value: object) -> Path:
    import json

    path = WORK / name
    path.write_text(json.dumps(value))  # NaN/Infinity written as Python writes them
    return path


def test_valid_json_parts_merge() -> None:
    """The documents the JSON fuzz edits are valid: unedited, every merge and the choice read."""
    for command in MERGES:
        paths = [_write_json(f"{command}-{k}-of-2.json", _json_parts(k)[command]) for k in (1, 2)]
        assert _merger(command)(paths) is not None
    choice = read_compare_choice(_write_json("choice.json", VALID_CHOICE))
    assert choice.method == "blda" and choice.tau == 0.5 and choice.stats == WORK / "s.h5"


@JSON_FUZZ
@given(st.sampled_from(MERGES), st.sampled_from([1, 2]), edits)
def test_edited_merge_parts(command: str, which: int, changes: list) -> None:
    """Every ``--merge`` reader: an edited part merges or is an InputError, nothing else."""
    parts = [_json_parts(k)[command] for k in (1, 2)]
    parts[which - 1] = _edit(parts[which - 1], changes)
    paths = [
        _write_json(f"{command}-{k}-of-2.json", part) for k, part in zip((1, 2), parts, strict=True)
    ]
    with contextlib.suppress(InputError):
        _merger(command)(paths)


@JSON_FUZZ
@given(st.sampled_from(MERGES), flips)
def test_flipped_bytes_in_merge_parts(command: str, changes: list[tuple[float, int]]) -> None:
    import json

    paths = [_write_json(f"{command}-{k}-of-2.json", _json_parts(k)[command]) for k in (1, 2)]
    paths[0].write_bytes(mutate(json.dumps(_json_parts(1)[command]).encode(), changes))
    with contextlib.suppress(InputError):
        _merger(command)(paths)


@JSON_FUZZ
@given(edits)
def test_edited_compare_choice(changes: list) -> None:
    """``--from-compare``: an edited report gives a checked choice or an InputError."""
    import math

    path = _write_json("choice.json", _edit(VALID_CHOICE, changes))
    try:
        choice = read_compare_choice(path)
    except InputError:
        return
    assert choice.tau is None or (math.isfinite(choice.tau) and choice.tau >= 0)
    assert not isinstance(choice.tau, bool)


@JSON_FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_as_json(data: bytes) -> None:
    path = write_bytes("random.json", data)
    with contextlib.suppress(InputError):
        read_compare_choice(path)
    with contextlib.suppress(InputError):
        _merger("evaluate")([path])


@pytest.fixture(autouse=True, scope="module")
def _cleanup():
    yield
    import shutil

    shutil.rmtree(WORK, ignore_errors=True)
