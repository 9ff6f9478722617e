"""Scale-out on Ray: feature-bank builds and batch segmentation over a Ray cluster (a local one by default).

The library's own algorithms, distributed: each is written once over an injected map, which here runs its
per-image or per-part steps in Ray actors and tasks.

Bank builds (`build_parts_ray`, `reject_outliers_ray`): a split's image ids are a Ray Dataset; actors holding the
backbone and the proposer featurise batches of them (`engine.bank.featurise_batch`) and return one BankPart per image,
which the driver regroups in image order into the parts a single-process build makes. Outlier rejection is
`engine.bank.reject_outliers_parts` with its per-part steps (per-class sums, distances to the class means) as
tasks. With
pseudo-masks, actors prepare each image (saliency, superpixels, features), `EmbeddedPseudoMasker.solve` runs on the
driver with each pass's per-image step as tasks over the prepared images (the same sums reduced in the same order as
one process), and the featurising actors paint each image's mask from its superpixel labels.

Batch segmentation (`segment_ray`): `engine.segment_runs.segment_to_folder` (resume, failures, summary) with the
images to do as a Ray Dataset; actors each hold an Engine (the bank loaded once per actor) and segment and write their
batches with `engine.segment_runs.segment_items`, as `moduseg segment` does; an image that cannot be read or segmented
comes back as a failure, never an error.

Assumptions: every node sees the data set, the bank and the output folder at the same paths (a shared file system).
A dead actor is restarted (MAX_RESTARTS) and its batch retried (MAX_TASK_RETRIES); past that the run stops with a
ModelError, and a bank build writes nothing (the bank and its parts are written by the driver, atomically, at the end).
"""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path
from typing import Sequence

import numpy as np

from .bank import BankPart, featurise_batch, reject_outliers_parts
from .config import Config
from .errors import InputError, ModelError, ModuSegError

#: restarts of a dead actor, and retries of the batch it held, before the run fails
MAX_RESTARTS = 2
MAX_TASK_RETRIES = 2
#: test hook, read on the driver: "N" makes every actor's process exit on its Nth batch; "N:FILE" only the first to
#: get there (it creates FILE), so the run must recover through a restart
FAULT_ENV = "MODUSEG_RAY_FAULT"
#: Ray's worker_process_setup_hook for the sessions `connect` starts: see worker_setup
WORKER_SETUP_HOOK = "engine.distributed.worker_setup"


# ------------------------------------------------------------------------------------------------ the cluster


def ray_module():
    """The ray package (with ray.data), or a ModelError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise ModelError("--ray needs Ray: pip install 'moduseg-engine[ray]' (ray[data]==2.60.0)") from error
    return ray


def connect(address: str | None = None, progress: bool = True):
    """Join the Ray cluster at `address` (ray.init(address=...)), or start a local one when None (RAY_ADDRESS, if
    set, is used by Ray). A session already initialised in this process is used as it is. An address where nothing
    answers is an InputError at once, not a long wait."""
    ray = ray_module()
    if not ray.is_initialized():
        if address and address != "auto" and "://" not in address:
            _check_reachable(address)
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     logging_level="warning", runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise InputError(f"cannot join the Ray cluster at {address!r}: {error}") from error
    ray.data.DataContext.get_current().enable_progress_bars = progress
    return ray


def worker_setup() -> None:
    """Run by each Ray worker of a session `connect` starts, before the worker's first task; Ray imports this module
    by name to call it, and that import is the point: the worker imports the engine from its own sys.path (the
    installed package) before Ray puts the driver's working folder first on that sys.path, which it does at the
    worker's first task. A checkout's engine/ in that folder (a driver started from the checkout root), without its
    compiled module, would otherwise shadow the installed engine in every actor; once imported, `engine` stays the
    installed package whatever sys.path holds. Nothing else to do here."""


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"Ray address {address!r}: expected HOST:PORT (the head node's GCS port, 6379 by default), "
                         "ray://HOST:PORT, or none for a local cluster")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise InputError(f"Ray address {address}: nothing answers at {host}:{port} ({error}); start a cluster there "
                         "(ray start --head) or give no address for a local one") from error


def _pool(ray, actors: int | None, config: Config):
    """(actors, per-actor resources, runtime threads per actor, device): one actor per GPU when the cluster has
    GPUs (num_gpus=1 each), else one per CPU (num_cpus=1 each, one runtime thread unless Config.num_threads)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if actors is not None and actors < 1:
        raise InputError(f"--actors must be >= 1, got {actors}")
    if gpus:
        return actors or gpus, {"num_gpus": 1}, config.num_threads, "cuda"
    return actors or max(1, int(resources.get("CPU", 1))), {"num_cpus": 1}, config.num_threads or 1, "cpu"


