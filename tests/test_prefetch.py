import threading
import time

import pytest

from blda_posthoc.io.prefetch import prefetch


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_yields_every_item_in_order(depth: int):
    assert list(prefetch(iter(range(50)), depth)) == list(range(50))
    assert list(prefetch([], depth)) == []


def test_prefetch_produces_in_another_thread_and_at_most_depth_ahead():
    produced: list[int] = []
    threads: set[str] = set()

    def items():
        for i in range(10):
            threads.add(threading.current_thread().name)
            produced.append(i)
            yield i

    it = prefetch(items(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)
    # item 0 consumed, items 1 and 2 queued, item 3 produced and waiting for a slot
    assert len(produced) <= 4
    assert list(it) == list(range(1, 10))
    assert threads == {"blda-prefetch"}


def test_prefetch_raises_a_producer_error_at_its_item():
    def items():
        yield 1
        yield 2
        raise KeyError("broken image")

    got = []
    with pytest.raises(KeyError, match="broken image"):
        for x in prefetch(items(), depth=2):
            got.append(x)
    assert got == [1, 2]


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
    produced: list[int] = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    before = threading.active_count()
    it = prefetch(items(), depth=2)
    for x in it:
        if x == 3:
            break
    it.close()
    assert threading.active_count() == before
    assert len(produced) <= 3 + 1 + 2 + 1


def test_store_loop_reads_ahead_and_gives_every_image_in_order(tmp_path):
    import numpy as np

    from blda_posthoc.io.store import LogitStore, StoreWriter

    rng = np.random.default_rng(0)
    names = [f"img_{i}" for i in range(5)]
    with StoreWriter(tmp_path / "s.h5", ["a", "b", "c"]) as writer:
        for name in names:
            writer.write(name, rng.normal(size=(3, 4, 6)).astype(np.float32), size=(8, 12))
    seen: list[str] = []

    def progress(items, count):
        assert count == len(names)
        for item in items:
            seen.append(item)
            yield item

    def readers() -> int:  # the store's chunk decoders live as long as the store
        return sum(not t.name.startswith("blda-decode") for t in threading.enumerate())

    before = threading.active_count()
    with LogitStore([tmp_path / "s.h5"]) as store:
        got = [(r.name, z.shape) for r, z in store.iter_images(progress=progress)]
        assert got == [(n, (3, 8, 12)) for n in names] and seen == names
        loop = store.iter_images()
        first, _ = next(loop)
        loop.close()  # stopping early ends the reading thread
        assert first.name == names[0] and readers() == before
    assert threading.active_count() == before


def eventually(flag: threading.Event, value: bool, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while flag.is_set() != value and time.monotonic() < end:
        time.sleep(0.005)
    return flag.is_set() == value


@pytest.mark.parametrize("depth", [0, 1])
def test_prefetch_says_when_the_consumer_waits(depth: int):
    waiting = threading.Event()
    busy, checked = threading.Event(), threading.Event()
    seen: list[bool] = []

    def items():
        seen.append(eventually(waiting, True))  # the consumer waits for item 0
        yield 0
        if depth:
            busy.wait(5)
            seen.append(eventually(waiting, False))  # ... and works on it now
            checked.set()
        yield 1

    got = []
    for x in prefetch(items(), depth, waiting):
        got.append(x)
        busy.set()
        checked.wait(5 if depth else 0)
    assert got == [0, 1] and seen == [True] * (1 + depth)
    assert waiting.is_set() == (depth == 0)
