"""What travels between the engine's stages: a Batch of checked inputs, the Result of each image (or a Skipped
record for an input that could not be read), loading a chunk of inputs into a Batch and putting results back in input
order. The engine (engine.pipeline) and the client of the served segmentation (engine.remote) share them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .utils import check_image, encode_mask, mask_box


@dataclass
class Result:
    """Segmentation of one image.

    label_map: (H, W) class ids, uint8 (int32 for banks of more than 256 classes); 0 = background (every pixel no
        kept proposal painted, unless Config.fill_unpainted filled it); with the engine's proposer, class boundaries
        snapped to the image's edges (Config.boundary_radius).
    classes, confidences, proposal_ids: one entry per proposal that survived the filters, the vote (not
        background) and NMS, in painting order (most confident first): its class id, its confidence (mean
        similarity of the winning class's neighbours) and its index in the image's input proposals.
    owner: (H, W) int32, the input-proposal index that painted each pixel, -1 where none did or where the
        refinement (fill, boundaries) changed the painted class.
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

    def segments(self, output_mode: str = "uncompressed_rle") -> list[dict]:
        """One record per proposal that painted pixels, most confident first (as segment-anything's automatic
        generator; a kept proposal that higher-confidence ones painted over entirely has no record): "class_id",
        "class" (name), "score" (confidence), "proposal_id", "area" (pixels it painted), "bbox" ([x, y, width,
        height] of those pixels) and "segmentation" (those pixels as `output_mode`: "binary_mask" an (H, W) bool
        array, "uncompressed_rle" COCO's {"size", "counts": [runs]}, "coco_rle" COCO's compressed {"size",
        "counts": str}, through pycocotools)."""
        records = []
        for class_id, score, proposal in zip(self.classes, self.confidences, self.proposal_ids):
            painted = self.owner == proposal
            area = int(painted.sum())
            if not area:
                continue
            name = self.class_names[class_id] if class_id < len(self.class_names) else str(class_id)
            records.append({"class_id": int(class_id), "class": name, "score": float(score),
                            "proposal_id": int(proposal), "area": area, "bbox": mask_box(painted),
                            "segmentation": encode_mask(painted, output_mode)})
        return records

    def to_dict(self, output_mode: str = "uncompressed_rle") -> dict:
        """Everything but the pixel maps, JSON-ready: image size, per-class pixel fractions, the segments (masks as
        "uncompressed_rle" or "coco_rle"), counts and the note."""
        if output_mode == "binary_mask":
            raise InputError("Result.to_dict: output_mode 'binary_mask' is not JSON; use 'uncompressed_rle' or "
                             "'coco_rle' (or Result.segments('binary_mask'))")
        return {"height": int(self.label_map.shape[0]), "width": int(self.label_map.shape[1]),
                "classes": self.class_summary(), "segments": self.segments(output_mode),
                "num_proposals": self.num_proposals, "num_candidates": self.num_candidates, "note": self.note}


@dataclass
class Skipped:
    """An item `segment_batch` or `segment_stream` skipped with on_error="skip": its position in the input (`index`),
    what it was, and why."""

    index: int
    item: str
    reason: str


@dataclass
class Batch:
    """A batch between stages: the good items' checked images and input positions, then their proposals, candidate
    records and backbone features; the skipped items of the chunk travel along to keep the output in order."""

    images: list
    proposals: list
    positions: list
    skipped: list = field(default_factory=list)
    candidates: list = field(default_factory=list)
    features: list = field(default_factory=list)
    given: list = field(default_factory=list)  # per image: were its proposals the caller's (not the proposer's)


def kept_result(proposals, named, keep: np.ndarray, label_map: np.ndarray, owner: np.ndarray,
                class_names: tuple[str, ...]) -> Result:
    """One image's Result from its candidates' Records (`named`: id, class, confidence), what NMS kept of them and
    the painted maps; the kept proposals most confident first."""
    kept = named.filter(keep.astype(bool))
    kept = kept.filter(np.argsort(-kept["confidence"].astype(np.float64), kind="stable"))
    note = ("no proposals: all background" if len(proposals) == 0 else
            "no proposal passed the objectness and area filters: all background" if len(named) == 0 else
            "every proposal was voted background: all background" if len(kept) == 0 else "")
    return Result(label_map=label_map, classes=kept["class"].astype(np.int32),
                  confidences=kept["confidence"].astype(np.float32), proposal_ids=kept["id"].astype(np.int64),
                  owner=owner, num_proposals=len(proposals), num_candidates=len(named), class_names=class_names,
                  note=note)


ON_ERROR = ("raise", "skip")
CHANNEL_ORDERS = ("RGB", "BGR")


def load_batch(images: list, proposals: list | None, start: int, on_error: str, channel_order: str,
               max_pixels: int | None, decode_device: str | None = None) -> Batch:
    """Decode and check a chunk of images (paths decoded here: on the host, or JPEGs on `decode_device`'s GPU in
    one call, engine.data.gpu_decode); with on_error="skip" a bad item becomes a Skipped record, else its error is
    raised naming its index (`start` + its position)."""
    from .data import load_image

    files = [i for i, image in enumerate(images) if isinstance(image, (str, os.PathLike))]
    decoded = {}
    if decode_device and files:
        from .data.gpu_decode import load_images

        decoded = dict(zip(files, load_images([images[i] for i in files], decode_device, max_pixels)))
    batch = Batch([], [], [])
    proposals = [None] * len(images) if proposals is None else proposals
    for offset, (image, given) in enumerate(zip(images, proposals)):
        index = start + offset
        try:
            if offset in decoded:
                if isinstance(decoded[offset], Exception):
                    raise decoded[offset]
                image = decoded[offset]
            elif isinstance(image, (str, os.PathLike)):
                image = load_image(image)
            elif channel_order == "BGR" and isinstance(image, np.ndarray) and image.ndim == 3:
                image = image[..., ::-1]
            batch.images.append(check_image(image, f"images[{index}]", max_pixels))
        except MemoryError:
            raise  # the process's state, not this item's fault
        except Exception as error:  # anything reading one item is that item's failure: recorded, the others go on
            if on_error == "raise":
                raise
            reason = str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}"
            batch.skipped.append(Skipped(index, describe_item(image), reason))
            continue
        batch.proposals.append(given)
        batch.positions.append(index)
    return batch


