"""The inference engine, the method's second stage: images → class-agnostic proposals → objectness and area filter
→ backbone features → one SMFA query per proposal → one batched top-K bank search → vote → proposals voted
background dropped → class-specific mask NMS → confidence-priority rasterisation.

Every step exists once, over regions made of atoms (engine.regions). On the CPU all of it runs on the host. On a GPU
engine (device="cuda") the features stay on the GPU that ran the backbone, and the embedded proposer
(Config.gpu_proposer), SMFA, the search, the vote and NMS with painting run there as the CUDA launchers of the same
compiled ops, and the refinement after painting runs there on the label maps; the refined maps, owner maps and
per-region classes come down. `kernels="reference"` swaps the compiled ops and the FAISS search for their plain
NumPy twins (engine.reference, an exact scan), which is how bench/throughput.py times the two side by side.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import ops, reference
from .arrays import concatenate, contiguous, host_all, place
from .batches import Batch, Result, check_items, check_modes, in_input_order, kept_result, load_batch
from .bank import FeatureBank
from .boundaries import LabelMapRefiner
from .config import Config, check_bank_config
from .constants import BACKGROUND
from .data.gpu_decode import gpu_decoder_available
from .deps import check_torch_device
from .errors import InputError, ModelError
from .models.base import checked_features
from .regions import Proposals, Records
from .retrieval import atom_rows, atom_shares, retrieve, superpixel_classes, unsure_atoms
from .proposing import BatchProposer
from .search import create_index
from .stream import StageTimes, run_stages

DEVICES = ("cpu", "cuda")
KERNELS = {"compiled": ops, "reference": reference}
#: images with more pixels than this run the kernels on every OpenMP thread (Config.num_threads = 0); smaller ones on
#: one, where a thread team's fork and join cost more than the work
LARGE_IMAGE = 1 << 22


class Engine:
    """Segments images with a feature bank, a backbone and a proposer.

    bank: a FeatureBank or the path of a saved one.
    backbone: defaults to the backbone named in the bank (on device="cuda" through torch when the model has a torch
        module, else onnxruntime's CUDA provider); a bank built with another backbone is refused.
    proposer: used when `segment_batch` is given no proposals; "embedded" (the default) is the embedded training-free
        proposer, created on first use; None means proposals must always be given.
    config: inference knobs; defaults to the bank's config.
    device: "cpu" or "cuda" ("cuda:N"): where the default backbone runs and the bank is searched.
    kernels: "compiled" (engine.ops and FAISS) or "reference" (engine.reference and an exact NumPy scan).

    An Engine may be shared by threads: concurrent segment_batch / segment_stream calls give the results each would
    give alone (the models, kernels and search keep no per-call state; the stage timers and the lazily made proposer
    are locked).
    """

    def __init__(self, bank, backbone=None, proposer="embedded", config: Config | None = None, device: str = "cpu",
                 kernels: str = "compiled") -> None:
        self.bank = bank if isinstance(bank, FeatureBank) else FeatureBank.load(bank)
        self.config = config or self.bank.config
        self.device = _check_device(device)
        if kernels not in KERNELS:
            raise InputError(f"kernels must be one of {sorted(KERNELS)}, got {kernels!r}")
        self.kernels = KERNELS[kernels]
        self.backbone = backbone if backbone is not None else _default_backbone(self.bank, self.config, self.device)
        self.bank.check_backbone(self.backbone)
        check_bank_config(self.config, self.bank.config)
        # the backbone's layers, each normalised on its own in SMFA, unless the bank normalises the whole vector once
        self._layers = self.config.layer_groups(self.backbone.groups)
        self.refiner = LabelMapRefiner(self.config, has_background=bool(self.bank.class_counts()[BACKGROUND]))
        self._proposals = BatchProposer(proposer, self.config, self.device)
        if kernels == "reference" and self.device != "cpu":
            raise InputError("kernels='reference' (the NumPy twins) runs on the CPU only; use device='cpu'")
        backend = "exact" if kernels == "reference" else "torch" if self.device != "cpu" else "faiss"
        self.index = create_index(self.bank, self.config, backend, self.device, self.config.num_threads)
        self.times = StageTimes()
        self._decode_device = self.device if gpu_decoder_available(self.device) else None  # nvJPEG for files
        self._post_stream = None if self.device == "cpu" else _new_stream(self.device)

    @property
    def proposer(self):
        """The engine's proposer (engine.proposing): the object, once a named one is made; None without."""
        return self._proposals.proposer

    @proposer.setter
    def proposer(self, proposer) -> None:
        self._proposals.proposer = proposer

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bank.class_names

    def describe(self) -> dict:
        """Device, kernels, search backend, backbone and proposer (what bench/throughput.py reports)."""
        runtime = getattr(self.backbone, "runtime", None)
        proposer = self._proposals.resolved() if self.proposer is not None else None
        where = self.device if self._proposals.on_device(proposer) else "the host"
        return {"device": self.device, "kernels": self.kernels.__name__, "search": self.index.describe(),
                "proposer": _describe_proposer(proposer, where),
                "decode": "nvjpeg (torchvision) on " + self._decode_device if self._decode_device else "host",
                "backbone": self.backbone.id,
                "runtime": runtime.describe() if hasattr(runtime, "describe") else type(self.backbone).__name__}

    # ------------------------------------------------------------------------------------------------------ public

    def segment(self, image, proposals: Proposals | None = None) -> Result:
        return self.segment_batch([image], None if proposals is None else [proposals])[0]

    def segment_batch(self, images: Sequence, proposals: Sequence[Proposals] | None = None, on_error: str = "raise",
                      channel_order: str = "RGB") -> list:
        """Segment images: HxWx3 uint8 arrays or image files (paths). `proposals` (one Proposals per image) replaces
        the engine's proposer. Work goes in chunks of Config.batch_size, so memory stays bounded for long lists.

        on_error: "raise" raises the first bad image's error, naming its index; "skip" returns a `Skipped` record
            in its place and segments the others. channel_order: "BGR" for arrays from OpenCV (files are decoded
            as RGB, with their EXIF orientation applied).
        """
        check_items(images, "images")
        if proposals is not None and len(proposals) != len(images):
            raise InputError(f"got {len(proposals)} proposal sets for {len(images)} images")
        check_modes(on_error, channel_order)
        size, results = self.config.batch_size, []
        for start in range(0, len(images), size):
            given = None if proposals is None else list(proposals[start:start + size])
            results += self._post(self._model(self._load(list(images[start:start + size]), given, start, on_error,
                                                         channel_order)))
        return results

    def segment_stream(self, items: Iterable, batch_size: int | None = None, prefetch: int = 2,
                       on_error: str = "raise", channel_order: str = "RGB") -> Iterator:
        """Segment a stream of images, yielding one Result per item, in input order, with bounded memory.

        items: each an HxWx3 uint8 array, a path to an image file (decoded in the loader thread), or a pair
            (image or path, Proposals or None); items without proposals go to the engine's proposer.
        batch_size: images per batch (default Config.batch_size); all proposals of a batch are searched at once.
        prefetch: batches each queue holds between the load, model and post-processing threads.
        on_error, channel_order: as segment_batch's; a skipped item yields a `Skipped` record in its place.
        """
        check_items(items, "items")
        batch_size = int(batch_size or self.config.batch_size)
        if batch_size < 1 or prefetch < 1:
            raise InputError(f"batch_size and prefetch must be >= 1, got {batch_size} and {prefetch}")
        check_modes(on_error, channel_order)

        def load(chunk: list, start: int) -> Batch:
            pairs = [item if isinstance(item, tuple) and len(item) == 2 else (item, None) for item in chunk]
            return self._load([image for image, _ in pairs], [given for _, given in pairs], start, on_error,
                              channel_order)

        return run_stages(items, load, [self._model, self._post], batch_size, prefetch, "moduseg")

    # ------------------------------------------------------------------------------------------------------ stages

    def _load(self, images: list, proposals: list | None, start: int, on_error: str, channel_order: str) -> Batch:
        with self.times("decode"):
            return load_batch(images, proposals, start, on_error, channel_order, self.config.max_image_pixels,
                              self._decode_device)

    def _model(self, batch: Batch) -> Batch:
        if not batch.images:
            return batch
        with self.times("backbone"):
            batch.features = checked_features(self.backbone, batch.images, on_device=self.device != "cpu")
        batch.given = [p is not None for p in batch.proposals]
        with self.times("proposer"):
            batch.proposals = self._proposals(batch.images, batch.proposals, batch.features, batch.positions,
                                              self.backbone.stride, self.backbone.groups)
        with self.times("filter"):
            batch.candidates = [p.candidates(self.config.objectness_threshold, self.config.min_area)
                                for p in batch.proposals]
        return batch

    def _post(self, batch: Batch) -> list:
        """The chunk's Results (and Skipped records) in input order. On a GPU the post-processing runs on a stream
        of its own, so that its kernels overlap the next batch's backbone (which runs on the default stream); the
        features it reads are complete (checked_features read their finiteness back) and it synchronises its stream
        before the batch's arrays are released."""
        if not batch.images:
            return in_input_order(batch, [])
        if self.device == "cpu":
            return in_input_order(batch, self._name_and_paint(batch))
        import torch

        with torch.cuda.stream(self._post_stream):
            return in_input_order(batch, self._name_and_paint(batch))

    def _name_and_paint(self, batch: Batch) -> list[Result]:
        """SMFA, search, vote, NMS, painting and the refinement for the whole batch, where the features live (the
        host, or the GPU that ran the backbone: then the regions go up once and only the label maps, owner maps and
        the per-region classes come down)."""
        config = self.config
        where = place(batch.features[0])
        atoms = [contiguous(p.atoms, np.int32, where) for p in batch.proposals]
        members = [contiguous(c["members"], np.bool_, where) for c in batch.candidates]
        threads = self._threads(batch.proposals)
        classes, confidences, *shares = self._search(batch.features, atoms, members, threads, config.superpixel_vote)
        with self.times("nms_raster"):
            ids = concatenate([c["id"] for c in batch.candidates], np.int32, where)
            keep, label_maps, owners = self.kernels.mask_nms_raster_batch(
                atoms, members, classes, confidences, config.nms_iou_threshold, drop_class=BACKGROUND, ids=ids,
                num_threads=threads)
            label_type = np.uint8 if len(self.class_names) <= 256 else np.int32
            label_maps = [contiguous(m, label_type, where) for m in label_maps]  # narrowed before they come down
        offsets = np.cumsum([0] + [len(c) for c in batch.candidates])
        voted = [None] * len(atoms)  # the superpixel vote, over the engine's proposer's nested regions only
        if shares:
            voted = self._superpixel_vote(batch, atoms, [members[i] if not given else None
                                                         for i, given in enumerate(batch.given)],
                                          [shares[0][offsets[i]:offsets[i + 1]] for i in range(len(atoms))], threads)
        with self.times("refine"):  # where the maps are
            images = [contiguous(image, np.uint8, where) for image in batch.images]
            painted = [self.refiner(image, label_map, owner, proposed=not given, atoms=atoms_i, atom_classes=classes_i)
                       for image, given, label_map, owner, atoms_i, classes_i
                       in zip(images, batch.given, label_maps, owners, atoms, voted)]
        with self.times("results"):
            keep, classes, confidences, ids, *maps = host_all([keep, classes, confidences, ids,
                                                               *(m for pair in painted for m in pair)])
            results = []
            for i, proposals in enumerate(batch.proposals):
                rows = slice(offsets[i], offsets[i + 1])
                named = Records(id=ids[rows], **{"class": classes[rows], "confidence": confidences[rows]})
                results.append(kept_result(proposals, named, keep[rows], maps[2 * i], maps[2 * i + 1],
                                           self.class_names))
        return results

    # ------------------------------------------------------------------------------------------------------- steps

    def _search(self, features: list, atoms: list, members: list, threads: int, scores: bool) -> tuple:
        """The regions' SMFA queries, in the bank's search space (engine.bank.centering), searched and voted
        (engine.retrieval.retrieve) for the whole batch at once."""
        config = self.config
        with self.times("smfa"):
            queries = self.kernels.soft_mask_pool_batch(features, atoms, members, self.backbone.stride,
                                                        config.pooling, config.smfa_eps, groups=self._layers,
                                                        num_threads=threads)
            queries = self.bank.center_queries(queries)
        with self.times("search"):
            return retrieve(self.index, queries, config.top_k, config.vote, self.kernels, config.vote_temperature,
                            scores=scores)

    def _superpixel_vote(self, batch: Batch, atoms: list, members: list, shares: list, threads: int) -> list:
        """Each image's atom classes by the superpixel vote (engine.retrieval), None where its proposals were given
        (members None): the candidates' shares summed per atom, plus each unsure atom's own query's shares
        (Config.unsure_margin; atoms of Config.min_area pixels or more; one more search for the batch's)."""
        with self.times("refine"):
            summed = {i: atom_shares(m, s) for i, (m, s) in enumerate(zip(members, shares)) if m is not None}
        if summed and self.config.unsure_margin > 0:
            with self.times("refine"):
                areas = {i: contiguous(batch.proposals[i].atom_areas(), np.int64, place(s))
                         for i, s in summed.items()}
                asked = {i: unsure_atoms(s, self.config.unsure_margin, areas[i], self.config.min_area)
                         for i, s in summed.items()}
                rows = [atom_rows(a) for a in asked.values()]
            _, _, own = self._search([batch.features[i] for i in asked], [atoms[i] for i in asked], rows, threads,
                                     scores=True)
            with self.times("refine"):
                start = 0
                for i, r in zip(asked, rows):
                    summed[i][asked[i]] += own[start:start + len(r)]
                    start += len(r)
        with self.times("refine"):
            return [superpixel_classes(summed[i]) if i in summed else None for i in range(len(atoms))]

    def _threads(self, proposals: list[Proposals]) -> int:
        """OpenMP threads for the CPU kernels on a batch: Config.num_threads when set, else all for large images and
        one below LARGE_IMAGE pixels (the engine's stages already keep the cores busy)."""
        if self.config.num_threads:
            return self.config.num_threads
        return 0 if sum(p.atoms.size for p in proposals) > LARGE_IMAGE else 1


def _check_device(device: str) -> str:
    """"cpu", or a CUDA device string after checking torch sees a GPU; a clear error otherwise."""
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
    check_torch_device(device)  # a GPU this torch build has no kernels for: a clear error, not "no kernel image"
    return device


def _describe_proposer(proposer, where: str) -> str:
    """The engine's proposer in a few words: its name, and for the embedded one its superpixels and merging and
    `where` they run."""
    if proposer is None:
        return "none (proposals are given)"
    name = getattr(proposer, "name", type(proposer).__name__)
    if not hasattr(proposer, "superpixels"):
        return name
    return f"{name} ({proposer.superpixels} + {proposer.merging}, on {where})"


def _new_stream(device: str):
    import torch

    return torch.cuda.Stream(device=device)


def _default_backbone(bank: FeatureBank, config: Config, device: str):
    """The bank's backbone: on a GPU through torch if the model has a torch module, else onnxruntime's CUDA provider,
    else (with a warning) onnxruntime on the CPU."""
    from .models import create_backbone

    name = bank.backbone_name
    common = dict(batch_size=config.batch_size, num_threads=config.num_threads, weights=bank.backbone.get("weights"))
    if device == "cpu":
        return create_backbone(name, **common)
    for runtime in ("torch", "onnxruntime"):
        try:
            return create_backbone(name, runtime=runtime, device=device, **common)
        except (InputError, ModelError) as error:
            reason = error
    warnings.warn(f"backbone {name} runs on the CPU: {reason}", stacklevel=3)
    return create_backbone(name, **common)


#: engines built by segment_batch from bank directories, most recently used last
_ENGINES: OrderedDict = OrderedDict()
_ENGINES_LOCK = threading.Lock()
#: how many such engines are kept (each holds its models)
CACHED_ENGINES = 4


def segment_batch(images: Sequence, bank, proposals: Sequence[Proposals] | None = None, proposer="embedded",
                  config: Config | None = None, **options) -> list:
    """One-call segmentation. `bank` is a FeatureBank or a bank directory; engines built from a directory are kept
    (the last CACHED_ENGINES, per directory, proposer and config) so repeated calls do not reload models, and a bank
    replaced on disk is reloaded (the key holds its manifest's modification time and size). `options`:
    Engine.segment_batch's (on_error, channel_order)."""
    check_items(images, "images")  # before an engine is made for nothing
    if isinstance(bank, FeatureBank):
        return Engine(bank, proposer=proposer, config=config).segment_batch(images, proposals, **options)
    path = Path(bank).resolve()
    try:
        stamp = (path / "manifest.json").stat()
        version = (stamp.st_mtime_ns, stamp.st_size, stamp.st_ino)
    except OSError:
        version = None  # FeatureBank.load says what is wrong
    key = (str(path), version, proposer if isinstance(proposer, str) or proposer is None else id(proposer),
           repr(config))
    with _ENGINES_LOCK:
        entry = _ENGINES.pop(key, None)
        if entry is None or not (entry[0] is proposer or entry[0] == proposer):
            entry = (proposer, Engine(path, proposer=proposer, config=config))
        _ENGINES[key] = entry  # the proposer object is kept with its engine: its id cannot be reused meanwhile
        while len(_ENGINES) > CACHED_ENGINES:
            _ENGINES.popitem(last=False)
    return entry[1].segment_batch(images, proposals, **options)
