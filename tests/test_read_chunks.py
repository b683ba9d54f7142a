"""Reading logits by decoding their chunks in threads (io/chunks.py) equals h5py, or falls back."""

from __future__ import annotations

import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from h5py import h5d, h5p, h5s, h5t

from blda_posthoc.errors import InputError
from blda_posthoc.io import chunks
from blda_posthoc.io.chunks import ChunkError, decodable_chunks, inflate, read_chunked
from blda_posthoc.io.store import LogitStore, StoreWriter, encode_logits


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Torch threads (``--threads``) while the test runs; the decoder pool follows them."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def logits_like(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Float32 logits with awkward values: signed zeros, float16 subnormals, wide magnitudes."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 4.0, shape).astype(np.float32)
    flat = z.reshape(-1)
    flat[::7] = -0.0
    flat[3::11] = 3e-6  # a float16 subnormal
    flat[5::13] *= 1000.0
    return z


def write_store(path: Path, logits: np.ndarray, dtype: str) -> None:
    with StoreWriter(path, [f"c{i}" for i in range(logits.shape[0])], dtype=dtype) as writer:
        writer.write("x", logits)


def h5py_read(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["images/x/logits"][()].astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.int32), b.view(np.int32))


def decoded_here(path: Path) -> bool:
    """Whether the fast path reads this store's image (instead of leaving it to h5py)."""
    with h5py.File(path, "r") as f:
        return read_chunked(f["images/x/logits"]) is not None


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize(
    "shape", [(2, 1, 1), (2, 5, 7), (3, 600, 530), (2, 512, 1024), (4, 513, 37)]
)
def test_writer_stores_read_bit_identical_to_h5py(
    tmp_path: Path, threads: int, dtype: str, shape: tuple[int, int, int]
) -> None:
    path = tmp_path / "s.h5"
    write_store(path, logits_like(shape), dtype)
    assert decoded_here(path)
    with LogitStore([path]) as store:
        got = store.read("x").logits
    assert got.shape == shape
    assert same_bits(got, h5py_read(path))


def replace_logits(path: Path, make: Callable[[h5py.Group, np.ndarray], None]) -> np.ndarray:
    """Rewrite image ``x``'s logits dataset with ``make(group, values)``; return the values."""
    with h5py.File(path, "a") as f:
        group = f["images/x"]
        values = group["logits"][()]
        del group["logits"]
        make(group, values)
    return values


THIRD_PARTY = {
    "auto chunks": {"chunks": True, "compression": "gzip", "shuffle": True},
    "level 9, chunks across channels": {
        "chunks": (2, 100, 64),
        "compression": "gzip",
        "compression_opts": 9,
        "shuffle": True,
    },
    "resizable, chunks larger than the data": {
        "chunks": (3, 700, 700),
        "maxshape": (None, None, None),
        "compression": "gzip",
        "shuffle": True,
    },
}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("kind", sorted(THIRD_PARTY))
def test_plain_h5py_gzip_shuffle_stores_read_bit_identical(
    tmp_path: Path, threads: int, dtype: str, kind: str
) -> None:
    path = tmp_path / "s.h5"
    write_store(path, logits_like((3, 300, 250)), dtype)
    values = replace_logits(
        path, lambda g, v: g.create_dataset("logits", data=v, **THIRD_PARTY[kind])
    )
    assert decoded_here(path)
    with LogitStore([path]) as store:
        got = store.read("x").logits
    assert same_bits(got, values.astype(np.float32))


def deflate_then_shuffle(group: h5py.Group, values: np.ndarray) -> None:
    """Filters in the other order (h5py cannot ask for it; the low-level API can)."""
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_chunk((1, 64, 64))
    dcpl.set_deflate(4)
    dcpl.set_shuffle()
    space = h5s.create_simple(values.shape)
    dsid = h5d.create(group.id, b"logits", h5t.py_create(values.dtype), space, dcpl=dcpl)
    dsid.write(h5s.ALL, h5s.ALL, np.ascontiguousarray(values))


def partly_written(group: h5py.Group, values: np.ndarray) -> None:
    """A chunked dataset whose last chunk was never written (HDF5 fills it with zeros)."""
    dset = group.create_dataset(
        "logits", shape=values.shape, dtype=values.dtype, chunks=(1, 150, 250), **GZ
    )
    dset[:, :150] = values[:, :150]
    values[:, 150:] = 0  # what every reader sees


def shuffle_skipped(group: h5py.Group, values: np.ndarray) -> None:
    """Every chunk stored deflated but not shuffled, its filter mask saying so."""
    dset = group.create_dataset(
        "logits", shape=values.shape, dtype=values.dtype, chunks=(1, 300, 250), **GZ
    )
    for c in range(values.shape[0]):
        dset.id.write_direct_chunk((c, 0, 0), zlib.compress(values[c].tobytes()), filter_mask=1)


