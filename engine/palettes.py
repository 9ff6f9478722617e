"""Class colours: the palette a label map, an overlay and a report sheet are drawn in, chosen by the class names.

As mmsegmentation keeps a palette in each data set's metadata beside its class names, a palette here belongs to a
class list, and since a bank carries its class names (and a served model states them), every picture of a result
gets its data set's own colours without being told: VOC's 21-colour map for the VOC classes, SegNet's colours for
the CamVid 11, and for any other class list a generated palette of distinct colours.

    palette = palette_for(bank.class_names)            # "auto": by the names
    palette = palette_for(bank.class_names, "camvid")  # a named palette, by class id
    rgb = palette.colourise(label_map)                 # (H, W, 3) uint8

Class 0 (background) is black in every palette, and label 255 (void, IGNORE) is VOC's boundary cream, so that a
ground-truth map's void reads as such in any of them.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass, field

import numpy as np

from .constants import IGNORE
from .errors import InputError

#: --palette's choices: "auto" picks by the class names; the others are applied by class id
PALETTES = ("auto", "voc", "camvid", "distinct")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
#: CamVid's 11 classes as SegNet distributes them, with class 0 for background / void
CAMVID_CLASSES = ("background", "sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car",
                  "pedestrian", "bicyclist")
#: SegNet's CamVid colours, in CAMVID_CLASSES' order
CAMVID_COLOURS = ((0, 0, 0), (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                  (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
#: the colour of label 255 (void) in every palette: VOC's object-boundary colour
VOID_COLOUR = (224, 224, 192)
#: a palette holds at least this many colours: every value of a uint8 label map, as a PNG palette does
PNG_COLOURS = 256


@dataclass(frozen=True, eq=False)
class Palette:
    """`colours[i]` is the RGB colour of label i, (max(256, classes), 3) uint8; `name` says which palette it is
    ("voc", "camvid" or "distinct")."""

    name: str
    colours: np.ndarray = field(repr=False)

    def colourise(self, label_map: np.ndarray) -> np.ndarray:
        """(H, W) labels -> (H, W, 3) uint8 RGB."""
        return self.colours[np.asarray(label_map)]

    def png(self) -> list[int]:
        """The first 256 colours flat, as PIL's Image.putpalette takes them."""
        return self.colours[:PNG_COLOURS].ravel().tolist()

    def colour(self, label: int) -> tuple[int, int, int]:
        return tuple(int(c) for c in self.colours[label])


def voc_colours(count: int = PNG_COLOURS) -> np.ndarray:
    """VOC's colour map (the class index's bits interleaved over R, G, B from the top bit down), `count` x 3 uint8;
    for count <= 256 every colour differs."""
    colours = np.zeros((count, 3), np.uint8)
    for index in range(count):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[index] = (r, g, b)
    return colours


#: (hue step, saturation / value rounds): consecutive classes a golden-ratio turn of the hue circle apart, the
#: saturation and brightness changing each round so that hues that come back near each other still differ
_GOLDEN = 0.618033988749895
_SHADES = ((0.85, 0.95), (0.55, 0.80), (1.00, 0.60), (0.40, 1.00))


def distinct_colours(count: int, avoid=()) -> list[tuple[int, int, int]]:
    """`count` RGB colours that differ from each other and from `avoid` (golden-ratio hues)."""
    taken, colours, step = {tuple(c) for c in avoid}, [], 0
    while len(colours) < count:
        saturation, value = _SHADES[(step // 5) % len(_SHADES)]
        rgb = tuple(round(255 * c) for c in colorsys.hsv_to_rgb((step * _GOLDEN) % 1.0, saturation, value))
        step += 1
        if rgb not in taken:
            taken.add(rgb)
            colours.append(rgb)
    return colours


def palette_for(class_names, name: str = "auto") -> Palette:
    """The palette of a class list. "auto": when every name is one of a known data set's classes (VOC's, then
    CamVid's; compared lowercase, spaces and punctuation dropped, so "SignSymbol" and "tv/monitor" match), that data
    set's colour for each name whatever the order; otherwise "distinct". "voc", "camvid", "distinct": that palette by
    class id (VOC's map covers 256 ids; CamVid's 12 colours and the ids past 255 go on with distinct colours)."""
    if name not in PALETTES:
        raise InputError(f"palette {name!r}: expected one of {', '.join(PALETTES)}")
    return _cached_palette(tuple(_normal(n) for n in class_names), name)


@functools.lru_cache(maxsize=64)
def _cached_palette(names: tuple[str, ...], name: str) -> Palette:
    """palette_for over normalised names (each image's overlay asks again)."""
    count = max(PNG_COLOURS, len(names))
    if name == "auto":
        for known, colours in (("voc", voc_colours(len(VOC_CLASSES))), ("camvid", CAMVID_COLOURS)):
            table = dict(zip(VOC_CLASSES if known == "voc" else CAMVID_CLASSES, colours))
            if names and all(n in table for n in names):
                chosen = [tuple(table[n]) for n in names]
                return _palette(known, chosen, count, len(names))
        name = "distinct"
    if name == "voc":
        return _palette("voc", [tuple(c) for c in voc_colours()], count, len(names))
    if name == "camvid":
        return _palette("camvid", list(CAMVID_COLOURS), count, len(names))
    return _palette("distinct", [(0, 0, 0)], count, len(names))


def _palette(name: str, first: list, count: int, classes: int) -> Palette:
    """`first` colours for the first ids, distinct ones after them; void's colour at 255 unless a class has that id."""
    colours = list(first[:count])
    colours += distinct_colours(count - len(colours), avoid=[*colours, VOID_COLOUR, (255, 255, 255)])
    array = np.array(colours, np.uint8)
    if classes <= IGNORE:  # label 255 is no class: void
        array[IGNORE] = VOID_COLOUR
    array.flags.writeable = False  # shared by every caller through the cache
    return Palette(name, array)


def _normal(name: str) -> str:
    return "".join(c for c in str(name).lower() if c.isalnum())
