"""engine.palettes: each class list's own colours (VOC's, CamVid's, distinct generated ones), chosen by the names."""

import numpy as np
import pytest

from engine.errors import InputError
from engine.palettes import (CAMVID_CLASSES, CAMVID_COLOURS, PALETTES, VOC_CLASSES, VOID_COLOUR, palette_for,
                             voc_colours)


def test_voc_names_get_vocs_colour_map():
    palette = palette_for(VOC_CLASSES)
    assert palette.name == "voc"
    assert [palette.colour(i) for i in (0, 1, 15, 20)] == [(0, 0, 0), (128, 0, 0), (192, 128, 128), (0, 64, 128)]
    np.testing.assert_array_equal(palette.colours[:21], voc_colours()[:21])
    assert palette.colour(255) == VOID_COLOUR


def test_camvid_names_get_segnets_colours_not_vocs():
    """Was: CamVid was drawn in VOC's palette, so sky (class 1) was maroon and car, sky and fence alike."""
    palette = palette_for(CAMVID_CLASSES)
    assert palette.name == "camvid"
    assert palette.colour(CAMVID_CLASSES.index("sky")) == (128, 128, 128)
    assert palette.colour(CAMVID_CLASSES.index("car")) == (64, 0, 128)
    assert palette.colour(CAMVID_CLASSES.index("road")) == (128, 64, 128)
    assert [palette.colour(i) for i in range(12)] == list(CAMVID_COLOURS)
    # the names as the data set's own files spell them, in another order: the same colour for each name
    shuffled = palette_for(["Background", "Car", "Sky", "SignSymbol"])
    assert shuffled.name == "camvid"
    assert [shuffled.colour(i) for i in range(4)] == [(0, 0, 0), (64, 0, 128), (128, 128, 128), (192, 128, 128)]


@pytest.mark.parametrize("count", [4, 151, 300])
def test_other_class_lists_get_distinct_colours(count):
    names = ["background"] + [f"thing{i}" for i in range(1, count)]
    palette = palette_for(names)
    assert palette.name == "distinct" and palette.colours.shape == (max(256, count), 3)
    colours = {palette.colour(i) for i in range(count)}
    assert len(colours) == count and palette.colour(0) == (0, 0, 0)
    assert (count > 255) or (VOID_COLOUR not in colours and palette.colour(255) == VOID_COLOUR)


def test_a_named_palette_applies_by_class_id_and_a_wrong_name_is_refused():
    assert set(PALETTES) == {"auto", "voc", "camvid", "distinct"}
    voc = palette_for(CAMVID_CLASSES, "voc")
    assert voc.name == "voc" and voc.colour(1) == (128, 0, 0)
    camvid = palette_for(VOC_CLASSES, "camvid")
    assert camvid.colour(1) == (128, 128, 128) and len({camvid.colour(i) for i in range(21)}) == 21
    assert palette_for(VOC_CLASSES, "distinct").name == "distinct"
    with pytest.raises(InputError, match="palette 'rainbow': expected one of auto, voc, camvid, distinct"):
        palette_for(VOC_CLASSES, "rainbow")


def test_png_palette_and_colourise():
    palette = palette_for(CAMVID_CLASSES)
    flat = palette.png()
    assert len(flat) == 768 and flat[3:6] == [128, 128, 128]
    labels = np.array([[0, 1], [9, 255]], np.uint8)
    np.testing.assert_array_equal(palette.colourise(labels),
                                  [[[0, 0, 0], [128, 128, 128]], [[64, 0, 128], list(VOID_COLOUR)]])