def _map(ray, dataset, actor_class, actors: int, resources: dict, batch_size: int, **constructor):
    """dataset.map_batches over a fixed pool of `actors` actors of `actor_class`, restarted on failure a bounded
    number of times (Ray Data's default is forever, which would hide an actor that dies on every batch)."""
    import warnings

    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts / max_task_retries only as ray_remote_args, deprecated for 2.64 without a
        # named replacement yet: revisit on upgrading (the pin is ray[data]==2.60.0)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return dataset.map_batches(actor_class, fn_constructor_kwargs=constructor, batch_size=batch_size,
                                   batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                                   max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES, **resources)


def _failed(what: str, error: Exception) -> ModelError:
    return ModelError(f"Ray {what} failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                      f" (actors are restarted {MAX_RESTARTS} times and a batch retried {MAX_TASK_RETRIES} times "
                      "before a run gives up)")


class _Fault:
    """The FAULT_ENV test hook inside an actor."""

    def __init__(self, spec: str | None):
        count, _, marker = (spec or "").partition(":")
        self.at, self.marker, self.calls = int(count or 0), marker or None, 0

    def tick(self) -> None:
        self.calls += 1
        if self.at and self.calls == self.at:
            if self.marker is not None:
                try:
                    os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))  # only one actor wins
                except FileExistsError:
                    return
            os._exit(1)


def _rows(dataset, key: str) -> list[dict]:
    """All rows of a Ray Dataset, sorted by `key`."""
    return sorted(dataset.take_all(), key=lambda row: int(row[key]))


# ------------------------------------------------------------------------------------------------ bank builds


class _Featuriser:
    """Actor: the backbone and proposer, loaded once; a batch of image indices -> one pickled BankPart per image."""

    def __init__(self, data, split, masks, backbone, config, threads, device, fault):
        from .data import VOCDataset
        from .models import create_backbone
        from .models.embedded import resolve_proposer

        self.config = config
        self.dataset = VOCDataset(data, split)
        self.backbone = create_backbone(backbone, batch_size=config.batch_size, num_threads=threads, device=device)
        self.proposer = resolve_proposer("embedded", config.replace(num_threads=threads)) if config.region_entries \
            else None
        self.painter = None
        if masks == "pseudo":
            from .models.pseudo_masks import EmbeddedPseudoMasker

            self.painter = EmbeddedPseudoMasker(self.backbone, num_threads=threads)
        self.fault = _Fault(fault)

    def __call__(self, batch: dict) -> dict:
        from .data import Sample

        self.fault.tick()
        order = np.argsort(batch["index"], kind="stable")
        samples = []
        for k in order:
            image_id = self.dataset.ids[int(batch["index"][k])]
            if self.painter is None:
                sample = self.dataset[int(batch["index"][k])]
            else:  # the same Sample as pseudo_mask_samples yields
                image = self.dataset.image(image_id)
                leaf = pickle.loads(batch["leaf"][k])
                sample = Sample(image_id, image, sorted({int(c) for c in self.dataset.labels(image_id)}),
                                self.painter.paint(image, leaf))
            samples.append(sample)
        part = featurise_batch(samples, self.backbone, self.proposer, self.dataset.class_names, self.config)
        return {"index": batch["index"][order],
                "part": np.array([pickle.dumps(p) for p in part.per_image()], dtype=object)}


class _Preparer:
    """Actor: the pseudo-masker's models (backbone and saliency), loaded once; image index -> pickled ImageRegions."""

    def __init__(self, data, split, backbone, threads, device, fault):
        from .data import VOCDataset
        from .models import create_backbone
        from .models.pseudo_masks import EmbeddedPseudoMasker

        self.dataset = VOCDataset(data, split)
        self.masker = EmbeddedPseudoMasker(create_backbone(backbone, num_threads=threads, device=device),
                                           num_threads=threads)
        self.fault = _Fault(fault)

    def __call__(self, batch: dict) -> dict:
        self.fault.tick()
        prepared = []
        for index in batch["index"]:
            image_id = self.dataset.ids[int(index)]
            regions = self.masker.prepare(self.dataset.image(image_id), self.dataset.labels(image_id),
                                          keep_labels=False)
            prepared.append(pickle.dumps(regions))
        return {"index": batch["index"], "regions": np.array(prepared, dtype=object)}


