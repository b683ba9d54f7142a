"""Read a gzip + shuffle HDF5 dataset by decompressing its chunks in parallel threads.

h5py decompresses a dataset's chunks one after the other under its global lock, so a read uses
one core. For datasets filtered exactly as stores write them (byte shuffle, then deflate; see
:func:`blda_posthoc.io.store.encode_logits`), :func:`read_chunked` copies each chunk's
compressed bytes out of the file under that lock (fast) and hands them to a pool of threads
that inflate, unshuffle and cast them into the output (zlib and numpy release the GIL). Each
chunk is inflated to at most its expected size and must end exactly there, so a crafted chunk
can neither allocate more memory than the dataset's shape implies nor yield a wrong-size array.
Any other dataset (other or no filters, contiguous storage, unwritten chunks, a chunk whose
filters were skipped) is left to h5py: :func:`read_chunked` returns None for it.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import h5py
import numpy as np
from h5py import h5d, h5z

MAX_CHUNKS = 1 << 16
"""Most chunks of a dataset read here (a finer dataset is read by h5py)."""
MAX_CHUNK_BYTES = 1 << 26
"""Largest decompressed chunk read here (a larger one is read by h5py)."""


class ChunkError(ValueError):
    """A chunk that does not decode to the size its dataset's shape implies."""


@dataclass
class Decoded:
    """A dataset read by :func:`read_chunked`.

    Attributes:
        values: The dataset's values as float32, in its shape.
        low: Smallest value (NaN when any value is NaN).
        high: Largest value (NaN when any value is NaN).
    """

    values: np.ndarray
    low: float
    high: float


