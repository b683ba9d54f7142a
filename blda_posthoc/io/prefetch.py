"""Run an iterable ahead of its consumer in a background thread (reading overlapped with work)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable
from typing import TypeVar, cast

T = TypeVar("T")

_DONE = object()
JOIN_SECONDS = 1.0
"""How long closing the generator waits for the producer thread."""


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(
    items: Iterable[T], depth: int = 2, waiting: threading.Event | None = None
) -> Generator[T, None, None]:
    """Yield ``items`` in order while a thread produces up to ``depth`` of them ahead.

    Meant for reading: HDF5 (h5py), zlib and numpy release the GIL while they decompress and
    copy, so the next image is read while the caller computes on this one. An exception raised
    while producing an item is raised here, at that item. Closing the returned generator early
    (``break``, an exception in the caller) stops the thread after the item it is producing.

    Args:
        items: Any iterable; it is iterated in the background thread only.
        depth: Items produced ahead (memory: ``depth + 1`` items at most); ``0`` iterates
            ``items`` in the calling thread with no thread at all.
        waiting: Set while the caller waits for an item that is not ready yet (always with
            ``depth`` 0), so that producing it may use more threads then (see
            ``LogitStore.iter_images`` in :mod:`blda_posthoc.io.store`).

    Yields:
        The items of ``items``, in order.
    """
    if depth <= 0:
        if waiting is not None:
            waiting.set()
        yield from items
        return
    slots: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                if waiting is not None:  # a waiting consumer has its item now
                    waiting.clear()
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Raised(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="blda-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            if waiting is not None and slots.empty():
                waiting.set()
            try:
                item = slots.get()
            finally:
                if waiting is not None:
                    waiting.clear()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield cast(T, item)
    finally:
        stop.set()
        # Bounded: this ``finally`` may run inside a garbage collection triggered while the
        # calling thread holds a lock the producer waits for (h5py's global lock), and an
        # unbounded join would then never return. The producer stops on its own after the item
        # it is producing (``stop`` is set) and, being a daemon, never holds the process.
        thread.join(timeout=JOIN_SECONDS)