def _pseudo_step(batch: dict, step: str, **state) -> dict:
    """Task: EmbeddedPseudoMasker.step `step` on each prepared image of the batch."""
    from .models.pseudo_masks import EmbeddedPseudoMasker

    masker = EmbeddedPseudoMasker()  # only its knobs are used here, no model
    values = [pickle.dumps(masker.step(step, pickle.loads(blob), **state)) for blob in batch["regions"]]
    return {"index": batch["index"], "value": np.array(values, dtype=object)}


def _pseudo_leaf_labels(ray, ids, data, split, backbone_name, dim, class_ids, actors, resources, threads, device,
                        fault, batch_size):
    """Each image's superpixel labels, as EmbeddedPseudoMasker.assign gives them over the whole split: images
    prepared in actors and kept in the cluster, `EmbeddedPseudoMasker.solve` on the driver mapping each pass's
    per-image step over them as tasks."""
    from tqdm.auto import tqdm

    from .models.pseudo_masks import EmbeddedPseudoMasker

    prepared = _map(ray, ids, _Preparer, actors, resources, batch_size, data=data, split=split,
                    backbone=backbone_name, threads=threads, device=device, fault=fault).materialize()
    masker = EmbeddedPseudoMasker()

    def per_image(step: str, **state) -> list:
        result = prepared.map_batches(_pseudo_step, fn_kwargs={"step": step, **state}, batch_format="numpy")
        return [pickle.loads(row["value"]) for row in _rows(result, "index")]

    with tqdm(total=masker.passes(), desc="pseudo-masks: prototype passes", unit="pass") as bar:
        return masker.solve(per_image, class_ids, dim, on_pass=lambda: bar.update(1))


def build_parts_ray(data, split: str, masks: str, backbone: str, config: Config, address: str | None = None,
                    actors: int | None = None, progress: bool = True) -> list[BankPart]:
    """The parts of a bank build of a VOC-layout split on Ray: the same parts, in the same order (batches of
    `config.batch_size` images in split order), as `bank_parts` over `VOCDataset(data, split)` (with `masks`
    "pseudo": over `pseudo_mask_samples` of it) in one process. Combine with `reject_outliers_ray` and
    `FeatureBank.from_parts`."""
    from .data import VOCDataset
    from .models import create_backbone

    if masks not in ("gt", "pseudo"):
        raise InputError(f"masks must be 'gt' or 'pseudo', got {masks!r}")
    dataset = VOCDataset(data, split)  # checked on the driver before any actor starts
    if not len(dataset):
        raise InputError(f"{data}: split {split} lists no images")
    data = str(Path(data).resolve())
    ray = connect(address, progress)
    n, resources, threads, device = _pool(ray, actors, config)
    fault = os.environ.get(FAULT_ENV)
    indices = np.arange(len(dataset))
    try:
        if masks == "pseudo":
            dim = create_backbone(backbone, num_threads=1).dim
            class_ids = sorted({int(c) for i in dataset.ids for c in dataset.labels(i)})
            leaves = _pseudo_leaf_labels(ray, ray.data.from_items([{"index": int(i)} for i in indices]), data, split,
                                         backbone, dim, class_ids, n, resources, threads, device, fault,
                                         config.batch_size)
            items = [{"index": int(i), "leaf": pickle.dumps(leaf)} for i, leaf in zip(indices, leaves)]
        else:
            items = [{"index": int(i)} for i in indices]
        featurised = _map(ray, ray.data.from_items(items), _Featuriser, n, resources, config.batch_size, data=data,
                          split=split, masks=masks, backbone=backbone, config=config, threads=threads, device=device,
                          fault=fault)
        per_image = [pickle.loads(row["part"]) for row in _rows(featurised, "index")]
    except ModuSegError:
        raise
    except Exception as error:  # a Ray error: actors that kept dying, a lost node, a failed task
        raise _failed("bank build", error) from error
    if [p.images[0] for p in per_image] != list(dataset.ids):
        raise ModelError(f"Ray bank build returned {len(per_image)} images for the split's {len(dataset)}")
    size = config.batch_size
    return [BankPart.concatenate(per_image[start:start + size]) for start in range(0, len(per_image), size)]