def in_input_order(batch: Batch, results: list) -> list:
    """The results of a batch's good items merged with its Skipped records, in input order."""
    if not batch.skipped:
        return results
    merged = dict(zip(batch.positions, results))
    merged.update((skipped.index, skipped) for skipped in batch.skipped)
    return [merged[index] for index in sorted(merged)]


def check_modes(on_error: str, channel_order: str) -> None:
    """InputError unless on_error and channel_order are modes segment_batch / segment_stream know."""
    if on_error not in ON_ERROR or channel_order not in CHANNEL_ORDERS:
        raise InputError(f"on_error must be one of {ON_ERROR} and channel_order one of {CHANNEL_ORDERS}, got "
                         f"{on_error!r} and {channel_order!r}")


def check_items(items, name: str) -> None:
    """InputError for one path or one image given where a sequence of images is expected: a str is a sequence of
    characters and an HxWx3 array one of rows, each of which would be read as an item and skipped."""
    if isinstance(items, (str, bytes, os.PathLike)):
        raise InputError(f"{name}: expected a sequence of images, got the single path {os.fsdecode(items)!r}; wrap it "
                         f"in a list: [{os.fsdecode(items)!r}]")
    if isinstance(items, np.ndarray) and items.ndim in (2, 3):
        raise InputError(f"{name}: expected a sequence of images, got a single {items.dtype} array of shape "
                         f"{items.shape}; wrap it in a list: [image] (a batch as one array is (B, H, W, 3))")


def describe_item(item) -> str:
    """A short description of an input item for a Skipped record."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, np.ndarray):
        return f"array {item.dtype} {item.shape}"
    return type(item).__name__
