"""Reader for datasets in the PASCAL VOC layout: JPEGImages/, SegmentationClass/ (index PNGs, 255 = void),
ImageSets/Segmentation/{split}.txt, optional image_labels.json (weak labels) and class_names.txt (class i on line i)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..constants import IGNORE  # noqa: F401  (VOC's void label, kept importable from here)
from ..errors import InputError
from ..palettes import VOC_CLASSES, Palette, palette_for

#: VOC's colour map as PIL's putpalette takes it (768 values); a data set's own palette is engine.palettes'
VOC_PALETTE = palette_for(VOC_CLASSES, "voc").png()


#: PIL modes holding 8 bits a channel (or a palette of 8-bit colours): converted to RGB exactly
EIGHT_BIT_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"}


def load_image(path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB, upright (its EXIF orientation applied; 8-bit grayscale, palette and
    RGBA files are converted). Images of more than 8 bits a channel (16-bit PNG, float TIFF) are refused rather than
    silently saturated or blacked out."""
    try:
        with Image.open(path) as image:
            if image.mode not in EIGHT_BIT_MODES:
                raise InputError(f"image {path}: mode {image.mode!r} is not 8 bits a channel; convert it to 8-bit RGB "
                                 "(the engine would otherwise have to guess its range)")
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (InputError, MemoryError):
        raise
    except Image.DecompressionBombError as error:
        raise InputError(f"image {path} is too large to decode safely: {error}") from error
    except Exception as error:  # a damaged file makes PIL raise more than OSError (see _unreadable)
        raise InputError(f"cannot read image {path}: {_unreadable(error)}") from error


def load_label_map(path) -> np.ndarray:
    """Read a class-index PNG (palette or grayscale) as HxW uint8."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise InputError(f"{path}: expected a palette or grayscale class-index PNG, got mode {image.mode}")
            return np.asarray(image, dtype=np.uint8)
    except (InputError, MemoryError):
        raise
    except Exception as error:  # as load_image's
        raise InputError(f"cannot read label map {path}: {_unreadable(error)}") from error


def _unreadable(error: Exception) -> str:
    """Why PIL could not read a file. Its decoders raise OSError and ValueError, but also SyntaxError (a PNG chunk of
    no valid type), struct.error (a short header field), IndexError, TypeError...: each one file's fault, so each
    becomes that file's InputError, and a run that skips bad files skips it rather than ending."""
    return str(error) if isinstance(error, (OSError, ValueError)) else f"{type(error).__name__}: {error}"


def save_label_map(label_map: np.ndarray, path, palette: Palette | None = None) -> None:
    """Write an HxW class-index map as a palette PNG, in `palette`'s colours (engine.palettes.palette_for of the
    class names; VOC's by default). The pixel values are the class ids whatever the colours."""
    image = Image.fromarray(np.asarray(label_map, dtype=np.uint8), mode="P")
    image.putpalette(palette.png() if palette is not None else VOC_PALETTE)
    image.save(path)