GZ = {"compression": "gzip", "shuffle": True}
FALLBACKS: dict[str, Callable[[h5py.Group, np.ndarray], None]] = {
    "contiguous": lambda g, v: g.create_dataset("logits", data=v),
    "chunked, no filter": lambda g, v: g.create_dataset("logits", data=v, chunks=True),
    "gzip without shuffle": lambda g, v: g.create_dataset("logits", data=v, compression="gzip"),
    "lzf": lambda g, v: g.create_dataset("logits", data=v, compression="lzf", shuffle=True),
    "fletcher32 too": lambda g, v: g.create_dataset("logits", data=v, fletcher32=True, **GZ),
    "deflate then shuffle": deflate_then_shuffle,
    "unwritten chunk": partly_written,
    "filter mask": shuffle_skipped,
}


@pytest.mark.parametrize("kind", sorted(FALLBACKS))
def test_other_layouts_are_left_to_h5py(tmp_path: Path, threads: int, kind: str) -> None:
    path = tmp_path / "s.h5"
    write_store(path, logits_like((3, 300, 250)), "float16")
    values = replace_logits(path, FALLBACKS[kind])
    assert not decoded_here(path)
    with LogitStore([path]) as store:
        got = store.read("x").logits
    assert same_bits(got, values.astype(np.float32))
    assert same_bits(got, h5py_read(path))


