"""Scale-out on Ray: feature-bank builds and batch segmentation over a Ray cluster (a local one by default).

Bank builds (`build_parts_ray`, `reject_outliers_ray`): a split's image ids are a Ray Dataset; actors holding the
backbone and the proposer featurise batches of them (`engine.bank.featurise_batch`) and return one BankPart per image,
which the driver regroups in image order into the parts a single-process build makes. Outlier rejection is a
per-class aggregate: per-class sums and counts reduced to means on the driver, distances per row in tasks, then per
class the int(n * ratio) farthest rows dropped with `reject_outliers`' tie rule (`drop_farthest`). With pseudo-masks,
actors prepare each image (saliency, superpixels, features), the class prototypes of `EmbeddedPseudoMasker.assign`
are reduced on the driver from per-image partial sums in image order at each iteration (the same sums in the same
order as one process), and the featurising actors paint each image's mask from its superpixel labels.

Batch segmentation (`segment_ray`): image paths are a Ray Dataset; actors each hold an Engine (the bank loaded once
per actor) and write every image's outputs with `engine.outputs.write_outputs`, as `moduseg segment` does; an image that
cannot be read or segmented comes back as a failure, never an error.

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

from .bank import BankPart, KINDS, drop_farthest, featurise_batch, outlier_count
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


def _pseudo_step(batch: dict, step: str, protos=None, centres=None) -> dict:
    """Task: one per-image piece of EmbeddedPseudoMasker.assign for each prepared image of the batch."""
    from .models.pseudo_masks import EmbeddedPseudoMasker

    masker = EmbeddedPseudoMasker()  # only its knobs are used here, no model
    values = []
    for blob in batch["regions"]:
        r = pickle.loads(blob)
        if step == "initial":
            value = masker.initial_sums(r)
        elif step == "iteration":
            value = masker.iteration_sums(r, protos)
        elif step == "pool":
            value = masker.background_pool(r)
        elif step == "refine":
            value = masker.refinement_sums(r, masker.decide(r, protos, centres))
        else:
            value = masker.decide(r, protos, centres)
        values.append(pickle.dumps(value))
    return {"index": batch["index"], "value": np.array(values, dtype=object)}


def _pseudo_leaf_labels(ray, ids, data, split, backbone_name, dim, class_ids, actors, resources, threads, device,
                        fault, batch_size):
    """Each image's superpixel labels, as EmbeddedPseudoMasker.assign gives them over the whole split: prepared in
    actors, prototypes reduced on the driver from per-image partial sums each iteration."""
    from tqdm.auto import tqdm

    from .models.pseudo_masks import EmbeddedPseudoMasker

    prepared = _map(ray, ids, _Preparer, actors, resources, batch_size, data=data, split=split,
                    backbone=backbone_name, threads=threads, device=device, fault=fault).materialize()
    masker = EmbeddedPseudoMasker()

    def per_image(step: str, **state) -> list:
        result = prepared.map_batches(_pseudo_step, fn_kwargs={"step": step, **state}, batch_format="numpy")
        return [pickle.loads(row["value"]) for row in _rows(result, "index")]

    passes = max(masker.iterations, 1) + masker.refinements + 3
    with tqdm(total=passes, desc="pseudo-masks: prototype passes", unit="pass") as bar:
        protos = masker.reduce_prototypes(per_image("initial"), class_ids, dim)
        bar.update(1)
        for _ in range(max(masker.iterations, 1)):
            protos = masker.reduce_prototypes(per_image("iteration", protos=protos), class_ids, dim, protos)
            bar.update(1)
        centres = masker.background_centres(per_image("pool"), dim)
        bar.update(1)
        for _ in range(masker.refinements):
            protos = masker.reduce_prototypes(per_image("refine", protos=protos, centres=centres), class_ids, dim,
                                              protos)
            bar.update(1)
        leaves = per_image("decide", protos=protos, centres=centres)
        bar.update(1)
    return leaves


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


def _class_sums(batch: dict, subject_kind: int) -> dict:
    """Task: per part and class, the number and float64 sum of its subject vectors (class prototypes)."""
    orders, labels, counts, sums, dim = [], [], [], [], 0
    for order, blob in zip(batch["order"], batch["part"]):
        part = pickle.loads(blob)
        dim = part.dim
        subject = part.kinds == subject_kind
        for class_id in np.unique(part.labels[subject]):
            rows = subject & (part.labels == class_id)
            orders.append(order)
            labels.append(class_id)
            counts.append(int(rows.sum()))
            sums.append(part.vectors[rows].astype(np.float64).sum(axis=0))
    return {"order": np.asarray(orders, np.int64), "label": np.asarray(labels, np.int64),
            "count": np.asarray(counts, np.int64), "sum": np.asarray(sums, np.float64).reshape(len(sums), dim)}


def _distances(batch: dict, subject_kind: int, means: dict) -> dict:
    """Task: the distance of every subject vector to its class mean, with its position in the concatenation."""
    positions, labels, distances = [], [], []
    for offset, blob in zip(batch["offset"], batch["part"]):
        part = pickle.loads(blob)
        for row in np.flatnonzero(part.kinds == subject_kind):
            label = int(part.labels[row])
            positions.append(int(offset) + int(row))
            labels.append(label)
            distances.append(float(np.linalg.norm(part.vectors[row] - means[label])))
    return {"position": np.asarray(positions, np.int64), "label": np.asarray(labels, np.int64),
            "distance": np.asarray(distances, np.float64)}


def reject_outliers_ray(parts: Sequence[BankPart], config: Config, address: str | None = None,
                        progress: bool = True) -> np.ndarray:
    """The keep-mask of `reject_outliers` over the concatenation of `parts` (class prototypes only), computed as a
    per-class aggregate on Ray: per-class sums and counts (per part, in tasks) reduced to means on the driver, the
    distance of every row to its class mean (in tasks), then per class the `int(n * ratio)` farthest rows dropped,
    ties dropping the earlier row first as `reject_outliers` does. Means are float64 sums over float32 vectors, so
    distances may differ from the single-process ones in the last bits; the kept set is the same unless two
    distances agree to those bits."""
    ray = connect(address, progress)
    parts = list(parts)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    keep = np.ones(int(offsets[-1]), bool)
    if not len(keep):
        return keep
    subject = KINDS.index("class")
    table = ray.data.from_items([{"order": k, "offset": int(offsets[k]), "part": pickle.dumps(p)}
                                 for k, p in enumerate(parts)])
    try:
        sums: dict[int, np.ndarray] = {}
        counts: dict[int, int] = {}
        rows = table.map_batches(_class_sums, fn_kwargs={"subject_kind": subject}, batch_format="numpy").take_all()
        for row in sorted(rows, key=lambda r: (int(r["label"]), int(r["order"]))):
            label = int(row["label"])
            sums[label] = sums.get(label, 0.0) + row["sum"]
            counts[label] = counts.get(label, 0) + int(row["count"])
        means = {label: sums[label] / counts[label] for label in sums}
        rows = _rows(table.map_batches(_distances, fn_kwargs={"subject_kind": subject, "means": means},
                                       batch_format="numpy"), "position")
    except ModuSegError:
        raise
    except Exception as error:
        raise _failed("outlier rejection", error) from error
    positions = np.array([int(r["position"]) for r in rows], np.int64)
    labels = np.array([int(r["label"]) for r in rows], np.int64)
    distances = np.array([float(r["distance"]) for r in rows], np.float64)
    for label in np.unique(labels):
        members = labels == label
        n_drop = outlier_count(int(label), int(members.sum()), config)
        if n_drop:
            keep[drop_farthest(positions[members], distances[members], n_drop)] = False
    return keep


# ------------------------------------------------------------------------------------------ batch segmentation


class _Segmenter:
    """Actor: an Engine over the bank (loaded once); a batch of inputs (paths and keys as file-system bytes: a name
    that is not UTF-8 is no Arrow string) -> the outputs written, a reason per failed image ("" when done)."""

    def __init__(self, bank, config, out, with_overlay, device, fault):
        from .pipeline import Engine

        self.engine = Engine(bank, config=config, device=device)
        self.out, self.with_overlay = Path(out), with_overlay
        self.fault = _Fault(fault)

    def __call__(self, batch: dict) -> dict:
        from .outputs import Input

        self.fault.tick()
        items = [(Input(Path(os.fsdecode(path)), Path(os.fsdecode(key))), json.loads(provenance))
                 for path, key, provenance in zip(batch["path"], batch["key"], batch["provenance"])]
        return {"path": batch["path"], "reason": np.array(self._segment(items), dtype=object)}

    def _segment(self, items: list) -> list[str]:
        from .outputs import write_outputs
        from .pipeline import Skipped

        try:
            results = self.engine.segment_batch([item.path for item, _ in items], on_error="skip")
        except Exception as error:  # not a decode error (those come back Skipped): find the image that caused it
            if len(items) == 1:
                return [f"{type(error).__name__}: {error}"]
            return [reason for item in items for reason in self._segment([item])]
        reasons = []
        for (item, provenance), result in zip(items, results):
            if isinstance(result, Skipped):
                reasons.append(result.reason)
                continue
            try:
                write_outputs(item, result, self.out, provenance, self.with_overlay)
                reasons.append("")
            except Exception as error:  # noqa: BLE001 - disk full, read-only folder, ...: this image's failure
                reasons.append(f"cannot write its outputs: {type(error).__name__}: {error}")
        return reasons


def segment_ray(inputs: Sequence, out: Path, bank, config: Config, address: str | None = None,
                actors: int | None = None, with_overlay: bool = True, resume: bool = True, device: str = "cpu",
                progress: bool = True, **rendering) -> dict:
    """Segment `inputs` (engine.outputs.Input: path and key, from find_inputs) on Ray, writing each one's outputs under
    `out` as `moduseg segment` does (`rendering`: run_provenance's output_mode, palette, opacity). With `resume`, an
    input whose record still holds (same bank, result-changing config and input file: engine.outputs.plan_run) is
    skipped, and one whose record is stale is redone. Returns {"images", "done_before", "stale" (reason -> count of
    those redone), "written", "failures": [{"image", "reason"}, ...] in input order}; failures are never raised."""
    from tqdm.auto import tqdm

    from .outputs import bank_id, plan_run, run_provenance

    plan = plan_run(inputs, out, run_provenance(bank=bank_id(bank), config=config, **rendering), resume, with_overlay)
    reasons: dict[str, str] = dict(plan.failures)  # image path -> why it failed; "" when written
    if plan.todo:
        ray = connect(address, progress=False)
        n, resources, threads, gpu_device = _pool(ray, actors, config)
        engine_config = config if config.num_threads else config.replace(num_threads=threads)
        table = ray.data.from_items([{"path": os.fsencode(item.path), "key": os.fsencode(item.key),
                                      "provenance": json.dumps(provenance)} for item, provenance in plan.todo])
        results = _map(ray, table, _Segmenter, n, resources, config.batch_size, bank=str(Path(bank).resolve()),
                       config=engine_config, out=str(Path(out).resolve()), with_overlay=with_overlay,
                       device=device if gpu_device == "cpu" else gpu_device, fault=os.environ.get(FAULT_ENV))
        try:
            with tqdm(total=len(plan.todo), desc="segment (ray)", unit="img", disable=not progress) as bar:
                for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                    reasons.update(zip(map(os.fsdecode, batch["path"]), batch["reason"]))
                    bar.update(len(batch["path"]))
        except Exception as error:
            raise _failed("segment run", error) from error
        missing = [str(item.path) for item, _ in plan.todo if str(item.path) not in reasons]
        if missing:
            raise ModelError(f"Ray segment run returned no result for {len(missing)} images (e.g. {missing[0]}); "
                             "rerun to resume")
    return {"images": len(inputs), "done_before": plan.done, "stale": plan.stale,
            "written": sum(1 for item, _ in plan.todo if reasons.get(str(item.path)) == ""),
            "failures": [{"image": str(item.path), "reason": reasons[str(item.path)]} for item in inputs
                         if reasons.get(str(item.path))]}
