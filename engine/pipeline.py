"""The inference engine: images → proposals → backbone features → SMFA queries → one batched bank search → vote →
class-specific mask NMS → confidence-priority rasterisation.

Three stages, each a method over a whole batch: `_load` (decode, checks), `_model` (proposer, filters, backbone) and
`_post` (SMFA, search, vote, NMS + raster). `segment_batch` runs them in turn; `segment_stream` runs them in three
threads joined by bounded queues, so decoding, model inference and post-processing of neighbouring batches overlap
(the models, the compiled ops and FAISS release the GIL) while memory stays bounded.

With device="cuda" the backbone runs through torch on the GPU, and features, proposal masks, SMFA, the bank search
(the bank resident on the GPU), the vote and NMS + raster stay on the device; only the final per-image results come
back to the host.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from . import ops
from .bank import FeatureBank, pool_regions
from .config import Config
from .errors import InputError, ModelError
from .models.base import Proposals
from .retrieval import DeviceIndex, vote
from .utils import bucket_by_size, check_image, check_masks, padded_size

DEVICES = ("cpu", "cuda")
#: Below this much work (mask pixels for the kernels, multiply-adds for the search) a CPU kernel runs on one thread
#: when Config.num_threads is 0: OpenMP's fork/join costs more than it saves on small inputs, and on a busy machine
#: (or next to the model's own threads in segment_stream) a waiting OpenMP team can cost 100x the work itself.
SMALL_KERNEL_WORK = 1 << 24
SMALL_SEARCH_WORK = 1 << 27


@dataclass
class Result:
    """Segmentation of one image.

    label_map: (H, W) uint8 class ids; 0 = background (every pixel no kept proposal painted).
    classes, confidences, proposal_ids: one entry per proposal that survived the filters, the vote (not
        background) and NMS, in painting order (most confident first): its class id, its confidence (mean
        similarity of the winning class's neighbours) and its index in the image's input proposals.
    owner: (H, W) int32, the input-proposal index that painted each pixel, -1 where none did.
    num_proposals: proposals given for the image; num_candidates: those passing objectness and area filters.
    note: empty, or why the image is all background (e.g. no proposals).
    """

    label_map: np.ndarray
    classes: np.ndarray
    confidences: np.ndarray
    proposal_ids: np.ndarray
    owner: np.ndarray
    num_proposals: int
    num_candidates: int
    class_names: tuple[str, ...] = field(repr=False, default=())
    note: str = ""

    def class_summary(self) -> dict[str, float]:
        """Pixel fraction of each predicted class name."""
        counts = np.bincount(self.label_map.ravel(), minlength=len(self.class_names))
        total = max(self.label_map.size, 1)
        return {name: counts[i] / total for i, name in enumerate(self.class_names) if counts[i]}


class StageTimes:
    """Seconds spent per pipeline stage, accumulated over calls (bench/throughput.py reads it)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()  # segment_stream's threads time their stages concurrently

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()


@dataclass
class _Batch:
    """A batch between stages: checked images, their proposals and candidate indices, then backbone features.
    On the GPU path `masks` holds each image's candidate masks and `features` the maps as device tensors."""

    images: list
    proposals: list = field(default_factory=list)
    candidates: list = field(default_factory=list)
    features: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    finite: Any = None  # GPU path: a device flag, checked when the results come back


class _Failure:
    """An exception travelling down segment_stream's queues to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class Engine:
    """Segments images with a feature bank, a backbone and a proposer.

    bank: a FeatureBank or the path of a saved one.
    backbone: defaults to the backbone named in the bank (created through engine.models.create_backbone; on
        device="cuda" with the torch runtime when the model has a torch module, else onnxruntime's CUDA provider);
        a bank built with another backbone is refused.
    proposer: class-agnostic proposer used when `segment_batch` is given no proposals; "embedded" (the default)
        is the embedded training-free proposer, created on first use; None means proposals must always be given.
    config: inference knobs; defaults to the bank's config.
    device: "cpu" (default) or "cuda" (or "cuda:N"): where features, SMFA, search, vote and NMS + raster run. "cuda"
        needs torch with a visible GPU and engine._C built with its CUDA kernels; otherwise the engine refuses it.
    """

    def __init__(self, bank, backbone=None, proposer="embedded", config: Config | None = None, device: str = "cpu"):
        if not isinstance(bank, FeatureBank):
            bank = FeatureBank.load(bank)
        self.bank = bank
        self.config = config or bank.config
        self.device = _check_device(device)
        if backbone is None:
            backbone = _default_backbone(bank, self.config, self.device)
        bank.check_backbone(backbone)
        self.backbone = backbone
        self.proposer = proposer
        self.times = StageTimes()
        self._device_index = None
        self._device_index_lock = threading.Lock()

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bank.class_names

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"

    def describe(self) -> dict:
        """Device, search backend and backbone runtime (what bench/throughput.py reports)."""
        runtime = getattr(self.backbone, "runtime", None)
        search = (self.device_index.backend if self.on_gpu else f"faiss-cpu {self.config.index}")
        return {"device": self.device, "search": search,
                "backbone": self.backbone.id,
                "runtime": runtime.describe() if hasattr(runtime, "describe") else type(self.backbone).__name__}

    # ------------------------------------------------------------------------------------------------------ public

    def segment(self, image: np.ndarray, proposals: Proposals | None = None) -> Result:
        return self.segment_batch([image], None if proposals is None else [proposals])[0]

    def segment_batch(self, images: Sequence[np.ndarray], proposals: Sequence[Proposals] | None = None) -> list[Result]:
        """Segment HxWx3 uint8 RGB images; `proposals` (one Proposals per image) replaces the engine's proposer."""
        if proposals is not None and len(proposals) != len(images):
            raise InputError(f"got {len(proposals)} proposal sets for {len(images)} images")
        batch = self._load(images, None if proposals is None else list(proposals))
        if not batch.images:
            return []
        return self._post(self._model(batch))

    def segment_stream(self, items: Iterable, batch_size: int | None = None, prefetch: int = 2) -> Iterator[Result]:
        """Segment a stream of images, yielding one Result per item, in input order, with bounded memory.

        items: each an HxWx3 uint8 RGB array, a path to an image file (decoded in the loader thread), or a pair
            (image or path, Proposals or None); items without proposals go to the engine's proposer.
        batch_size: images per batch (default Config.batch_size); all proposals of a batch are searched at once.
        prefetch: batches each queue holds between stages. Three threads — load, model, post-process — run
            concurrently, so at most about 3 * (prefetch + 1) batches are alive at once whatever the stream's length.
        Closing the generator early (break) stops the threads; an error in any stage is raised here.
        """
        batch_size = int(batch_size or self.config.batch_size)
        if batch_size < 1 or prefetch < 1:
            raise InputError(f"batch_size and prefetch must be >= 1, got {batch_size} and {prefetch}")
        stop = threading.Event()
        loaded: queue.Queue = queue.Queue(prefetch)
        modelled: queue.Queue = queue.Queue(prefetch)
        finished: queue.Queue = queue.Queue(prefetch)

        def put(q: queue.Queue, item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def get(q: queue.Queue):
            while not stop.is_set():
                try:
                    return q.get(timeout=0.05)
                except queue.Empty:
                    continue
            return _DONE

        def loader():
            try:
                chunk: list = []
                for item in items:
                    if stop.is_set():
                        return
                    chunk.append(item)
                    if len(chunk) == batch_size:
                        if not put(loaded, self._load_items(chunk)):
                            return
                        chunk = []
                if chunk:
                    put(loaded, self._load_items(chunk))
            except BaseException as error:  # noqa: BLE001 - handed to the consumer
                put(loaded, _Failure(error))
            put(loaded, _DONE)

        def stage(source: queue.Queue, sink: queue.Queue, work):
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

        threads = [threading.Thread(target=loader, name="moduseg-load", daemon=True),
                   threading.Thread(target=stage, args=(loaded, modelled, self._model), name="moduseg-model",
                                    daemon=True),
                   threading.Thread(target=stage, args=(modelled, finished, self._post), name="moduseg-post",
                                    daemon=True)]
        for thread in threads:
            thread.start()
        try:
            while True:
                results = get(finished)
                if results is _DONE:
                    return
                if isinstance(results, _Failure):
                    raise results.error
                yield from results
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    # ------------------------------------------------------------------------------------------------------ stages

    def _load_items(self, items: list) -> _Batch:
        """segment_stream's items -> a checked batch (paths decoded here)."""
        from .data import load_image

        images, proposals = [], []
        for item in items:
            if isinstance(item, tuple):
                if len(item) != 2:
                    raise InputError(f"stream item: expected an image, a path or (image, proposals), got a "
                                     f"{len(item)}-tuple")
                image, given = item
            else:
                image, given = item, None
            with self.times("decode"):
                images.append(load_image(image) if isinstance(image, (str, os.PathLike)) else image)
            proposals.append(given)
        return self._load(images, proposals)

    def _load(self, images, proposals: list | None) -> _Batch:
        with self.times("decode"):
            checked = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        batch = _Batch(checked)
        batch.proposals = [None] * len(checked) if proposals is None else proposals
        return batch

    def _model(self, batch: _Batch) -> _Batch:
        """Proposer (for images without proposals), filters, backbone; on the GPU path, features and candidate masks
        move to the device here."""
        with self.times("proposer"):
            batch.proposals = self._proposals(batch.images, batch.proposals)
        with self.times("filter"):
            batch.candidates = [self._candidates(p) for p in batch.proposals]
        with self.times("backbone"):
            if self.on_gpu:
                batch.features, batch.finite = self._device_features(batch.images)
            else:
                batch.features = self._check_features(self.backbone.features(batch.images), batch.images)
        if self.on_gpu:
            import torch

            with self.times("upload"):
                batch.masks = [torch.from_numpy(p.masks[c]).to(self.device, non_blocking=True)
                               for p, c in zip(batch.proposals, batch.candidates)]
        return batch

    def _check_features(self, features, images) -> list[np.ndarray]:
        """Any backbone's output, checked before it reaches the index: one finite (ceil(H/s), ceil(W/s), dim) map
        per image."""
        stride, dim = self.backbone.stride, self.backbone.dim
        if len(features) != len(images):
            raise ModelError(f"backbone {self.backbone.id} returned {len(features)} feature maps for {len(images)} images")
        for i, (f, image) in enumerate(zip(features, images)):
            expected = (-(-image.shape[0] // stride), -(-image.shape[1] // stride), dim)
            if tuple(f.shape) != expected:
                raise ModelError(f"backbone {self.backbone.id}: feature map of shape {tuple(f.shape)} for a "
                                 f"{image.shape[0]}x{image.shape[1]} image, expected {expected}")
            if not np.isfinite(f).all():
                raise ModelError(f"backbone {self.backbone.id}: NaN or inf features for image {i} of the batch")
        return features

    def _post(self, batch: _Batch) -> list[Result]:
        if self.on_gpu:
            return self._post_device(batch)
        config, times = self.config, self.times
        with times("smfa"):
            queries = [self._pool(f, p.masks[c]) for f, p, c in zip(batch.features, batch.proposals, batch.candidates)]
        with times("search"):
            similarities, rows = self._search(np.concatenate(queries))
        with times("vote"):
            classes, confidences = vote(similarities, self.bank.neighbour_labels(rows), len(self.class_names),
                                        config.vote, self.bank.class_counts())
        results = []
        with times("nms_raster"):
            offsets = np.cumsum([0] + [len(c) for c in batch.candidates])
            for i, image in enumerate(batch.images):
                part = slice(offsets[i], offsets[i + 1])
                results.append(self._assemble(image, batch.proposals[i], batch.candidates[i], classes[part],
                                              confidences[part]))
        return results

    # The CPU path's kernels, one method each so that bench/throughput.py can swap in engine.reference's twins.

    def _pool(self, features: np.ndarray, masks: np.ndarray) -> np.ndarray:
        return pool_regions(features, masks, self.backbone.stride, self.config,
                            num_threads=self._threads(masks.size, SMALL_KERNEL_WORK))

    def _search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        threads = self._threads(queries.size * len(self.bank), SMALL_SEARCH_WORK)
        if not threads:
            return self.bank.search(queries, self.config.top_k)
        import faiss

        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)  # OpenMP's thread count is per calling thread: others are unaffected
        try:
            return self.bank.search(queries, self.config.top_k)
        finally:
            faiss.omp_set_num_threads(before)

    def _nms_raster(self, masks, classes, confidences):
        return ops.mask_nms_raster(masks, classes, confidences, self.config.nms_iou_threshold,
                                   num_threads=self._threads(masks.size, SMALL_KERNEL_WORK))

    def _threads(self, work: int, small: int) -> int:
        """Threads for a CPU kernel: Config.num_threads when set, else 1 for small work, else the library's choice."""
        if self.config.num_threads:
            return self.config.num_threads
        return 1 if work < small else 0

    # ------------------------------------------------------------------------------------------------- CPU helpers

    def _proposals(self, images, proposals: list) -> list[Proposals]:
        """One Proposals per image (the batch's list holds None where the engine's proposer must make them)."""
        missing = [i for i, p in enumerate(proposals) if p is None]
        if missing:
            if self.proposer is None:
                raise InputError("no proposals given and this engine has no proposer: pass proposals=[...] or "
                                 "construct the Engine with a proposer")
            if isinstance(self.proposer, str):
                if self.proposer != "embedded":
                    raise InputError(f"unknown proposer {self.proposer!r}; pass 'embedded', a Proposer or None")
                from .models.embedded import create_proposer

                self.proposer = create_proposer(self.config)
            made = self.proposer.propose([images[i] for i in missing])
            if len(made) != len(missing):
                raise InputError(f"proposer {getattr(self.proposer, 'name', '?')} returned {len(made)} proposal "
                                 f"sets for {len(missing)} images")
            proposals = list(proposals)
            for i, p in zip(missing, made):
                proposals[i] = p
        checked = []
        for i, (image, p) in enumerate(zip(images, proposals)):
            masks = check_masks(p.masks, *image.shape[:2], name=f"proposals[{i}].masks")
            checked.append(p if masks is p.masks else Proposals(masks, p.objectness))
        return checked

    def _candidates(self, proposals: Proposals) -> np.ndarray:
        """Indices of proposals with objectness >= tau_obj and area >= min_area."""
        masks = proposals.masks
        # summing the bool masks' bytes is ~2x faster than count_nonzero along an axis
        area = masks.reshape(masks.shape[0], masks.shape[1] * masks.shape[2]).view(np.uint8).sum(axis=1, dtype=np.int64)
        keep = (proposals.objectness >= self.config.objectness_threshold) & (area >= self.config.min_area)
        return np.flatnonzero(keep)

    def _assemble(self, image, proposals, candidates, classes, confidences) -> Result:
        foreground = classes != 0
        ids = candidates[foreground]
        keep, label_map, owner = self._nms_raster(proposals.masks[ids], classes[foreground], confidences[foreground])
        order = np.argsort(-confidences[foreground][keep].astype(np.float64), kind="stable")
        owner = np.where(owner >= 0, ids[np.clip(owner, 0, None)] if len(ids) else -1, -1).astype(np.int32)
        return self._result(label_map, classes[foreground][keep][order], confidences[foreground][keep][order],
                            ids[keep][order], owner, len(proposals), len(candidates), bool(keep.any()))

    def _result(self, label_map, classes, confidences, proposal_ids, owner, num_proposals, num_candidates,
                painted) -> Result:
        note = ""
        if num_proposals == 0:
            note = "no proposals: all background"
        elif num_candidates == 0:
            note = "no proposal passed the objectness and area filters: all background"
        elif not painted:
            note = "every proposal was voted background: all background"
        return Result(
            label_map=np.asarray(label_map).astype(np.uint8),
            classes=np.asarray(classes).astype(np.int32),
            confidences=np.asarray(confidences).astype(np.float32),
            proposal_ids=np.asarray(proposal_ids).astype(np.int64),
            owner=np.asarray(owner, dtype=np.int32),
            num_proposals=num_proposals,
            num_candidates=num_candidates,
            class_names=self.class_names,
            note=note,
        )

    # ------------------------------------------------------------------------------------------------- GPU path

    @property
    def device_index(self) -> DeviceIndex:
        """The bank resident on the engine's device (built on first use)."""
        with self._device_index_lock:
            if self._device_index is None:
                self._device_index = DeviceIndex(self.bank, self.device)
            return self._device_index

    def _device_features(self, images):
        """Feature maps as (h, w, D) float32 tensors on the device, and a device flag: all finite.

        A ModelBackbone on the torch runtime on this device runs without leaving the GPU: uint8 images go up, padding
        and normalisation happen there, and the module's output stays there. Any other backbone runs as it is and
        its maps are copied up.
        """
        import torch

        runtime = getattr(self.backbone, "runtime", None)
        spec = getattr(self.backbone, "spec", None)
        module = getattr(runtime, "module", None)
        on_device = (module is not None and spec is not None and getattr(spec, "layout", None) == "nchw"
                     and torch.device(getattr(runtime, "device", "cpu")).type == "cuda")
        if not on_device:
            maps = [torch.from_numpy(f).to(self.device, non_blocking=True) for f in self.backbone.features(images)]
            return maps, torch.ones((), dtype=torch.bool, device=self.device)
        stride = self.backbone.stride
        device = next(module.parameters()).device
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        sizes = [padded_size(*image.shape[:2], stride) for image in images]
        maps: list = [None] * len(images)
        finite = torch.ones((), dtype=torch.bool, device=device)
        for group in bucket_by_size(sizes, getattr(self.backbone, "batch_size", len(images)) or 1):
            height, width = sizes[group[0]]
            pixels = torch.zeros((len(group), 3, height, width), dtype=torch.float32, device=device)
            for j, index in enumerate(group):
                image = torch.from_numpy(images[index]).to(device, non_blocking=True)
                pixels[j, :, :image.shape[0], :image.shape[1]] = image.permute(2, 0, 1).float() / 255.0
            pixels = (pixels - mean) / std  # padded pixels are black (0) before normalisation, as on the CPU
            with torch.inference_mode():
                out = module(pixels)
            if isinstance(out, (tuple, list)):
                out = out[0]
            expected = (len(group), self.backbone.dim, height // stride, width // stride)
            if tuple(out.shape) != expected:
                raise ModelError(f"backbone {self.backbone.id}: the torch module returned {tuple(out.shape)} for a "
                                 f"{height}x{width} batch, expected {expected}")
            out = out.float().permute(0, 2, 3, 1)
            finite &= torch.isfinite(out).all()
            for j, index in enumerate(group):
                maps[index] = out[j].contiguous()
        return maps, finite

    def _post_device(self, batch: _Batch) -> list[Result]:
        import torch

        config, times = self.config, self.times
        with times("smfa"):
            queries = [pool_regions(f, m, self.backbone.stride, config) if len(m) else
                       torch.zeros((0, self.bank.dim), dtype=torch.float32, device=self.device)
                       for f, m in zip(batch.features, batch.masks)]
        index = self.device_index
        with times("search"):
            similarities, rows = index.search(torch.cat(queries), config.top_k)
        with times("vote"):
            from .retrieval import vote_torch

            classes, confidences = vote_torch(similarities, index.neighbour_labels(rows), index.num_classes,
                                              config.vote, index.class_counts)
        results = []
        with times("nms_raster"):
            offset = 0
            for image, proposals, candidates, masks in zip(batch.images, batch.proposals, batch.candidates,
                                                            batch.masks):
                n = len(candidates)
                results.append(self._assemble_device(image, proposals, candidates, masks, classes[offset:offset + n],
                                                     confidences[offset:offset + n]))
                offset += n
        if batch.finite is not None and not bool(batch.finite):
            raise ModelError(f"backbone {self.backbone.id}: non-finite features in a batch of {len(batch.images)} "
                             "images")
        return results

    def _assemble_device(self, image, proposals, candidates, masks, classes, confidences) -> Result:
        import torch

        height, width = image.shape[:2]
        foreground = classes != 0
        ids = torch.from_numpy(candidates).to(self.device)[foreground]
        if len(masks):
            keep, label_map, owner = ops.mask_nms_raster(masks[foreground], classes[foreground],
                                                         confidences[foreground], self.config.nms_iou_threshold)
        else:
            keep = torch.zeros(0, dtype=torch.bool, device=self.device)
            label_map = torch.zeros((height, width), dtype=torch.int32, device=self.device)
            owner = torch.full((height, width), -1, dtype=torch.int32, device=self.device)
        kept_conf = confidences[foreground][keep]
        order = torch.sort(-kept_conf.to(torch.float64), stable=True).indices
        if len(ids):
            owner = torch.where(owner >= 0, ids[owner.clamp(min=0).long()], -1)
        # The only device -> host copies: the final per-image results.
        return self._result(label_map.to(torch.uint8).cpu().numpy(), classes[foreground][keep][order].cpu().numpy(),
                            kept_conf[order].cpu().numpy(), ids[keep][order].cpu().numpy(),
                            owner.to(torch.int32).cpu().numpy(), len(proposals), len(candidates),
                            bool(keep.any()))


def _check_device(device: str) -> str:
    """"cpu", or a CUDA device string after checking the GPU path can run; a clear error otherwise."""
    device = str(device)
    if device == "cpu":
        return device
    if device.split(":")[0] != "cuda":
        raise InputError(f"device must be one of {DEVICES} (or 'cuda:N'), got {device!r}")
    try:
        import torch
    except ImportError:
        raise ModelError("device='cuda' needs torch with CUDA support; torch is not installed") from None
    if not torch.cuda.is_available():
        raise ModelError(f"device={device!r} requested but torch {torch.__version__} sees no CUDA GPU "
                         f"(CUDA build: {torch.version.cuda}); use device='cpu'")
    if not ops.has_cuda():
        raise ModelError(f"device={device!r} requested but engine._C was built without its CUDA kernels; rebuild "
                         "where nvcc is found (pip install --no-build-isolation -e .) or use device='cpu'")
    if not ops.cuda_available():
        raise ModelError(f"device={device!r} requested but engine._C finds no CUDA device")
    return device


def _default_backbone(bank: FeatureBank, config: Config, device: str):
    """The bank's backbone: on a GPU through torch if the model has a torch module, else onnxruntime's CUDA provider,
    else (with a warning) onnxruntime on the CPU with everything after the backbone still on the GPU."""
    from .models import create_backbone

    # a bank records the backbone's id ("model+padding") and its model name; create_backbone takes the model name
    name = bank.backbone.get("model") or str(bank.backbone["id"]).split("+")[0]
    common = dict(batch_size=config.batch_size, num_threads=config.num_threads)
    if device == "cpu":
        return create_backbone(name, **common)
    kind = device.split(":")[0]
    try:
        return create_backbone(name, runtime="torch", device=kind, **common)
    except InputError:  # an ONNX-only model
        pass
    try:
        return create_backbone(name, device=kind, **common)
    except ModelError as error:
        warnings.warn(f"backbone {name} runs on the CPU: {error}", stacklevel=3)
        return create_backbone(name, **common)


_ENGINES: dict = {}


def segment_batch(images: Sequence[np.ndarray], bank, proposals: Sequence[Proposals] | None = None,
                  proposer="embedded", config: Config | None = None) -> list[Result]:
    """One-call segmentation. `bank` is a FeatureBank or a bank directory; engines built from a directory are kept
    (per path, proposer and config) so repeated calls do not reload models."""
    if isinstance(bank, FeatureBank):
        engine = Engine(bank, proposer=proposer, config=config)
    else:
        key = (str(bank), id(proposer), repr(config))
        if key not in _ENGINES:
            _ENGINES[key] = Engine(bank, proposer=proposer, config=config)
        engine = _ENGINES[key]
    return engine.segment_batch(images, proposals)
