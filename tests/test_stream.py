"""engine.stream: run_stages keeps input order across threaded stages, raises any stage's error to the consumer,
bounds what is alive and stops its threads when the consumer closes early; StageTimes accumulates per stage."""

from __future__ import annotations

import threading
import time

import pytest

from engine.stream import StageTimes, run_stages


def stage_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"{name}-")]


def wait_for_no_threads(name: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while stage_threads(name) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not stage_threads(name), f"threads left running: {stage_threads(name)}"


@pytest.mark.parametrize("chunk_size,prefetch", [(1, 1), (3, 2), (4, 1), (50, 3)])
def test_outputs_in_input_order_through_every_stage(rng, chunk_size, prefetch):
    delays = rng.uniform(0, 0.002, 40)  # stages finish chunks at uneven speeds

    starts = []

    def load(chunk, start):
        starts.append(start)
        assert chunk[0] == start  # the index of the chunk's first item in the stream
        return [(x, delays[x]) for x in chunk]

    def double(batch):
        time.sleep(batch[0][1])
        return [(2 * x, d) for x, d in batch]

    def finish(batch):
        time.sleep(batch[-1][1])
        return [x + 1 for x, _ in batch]

    got = list(run_stages(range(40), load, [double, finish], chunk_size, prefetch, name="order"))
    assert got == [2 * x + 1 for x in range(40)]
    assert starts == list(range(0, 40, chunk_size))
    wait_for_no_threads("order")


def test_no_items_and_no_stages():
    def as_list(chunk, start):
        return list(chunk)

    assert list(run_stages([], as_list, [lambda b: b], 3, name="empty")) == []
    assert list(run_stages("abc", as_list, [], 2, name="bare")) == ["a", "b", "c"]  # the loader's chunks as they are
    wait_for_no_threads("empty")
    wait_for_no_threads("bare")


@pytest.mark.parametrize("where", ["items", "load", "first", "last"])
def test_an_error_anywhere_reaches_the_consumer_after_the_good_chunks(where):
    def items():
        for x in range(10):
            if where == "items" and x == 6:
                raise KeyError("bad item")
            yield x

    def load(chunk, start):
        if where == "load" and 6 in chunk:
            raise KeyError("bad load")
        return chunk

    def first(batch):
        if where == "first" and 6 in batch:
            raise KeyError("bad first")
        return batch

    def last(batch):
        if where == "last" and 6 in batch:
            raise KeyError("bad last")
        return batch

    stream = run_stages(items(), load, [first, last], 2, name=f"error-{where}")
    got = []
    with pytest.raises(KeyError, match="bad"):
        for x in stream:
            got.append(x)
    assert got == [0, 1, 2, 3, 4, 5]  # every chunk before the failing one came through, in order
    wait_for_no_threads(f"error-{where}")


def test_closing_early_stops_the_threads_and_the_reading():
    pulled = []

    def endless():
        x = 0
        while True:
            pulled.append(x)
            yield x
            x += 1

    chunk_size, prefetch, stages = 2, 1, 2
    stream = run_stages(endless(), lambda chunk, start: list(chunk), [list] * stages, chunk_size, prefetch, name="close")
    assert next(stream) == 0
    time.sleep(0.3)  # let every queue fill
    # a chunk in the loader's hand + one per queue + one in each stage + the one being yielded
    assert len(pulled) <= chunk_size * ((stages + 1) * prefetch + stages + 2)
    assert stage_threads("close")
    stream.close()
    wait_for_no_threads("close")
    count = len(pulled)
    time.sleep(0.1)
    assert len(pulled) == count  # nothing reads the items any more


def test_stage_times_accumulate_and_are_thread_safe():
    times = StageTimes()
    with times("a"):
        pass
    times.add("b", 1.5)

    def work():
        for _ in range(1000):
            times.add("c", 0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(times.seconds) == {"a", "b", "c"} and times.seconds["b"] == 1.5
    assert times.seconds["c"] == pytest.approx(4.0)
    with pytest.raises(ValueError):
        with times("d"):
            raise ValueError("timed even when it fails")
    assert "d" in times.seconds
    times.reset()
    assert not times.seconds