def decodable_chunks(dset: h5py.Dataset) -> tuple[int, ...] | None:
    """The chunk shape of a float16/float32 dataset stored as stores write their logits.

    That is: chunked, filtered by exactly byte shuffle (of the dtype's size) then deflate, at
    most :data:`MAX_CHUNKS` chunks of at most :data:`MAX_CHUNK_BYTES` each.

    Returns:
        The chunk shape, or None when the dataset is stored any other way.
    """
    dtype = dset.dtype
    if dtype not in (np.float16, np.float32) or dset.ndim < 1 or dset.size == 0:
        return None
    plist = dset.id.get_create_plist()
    if plist.get_layout() != h5d.CHUNKED or plist.get_nfilters() != 2:
        return None
    shuffle, deflate = plist.get_filter(0), plist.get_filter(1)
    if shuffle[0] != h5z.FILTER_SHUFFLE or tuple(shuffle[2]) != (dtype.itemsize,):
        return None
    if deflate[0] != h5z.FILTER_DEFLATE:
        return None
    chunk = tuple(int(n) for n in plist.get_chunk())
    if len(chunk) != dset.ndim or min(chunk) < 1:
        return None
    count = math.prod(-(-s // c) for s, c in zip(dset.shape, chunk, strict=True))
    if count > MAX_CHUNKS or math.prod(chunk) * dtype.itemsize > MAX_CHUNK_BYTES:
        return None
    return chunk


def inflate(data: bytes, size: int) -> bytes:
    """Decompress one deflate (zlib) stream that must hold exactly ``size`` bytes.

    Raises:
        ChunkError: When the stream is damaged, holds fewer or more bytes, or is followed by
            anything.
    """
    stream = zlib.decompressobj()
    try:
        plain = stream.decompress(data, size)
        # At ``size`` bytes the stream's end may be still unread: it must yield nothing more.
        if len(plain) == size and not stream.eof and stream.decompress(stream.unconsumed_tail, 1):
            raise ChunkError(f"decompresses to more than {size} bytes")
    except zlib.error as exc:
        raise ChunkError(f"damaged deflate data ({exc})") from exc
    if len(plain) != size:
        raise ChunkError(f"decompresses to {len(plain)} bytes, not {size}")
    if not stream.eof:
        raise ChunkError("its deflate data is cut short")
    if stream.unused_data:
        raise ChunkError(f"{len(stream.unused_data)} bytes after its deflate data")
    return plain


def decode_chunk(
    data: bytes, chunk: tuple[int, ...], dtype: np.dtype, out: np.ndarray, offset: tuple[int, ...]
) -> tuple[float, float]:
    """Decode one chunk into its place in ``out``; the smallest and largest value it put there.

    Args:
        data: The chunk's compressed bytes (shuffle, then deflate).
        chunk: The chunk shape (edge chunks are stored padded to it).
        dtype: The stored dtype.
        out: The float32 output, the dataset's shape.
        offset: The chunk's offset in the dataset.

    Returns:
        ``(min, max)`` of the chunk's values inside the dataset (NaN when one is NaN).
    """
    count, itemsize = math.prod(chunk), dtype.itemsize
    try:
        plain = inflate(data, count * itemsize)
    except ChunkError as exc:
        raise ChunkError(f"chunk {offset}: {exc}") from exc
    planes = np.frombuffer(plain, np.uint8).reshape(itemsize, count)
    interleaved = np.empty((count, itemsize), np.uint8)
    for k in range(itemsize):  # faster than a transposed copy
        interleaved[:, k] = planes[k]
    block = interleaved.view(dtype).reshape(chunk)
    region = tuple(
        slice(o, min(o + c, s)) for o, c, s in zip(offset, chunk, out.shape, strict=True)
    )
    target = out[region]
    target[...] = block[tuple(slice(0, r.stop - r.start) for r in region)]
    return float(np.min(target)), float(np.max(target))


def read_chunked(
    dset: h5py.Dataset,
    pool: Executor | None = None,
    share: Callable[[], bool] | None = None,
) -> Decoded | None:
    """Read a dataset as float32, its chunks decompressed in ``pool``'s threads.

    Bit-identical to ``dset[()].astype(np.float32)``.

    Args:
        dset: A float16 or float32 dataset.
        pool: Threads that decode chunks; None decodes them in the calling thread.
        share: Asked before each chunk whether to hand it to ``pool`` (else it is decoded in
            the calling thread); default: always.

    Returns:
        The values with their range, or None when the dataset is not stored as
        :func:`decodable_chunks` requires or a chunk is unwritten or was stored unfiltered
        (then read it with h5py).

    Raises:
        ChunkError: When a chunk is damaged (h5py errors pass through as they are).
    """
    chunk = decodable_chunks(dset)
    if chunk is None:
        return None
    offsets = list(
        itertools.product(*(range(0, s, c) for s, c in zip(dset.shape, chunk, strict=True)))
    )
    if len(offsets) == 1:  # nothing to share out
        pool = None
    dsid, dtype = dset.id, dset.dtype
    file_size = dset.file.id.get_filesize()
    ranges: list[Future[tuple[float, float]]] = []
    for offset in offsets:  # first, so that what happens does not depend on the threads
        info = dsid.get_chunk_info_by_coord(offset)
        if info.byte_offset is None or info.filter_mask != 0:
            return None
        if info.size > file_size:
            raise ChunkError(f"chunk {offset}: {info.size} bytes, more than the file holds")
    out = np.empty(dset.shape, np.float32)
    try:
        for offset in offsets:
            mask, data = dsid.read_direct_chunk(offset)
            if mask != 0:
                raise ChunkError(f"chunk {offset}: filter mask {mask}")
            if pool is not None and (share is None or share()):
                ranges.append(pool.submit(decode_chunk, data, chunk, dtype, out, offset))
                continue
            ranges.append(_now(decode_chunk, data, chunk, dtype, out, offset))
            if ranges[-1].exception() is not None:
                break  # raised below, unless an earlier chunk fails too
        done = [r.result() for r in ranges]  # the first failing chunk in order raises
    finally:
        for r in ranges:
            r.cancel()
    lows, highs = np.array([r[0] for r in done]), np.array([r[1] for r in done])
    return Decoded(out, float(np.min(lows)), float(np.max(highs)))


def _now(decode: Callable[..., tuple[float, float]], *args: object) -> Future[tuple[float, float]]:
    """Run ``decode`` here; its result (or error) as a finished future."""
    done: Future[tuple[float, float]] = Future()
    try:
        done.set_result(decode(*args))
    except Exception as exc:  # noqa: BLE001 - raised by the caller, in chunk order
        done.set_exception(exc)
    return done