def test_chunks_are_decoded_in_a_pool_as_large_as_torch_threads(
    tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.h5"
    write_store(path, logits_like((4, 600, 600)), "float16")
    names: list[str] = []
    decode = chunks.decode_chunk

    def spy(*args: object) -> tuple[float, float]:
        names.append(threading.current_thread().name)
        return decode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(chunks, "decode_chunk", spy)
    with LogitStore([path]) as store:
        store.read("x")
        pool = store._pool
        if threads == 1:
            assert pool is None
            assert set(names) == {threading.current_thread().name}
        else:
            assert pool is not None and pool._max_workers == threads
            assert all(n.startswith("blda-decode") for n in names)
        assert len(names) == 16
    assert store._pool is None  # closed with the store


def put_chunk(path: Path, offset: tuple[int, int, int], data: bytes) -> None:
    with h5py.File(path, "a") as f:
        f["images/x/logits"].id.write_direct_chunk(offset, data)


def deflated(data: bytes) -> bytes:
    return zlib.compress(data, 1)


CHUNK_BYTES = 1 * 40 * 30 * 2  # one float16 chunk of a (2, 40, 30) image
HOSTILE = {
    "too short": (deflated(bytes(CHUNK_BYTES - 2)), "decompresses to 2398 bytes, not 2400"),
    "too long": (deflated(bytes(CHUNK_BYTES + 1)), "decompresses to more than 2400 bytes"),
    "bomb": (deflated(bytes(1 << 25)), "decompresses to more than 2400 bytes"),
    "garbage": (b"\x78\x01" + bytes(range(256)) * 4, "damaged deflate data"),
    "cut short": (deflated(bytes(CHUNK_BYTES))[:-3], "deflate data is cut short"),
    "trailing bytes": (deflated(bytes(CHUNK_BYTES)) + b"junk", "4 bytes after its deflate data"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_chunks_end_in_one_error_without_unbounded_memory(
    tmp_path: Path, threads: int, kind: str
) -> None:
    path = tmp_path / "s.h5"
    write_store(path, logits_like((2, 40, 30)), "float16")
    data, problem = HOSTILE[kind]
    put_chunk(path, (1, 0, 0), data)
    with LogitStore([path]) as store:
        tracemalloc.start()
        try:
            with pytest.raises(InputError) as info:
                store.read("x")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    message = str(info.value)
    assert message.startswith(f"{path}: image 'x': cannot read (chunk (1, 0, 0): ")
    assert problem in message
    assert "\n" not in message
    assert peak < 1 << 20  # the bomb inflates to 32 MiB of zeros


def test_bad_values_in_a_well_formed_chunk_keep_their_messages(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    logits = logits_like((2, 40, 30))
    write_store(path, logits, "float16")
    for value, problem in [
        (np.nan, "logits contain NaN or infinite values"),
        (-np.inf, "logits contain NaN or infinite values"),
        (60000.0, "outside the recorded"),
    ]:
        bad = logits.copy()
        bad[1, 39, 29] = value
        ((offset, data),) = [e for e in encode_logits(bad, "float16") if e[0] == (1, 0, 0)]
        put_chunk(path, offset, data)
        with LogitStore([path]) as store, pytest.raises(InputError, match=problem) as info:
            store.read("x")
        assert str(info.value).startswith(f"{path}: image 'x': logits ")


def test_inflate_checks_the_exact_size() -> None:
    plain = np.random.default_rng(0).bytes(5000)
    assert inflate(zlib.compress(plain), 5000) == plain
    with pytest.raises(ChunkError, match="more than 4999"):
        inflate(zlib.compress(plain), 4999)
    with pytest.raises(ChunkError, match="5000 bytes, not 5001"):
        inflate(zlib.compress(plain), 5001)
    # a stream flushed in pieces (an empty stored block before its end)
    stream = zlib.compressobj(1)
    split = stream.compress(plain) + stream.flush(zlib.Z_SYNC_FLUSH) + stream.flush()
    assert inflate(split, 5000) == plain
    with pytest.raises(ChunkError, match="0 bytes, not 5000"):
        inflate(b"", 5000)


def test_decodable_chunks_wants_float_data_shuffled_then_deflated_in_few_chunks(
    tmp_path: Path,
) -> None:
    with h5py.File(tmp_path / "a.h5", "w") as f:
        ok = f.create_dataset("ok", data=np.zeros((1, 8, 8), np.float16), chunks=(1, 4, 4), **GZ)
        assert decodable_chunks(ok) == (1, 4, 4)
        fine = f.create_dataset("fine", shape=(1, 1024, 1024), dtype=np.float16, chunks=(1, 2, 2))
        assert decodable_chunks(fine) is None  # no filters at all
        many = f.create_dataset(
            "many", shape=(1, 1024, 1024), dtype=np.float16, chunks=(1, 2, 2), **GZ
        )
        assert decodable_chunks(many) is None  # 262144 chunks > MAX_CHUNKS
        ints = f.create_dataset("ints", data=np.zeros((1, 8, 8), np.int16), chunks=(1, 4, 4), **GZ)
        assert decodable_chunks(ints) is None


def alternate() -> Callable[[], bool]:
    state = [False]

    def share() -> bool:
        state[0] = not state[0]
        return state[0]

    return share


SHARES: dict[str, Callable[[], Callable[[], bool] | None]] = {
    "always": lambda: None,
    "never": lambda: lambda: False,
    "alternately": alternate,
}


@pytest.mark.parametrize("share", sorted(SHARES))
def test_sharing_chunks_or_not_gives_the_same_values_and_the_same_first_error(
    tmp_path: Path, share: str
) -> None:
    path = tmp_path / "s.h5"
    write_store(path, logits_like((5, 70, 30)), "float16")
    expected = h5py_read(path)
    used: set[str] = set()
    decode = chunks.decode_chunk

    def spy(*args: object) -> tuple[float, float]:
        used.add(threading.current_thread().name)
        return decode(*args)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(2, "pool") as pool:
        patch.setattr(chunks, "decode_chunk", spy)
        with h5py.File(path, "r") as f:
            decoded = read_chunked(f["images/x/logits"], pool, SHARES[share]())
        assert decoded is not None and same_bits(decoded.values, expected)
        here = threading.current_thread().name
        in_pool = {n for n in used if n.startswith("pool_")}
        assert (here in used, bool(in_pool), used <= in_pool | {here}) == {
            "always": (False, True, True),
            "never": (True, False, True),
            "alternately": (True, True, True),
        }[share]
        put_chunk(path, (2, 0, 0), b"\x78\x01" + bytes(range(256)))
        put_chunk(path, (4, 0, 0), deflated(bytes(10)))
        with h5py.File(path, "r") as f, pytest.raises(ChunkError, match=r"^chunk \(2, 0, 0\): "):
            read_chunked(f["images/x/logits"], pool, SHARES[share]())


def test_store_loop_shares_chunks_out_only_while_the_caller_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.h5"
    with StoreWriter(path, [f"c{i}" for i in range(4)]) as writer:
        for i in range(4):
            writer.write(f"img_{i}", logits_like((4, 600, 600), seed=i))
    decoded_by: list[str] = []
    decode = chunks.decode_chunk

    def spy(*args: object) -> tuple[float, float]:
        decoded_by.append(threading.current_thread().name)
        return decode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(chunks, "decode_chunk", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with LogitStore([path]) as store:
            for index, _ in enumerate(store.iter_images()):
                if index == 0:
                    first = list(decoded_by)  # read while this loop waited for it
                time.sleep(0.3)  # busy: the next image is read meanwhile, in one thread
            direct = store.read("img_0")  # outside the loop: always in the pool
    finally:
        torch.set_num_threads(before)
    assert len(decoded_by) == 5 * 16 and same_bits(direct.logits, h5py_read_image(path, "img_0"))
    assert any(name.startswith("blda-decode") for name in first)
    # (a chunk or two may go to the pool when the loop asks for an image just as it is read)
    assert decoded_by[16:64].count("blda-prefetch") >= 40
    assert all(name.startswith("blda-decode") for name in decoded_by[64:])


def h5py_read_image(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[f"images/{name}/logits"][()].astype(np.float32)