def read_class_names(path) -> tuple[str, ...]:
    """Class names, one a line, line i = class i. A blank line inside the list or a repeated name is an error (either
    would silently shift or merge class ids); trailing blank lines are allowed."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [i + 1 for i, name in enumerate(lines) if not name]
    if blank:
        raise InputError(f"{path}: blank line(s) {blank} inside the class list (line i names class i)")
    repeated = sorted({name for name in lines if lines.count(name) > 1})
    if repeated or not lines:
        raise InputError(f"{path}: class names must be unique and at least one, repeated: {repeated}")
    return tuple(lines)


@dataclass
class Sample:
    """One dataset image: `labels` are the class ids named by its image-level labels (background excluded);
    `mask` is the HxW ground truth (None when the split has none)."""

    id: str
    image: np.ndarray
    labels: list[int]
    mask: np.ndarray | None


def _missing_split(root: Path, split: str) -> str:
    """Why a data set has no split file: the root is missing or not in the VOC layout, or the split is not one of
    those it has (listed)."""
    layout = "ImageSets/Segmentation/SPLIT.txt, JPEGImages/, SegmentationClass/"
    if not root.is_dir():
        return f"dataset root {root}: no such folder (expected a data set in the VOC layout: {layout})"
    splits = root / "ImageSets" / "Segmentation"
    names = sorted(p.stem for p in splits.glob("*.txt")) if splits.is_dir() else []
    if not names:
        return f"dataset root {root}: not in the VOC layout, no split files {splits}/*.txt (expected {layout})"
    return f"dataset {root}: no split {split!r} ({splits / f'{split}.txt'} missing); its splits: {', '.join(names)}"


class VOCDataset:
    """A split of a dataset in the VOC layout. Class names come from `class_names.txt` when the root has one,
    the 21 VOC names otherwise; class 0 is background; `palette` gives their colours. `limit`: only the split's first
    `limit` images (a quick try)."""

    def __init__(self, root, split: str = "train", limit: int | None = None):
        self.root = Path(root)
        self.split = split
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            raise InputError(_missing_split(self.root, split))
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if limit is not None:  # a quick look at a split: its first `limit` images
            if limit < 1:
                raise InputError(f"VOCDataset limit: expected a number of images >= 1, got {limit}")
            self.ids = self.ids[:limit]
        # an id names files inside the root and the outputs written for it: a plain file name, never a path
        unsafe = [i for i in self.ids if Path(i).name != i or i in (".", "..") or "\\" in i]
        if unsafe:
            raise InputError(f"{split_file}: image ids must be plain file names, got {unsafe[:3]}")
        names_file = self.root / "class_names.txt"
        self.class_names = read_class_names(names_file) if names_file.is_file() else VOC_CLASSES
        self._class_index = {name: i for i, name in enumerate(self.class_names)}
        labels_file = self.root / "image_labels.json"
        self._weak_labels = json.loads(labels_file.read_text()) if labels_file.is_file() else None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def palette(self) -> Palette:
        """The colours of this data set's classes (engine.palettes.palette_for its class names)."""
        return palette_for(self.class_names)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> Sample:
        image_id = self.ids[index]
        mask = self.mask(image_id)
        return Sample(image_id, self.image(image_id), self.labels(image_id, mask), mask)

    def image(self, image_id: str) -> np.ndarray:
        return load_image(self.root / "JPEGImages" / f"{image_id}.jpg")

    def mask(self, image_id: str) -> np.ndarray | None:
        path = self.mask_path(image_id)
        return load_label_map(path) if path.is_file() else None

    def mask_path(self, image_id: str) -> Path:
        """Where the ground truth of `image_id` is (SegmentationClass/ID.png; a split without masks has none)."""
        return self.root / "SegmentationClass" / f"{image_id}.png"

    def class_ids(self, names, where: str = "labels") -> list[int]:
        """Class ids of class names; an unknown name is an InputError listing the known ones."""
        unknown = [n for n in names if n not in self._class_index]
        if unknown:
            raise InputError(f"{where}: unknown class names {unknown}; this dataset's classes: {list(self.class_names)}")
        return sorted({self._class_index[n] for n in names} - {0})

    def labels(self, image_id: str, mask: np.ndarray | None = None) -> list[int]:
        """Image-level labels: from image_labels.json when present, else the classes present in the mask."""
        if self._weak_labels is not None:
            if image_id not in self._weak_labels:
                raise InputError(f"{self.root / 'image_labels.json'}: no labels for image {image_id}")
            return self.class_ids(self._weak_labels[image_id], where=f"image_labels.json[{image_id}]")
        if mask is None:
            raise InputError(f"image {image_id}: no image_labels.json and no mask to derive labels from")
        present = np.unique(mask)
        return [int(c) for c in present if 0 < c < len(self.class_names)]
