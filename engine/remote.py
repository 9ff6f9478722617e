"""The engine's face over a Triton server that runs the whole segmentation (the `moduseg_segment` model).

    engine = RemoteEngine("127.0.0.1:8001", protocol="grpc")
    results = engine.segment_batch(["a.jpg", "b.jpg"])        # ServedResult: label_map, segments(), to_dict()

Images are decoded and checked here exactly as the in-process Engine does (paths, EXIF orientation, BGR arrays,
on_error="skip"), then each goes to the server as its own request, up to `concurrency` in flight; the server's
dynamic batcher merges them whatever their sizes. The transport (TLS, headers, retries of transient failures with a
bounded timeout, per-thread clients) is TritonRuntime's.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from .config import Config
from .errors import InputError, ModelError
from .export.triton_segment import SEGMENT_MODEL
from .export.triton_segment_model import INPUT, LABELS, SEGMENTS
from .batches import Batch, Skipped, check_modes, describe_item, in_input_order, load_batch
from .stream import StageTimes, run_stages


@dataclass
class ServedResult:
    """Segmentation of one image by the server: the label map and the server's record (Result.to_dict())."""

    label_map: np.ndarray
    record: dict
    class_names: tuple[str, ...] = field(repr=False, default=())

    def segments(self) -> list[dict]:
        return self.record["segments"]

    def class_summary(self) -> dict[str, float]:
        return self.record["classes"]

    def to_dict(self) -> dict:
        return self.record


class RemoteEngine:
    """segment / segment_batch / segment_stream through a Triton server's segmentation model.

    url, protocol, timeout, retries, ssl, ssl_options, headers: TritonRuntime's.
    model_name: the segmentation model (default "moduseg_segment").
    concurrency: requests in flight at once (one image each).
    max_image_pixels: images over this are refused here, before sending (Config.max_image_pixels by default).
    """

    def __init__(self, url: str | None = None, model_name: str = SEGMENT_MODEL, protocol: str = "http",
                 concurrency: int = 4, max_image_pixels: int | None = None, **runtime_options) -> None:
        from .models.triton_runtime import TritonRuntime

        if concurrency < 1:
            raise InputError(f"concurrency must be >= 1, got {concurrency}")
        self.runtime = TritonRuntime(url, model_name=model_name, protocol=protocol, concurrency=1, max_batch_size=1,
                                     **runtime_options)
        missing = [n for n in (LABELS, SEGMENTS) if n not in self.runtime.output_names]
        if INPUT not in self.runtime.input_names or missing:
            raise ModelError(f"Triton model {model_name} is not a segmentation model (inputs "
                             f"{self.runtime.input_names}, outputs {self.runtime.output_names})")
        self.concurrency = int(concurrency)
        self.max_image_pixels = Config().max_image_pixels if max_image_pixels is None else max_image_pixels
        self.class_names = tuple(json.loads(self.runtime.parameters.get("class_names") or "[]"))
        self.times = StageTimes()
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="moduseg-remote")

    def describe(self) -> dict:
        return {"remote": self.runtime.describe(), "concurrency": self.concurrency}

    def segment(self, image) -> ServedResult:
        return self.segment_batch([image])[0]

    def segment_batch(self, images: Sequence, on_error: str = "raise", channel_order: str = "RGB") -> list:
        """As Engine.segment_batch (without proposals): ServedResults, or Skipped records with on_error="skip"."""
        check_modes(on_error, channel_order)
        with self.times("decode"):
            batch = load_batch(list(images), None, 0, on_error, channel_order, self.max_image_pixels)
        return self._serve(batch, on_error)

    def segment_stream(self, items: Iterable, batch_size: int | None = None, prefetch: int = 2,
                       on_error: str = "raise", channel_order: str = "RGB") -> Iterator:
        """As Engine.segment_stream (without proposals): one result per item, in order, bounded memory."""
        check_modes(on_error, channel_order)
        batch_size = int(batch_size or self.concurrency)

        def load(chunk: list, start: int) -> Batch:
            with self.times("decode"):
                return load_batch(chunk, None, start, on_error, channel_order, self.max_image_pixels)

        return run_stages(items, load, [lambda batch: self._serve(batch, on_error)], batch_size, prefetch,
                          "moduseg-remote")

    def _serve(self, batch: Batch, on_error: str) -> list:
        with self.times("server"):
            results = list(self._pool.map(self._one, batch.images, batch.positions, [on_error] * len(batch.images)))
        return in_input_order(batch, results)

    def _one(self, image: np.ndarray, index: int, on_error: str):
        try:
            answer = self.runtime.run({INPUT: image[None]}, [LABELS, SEGMENTS])
        except InputError as error:  # refused before sending (e.g. over the model's max_side)
            if on_error == "raise":
                raise InputError(f"images[{index}]: {error}") from error
            return Skipped(index, describe_item(image), str(error))
        record = answer[SEGMENTS].reshape(-1)[0]
        record = json.loads(record.decode() if isinstance(record, bytes) else record)
        label_map = np.ascontiguousarray(answer[LABELS][0])
        if label_map.shape != image.shape[:2]:
            raise ModelError(f"Triton model {self.runtime.model_name} returned a {label_map.shape} label map for a "
                             f"{image.shape[:2]} image")
        return ServedResult(label_map, record, self.class_names)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.runtime.close()

    def __enter__(self) -> "RemoteEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
