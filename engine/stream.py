"""Running a pipeline's stages in threads joined by bounded queues, and timing its stages.

`run_stages(items, load, stages, ...)` feeds chunks of `items` to `load(chunk, start)` (start: the index of the
chunk's first item in the stream), passes each result through `stages` in turn
(one thread per stage) and yields the last stage's outputs in order. Neighbouring chunks overlap across stages (the
models, the compiled kernels and FAISS release the GIL) while at most about (len(stages) + 1) * (prefetch + 1)
chunks are alive at once, whatever the stream's length. An error in any stage stops every thread and is raised to the
consumer; closing the generator early stops them too.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

_DONE = object()
_POLL = 0.05  # seconds between checks of the stop flag while a queue is full or empty


class StageTimes:
    """Seconds spent per pipeline stage, accumulated over calls (thread-safe; bench/throughput.py reads it).

    `on_device(True)` also records a pair of CUDA events per stage on the calling thread's current stream (torch),
    read by `device_seconds`: the device time between a stage's start and end, idle gaps included."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._events: dict[str, list] | None = None
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        events = self._record() if self._events is not None else None
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)
            if events is not None:
                events[1].record()
                with self._lock:
                    self._events[stage].append(events)

    @staticmethod
    def _record():
        import torch

        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        return begin, end

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def on_device(self, enabled: bool = True) -> None:
        with self._lock:
            self._events = defaultdict(list) if enabled else None

    def device_seconds(self) -> dict[str, float]:
        """Per stage, the summed device time between its events (waits for the events to complete)."""
        with self._lock:
            events = {stage: list(pairs) for stage, pairs in (self._events or {}).items()}
        return {stage: sum(begin.elapsed_time(end) for begin, end in pairs if end.synchronize() is None) / 1000.0
                for stage, pairs in events.items()}

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()
            if self._events is not None:
                self._events = defaultdict(list)


class _Failure:
    """An exception travelling down the queues to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def run_stages(items: Iterable, load: Callable[[list, int], object], stages: Sequence[Callable[[object], object]],
               chunk_size: int, prefetch: int = 2, name: str = "stage") -> Iterator:
    """Yield the elements of stages[-1](...(stages[0](load(chunk)))) for consecutive chunks of `items`, in order."""
    stop = threading.Event()
    queues = [queue.Queue(prefetch) for _ in range(len(stages) + 1)]

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue):
        while not stop.is_set():
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                continue
        return _DONE

    def loader() -> None:
        try:
            chunk: list = []
            start = 0
            for item in items:
                if stop.is_set():
                    return
                chunk.append(item)
                if len(chunk) == chunk_size:
                    if not put(queues[0], load(chunk, start)):
                        return
                    start += len(chunk)
                    chunk = []
            if chunk:
                put(queues[0], load(chunk, start))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            put(queues[0], _Failure(error))
        put(queues[0], _DONE)

    def worker(source: queue.Queue, sink: queue.Queue, work) -> None:
        while True:
            batch = get(source)
            if batch is _DONE or isinstance(batch, _Failure):
                put(sink, batch)
                return
            try:
                result = work(batch)
            except BaseException as error:  # noqa: BLE001 - handed to the consumer
                put(sink, _Failure(error))
                return
            if not put(sink, result):
                return

    threads = [threading.Thread(target=loader, name=f"{name}-load", daemon=True)]
    threads += [threading.Thread(target=worker, args=(queues[i], queues[i + 1], work), name=f"{name}-{i}",
                                 daemon=True) for i, work in enumerate(stages)]
    for thread in threads:
        thread.start()
    try:
        while True:
            results = get(queues[-1])
            if results is _DONE:
                return
            if isinstance(results, _Failure):
                raise results.error
            yield from results
    finally:
        stop.set()
        for thread in threads:
            thread.join()