def _part_step(batch: dict, step, state: dict) -> dict:
    """Task: `step` of reject_outliers_parts on each part of the batch."""
    values = [pickle.dumps(step(pickle.loads(blob), **state)) for blob in batch["part"]]
    return {"order": batch["order"], "value": np.array(values, dtype=object)}


def reject_outliers_ray(parts: Sequence[BankPart], config: Config, address: str | None = None,
                        progress: bool = True) -> np.ndarray:
    """`engine.bank.reject_outliers_parts` with its per-part steps as Ray tasks."""
    ray = connect(address, progress)
    parts = list(parts)
    table = ray.data.from_items([{"order": k, "part": pickle.dumps(p)} for k, p in enumerate(parts)])

    def map_parts(step, **state) -> list:
        result = table.map_batches(_part_step, fn_kwargs={"step": step, "state": state}, batch_format="numpy")
        return [pickle.loads(row["value"]) for row in _rows(result, "order")]

    try:
        return reject_outliers_parts(parts, config, map_parts)
    except ModuSegError:
        raise
    except Exception as error:
        raise _failed("outlier rejection", error) from error


# ------------------------------------------------------------------------------------------ batch segmentation


class _Segmenter:
    """Actor: an Engine over the bank (loaded once); a batch of inputs (paths and keys as file-system bytes: a name
    that is not UTF-8 is no Arrow string) -> the outputs written, a reason per failed image ("" when done), as
    `moduseg segment` writes them in one process (engine.apis.segment_files)."""

    def __init__(self, bank, config, out, with_overlay, device, fault):
        from .pipeline import Engine

        self.engine = Engine(bank, config=config, device=device)
        self.out, self.with_overlay = Path(out), with_overlay
        self.fault = _Fault(fault)

    def __call__(self, batch: dict) -> dict:
        from .segment_runs import segment_items
        from .outputs import Input

        self.fault.tick()
        items = [(Input(Path(os.fsdecode(path)), Path(os.fsdecode(key))), json.loads(provenance))
                 for path, key, provenance in zip(batch["path"], batch["key"], batch["provenance"])]
        reasons = segment_items(self.engine, items, self.out, self.with_overlay, len(items), progress=False)
        return {"path": batch["path"], "reason": np.array([reasons[str(item.path)] for item, _ in items], dtype=object)}


def segment_ray(inputs: Sequence, out: Path, bank, config: Config, address: str | None = None,
                actors: int | None = None, with_overlay: bool = True, resume: bool = True, device: str = "cpu",
                progress: bool = True, **rendering) -> dict:
    """`engine.segment_runs.segment_to_folder` on Ray: the inputs still to do are segmented by actors that each hold an
    Engine over `bank` and write each one's outputs under `out` (`rendering`: run_provenance's output_mode, palette,
    opacity). Returns segment_to_folder's summary; failures are never raised."""
    from .segment_runs import segment_to_folder
    from .outputs import bank_id, run_provenance

    def on_ray(todo: list) -> dict:
        from tqdm.auto import tqdm

        ray = connect(address, progress=False)
        n, resources, threads, gpu_device = _pool(ray, actors, config)
        engine_config = config if config.num_threads else config.replace(num_threads=threads)
        table = ray.data.from_items([{"path": os.fsencode(item.path), "key": os.fsencode(item.key),
                                      "provenance": json.dumps(provenance)} for item, provenance in todo])
        results = _map(ray, table, _Segmenter, n, resources, config.batch_size, bank=str(Path(bank).resolve()),
                       config=engine_config, out=str(Path(out).resolve()), with_overlay=with_overlay,
                       device=device if gpu_device == "cpu" else gpu_device, fault=os.environ.get(FAULT_ENV))
        reasons = {}
        try:
            with tqdm(total=len(todo), desc="segment (ray)", unit="img", disable=not progress) as bar:
                for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                    reasons.update(zip(map(os.fsdecode, batch["path"]), batch["reason"]))
                    bar.update(len(batch["path"]))
        except Exception as error:
            raise _failed("segment run", error) from error
        missing = [str(item.path) for item, _ in todo if str(item.path) not in reasons]
        if missing:
            raise ModelError(f"Ray segment run returned no result for {len(missing)} images (e.g. {missing[0]}); "
                             "rerun to resume")
        return reasons

    run = run_provenance(bank=bank_id(bank), config=config, **rendering)
    return segment_to_folder(inputs, out, run, on_ray, resume, with_overlay)
