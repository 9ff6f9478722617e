"""engine.data.voc: VOC-layout data sets (voc2012-mini, camvid), image-level labels, label maps as palette PNGs."""

import json

import numpy as np
import pytest
from PIL import Image

from engine.data import VOC_CLASSES, VOCDataset, load_image, load_label_map, save_label_map
from engine.errors import InputError


def test_voc_split_samples_and_weak_labels(voc_root):
    train = VOCDataset(voc_root, "train")
    assert len(train) == len((voc_root / "ImageSets/Segmentation/train.txt").read_text().split())
    assert train.class_names == VOC_CLASSES and train.class_names[0] == "background" and len(VOC_CLASSES) == 21
    sample = train[0]
    assert sample.image.dtype == np.uint8 and sample.image.ndim == 3 and sample.image.shape[2] == 3
    assert sample.mask.shape == sample.image.shape[:2] and sample.mask.dtype == np.uint8
    names = json.loads((voc_root / "image_labels.json").read_text())[sample.id]
    assert sample.labels == sorted(VOC_CLASSES.index(n) for n in names)
    assert set(sample.labels) <= set(np.unique(sample.mask).tolist())  # named classes are in the ground truth
    assert [s.id for s in train][:3] == train.ids[:3]


def test_camvid_class_names_from_file(camvid_root):
    val = VOCDataset(camvid_root, "val")
    assert val.class_names == tuple((camvid_root / "class_names.txt").read_text().split())
    assert len(val.class_names) == 12 and val[0].image.shape == (360, 480, 3)


def test_errors_name_the_problem(voc_root, tmp_path):
    with pytest.raises(InputError, match="no split file"):
        VOCDataset(tmp_path, "train")
    train = VOCDataset(voc_root, "train")
    with pytest.raises(InputError, match=r"unknown class names \['unicorn'\]"):
        train.class_ids(["cat", "unicorn"])
    assert train.class_ids(["cat", "background", "dog"]) == [8, 12]


def test_label_maps_round_trip_as_palette_pngs(tmp_path, rng):
    label = rng.integers(0, 21, (30, 40)).astype(np.uint8)
    label[0] = 255
    save_label_map(label, tmp_path / "x.png")
    png = Image.open(tmp_path / "x.png")
    assert png.mode == "P" and png.size == (40, 30)
    np.testing.assert_array_equal(load_label_map(tmp_path / "x.png"), label)
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / "rgb.png")
    assert load_image(tmp_path / "rgb.png").shape == (5, 6, 3)


def test_images_of_more_than_8_bits_are_refused(tmp_path):
    from PIL import Image

    from engine.data import load_image

    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(deep)
    with pytest.raises(InputError, match="not 8 bits a channel"):
        load_image(deep)
    floats = tmp_path / "float.tiff"
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(floats)
    with pytest.raises(InputError, match="not 8 bits a channel"):
        load_image(floats)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(grey)
    assert load_image(grey).shape == (8, 8, 3) and load_image(grey).max() == 7


def test_class_names_file_is_strict(tmp_path):
    from engine.data.voc import read_class_names

    path = tmp_path / "class_names.txt"
    path.write_text("background\ncat\ndog\n\n")
    assert read_class_names(path) == ("background", "cat", "dog")
    path.write_text("background\n\ncat\n")
    with pytest.raises(InputError, match=r"blank line\(s\) \[2\]"):
        read_class_names(path)
    path.write_text("background\ncat\ncat\n")
    with pytest.raises(InputError, match="repeated: \\['cat'\\]"):
        read_class_names(path)


def test_split_ids_that_are_paths_are_refused(tmp_path):
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("good\n../../x/evil\n")
    with pytest.raises(InputError, match=r"plain file names, got \['../../x/evil'\]"):
        VOCDataset(tmp_path, "val")


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from engine.data import load_image

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.shape == (40, 20, 3)  # displayed upright: portrait
    assert upright[:20].mean() > 200 and upright[20:].mean() < 50  # the white half is on top


def test_decompression_bombs_are_input_errors(tmp_path, monkeypatch):
    from PIL import Image

    from engine.data import load_image

    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is then more than twice the limit: a "bomb"
    with pytest.raises(InputError, match="too large to decode safely"):
        load_image(path)


def test_any_decoding_error_is_the_files_input_error(tmp_path, rng, monkeypatch, broken_png):
    # a broken PNG chunk made PIL raise SyntaxError, which escaped as a traceback and ended the run
    image = tmp_path / "broken.png"
    image.write_bytes(broken_png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(InputError, match=r"cannot read image .*broken.png: SyntaxError: broken PNG file"):
        load_image(image)
    label_map = tmp_path / "broken_mask.png"
    label_map.write_bytes(broken_png(rng.integers(0, 21, (64, 64), dtype=np.uint8)))
    with pytest.raises(InputError, match=r"cannot read label map .*broken_mask.png: SyntaxError"):
        load_label_map(label_map)
    import struct

    from PIL import ImageOps

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    monkeypatch.setattr(ImageOps, "exif_transpose", lambda image: (_ for _ in ()).throw(struct.error("short")))
    with pytest.raises(InputError, match=r"cannot read image .*good.png: error: short"):
        load_image(good)
    monkeypatch.setattr(ImageOps, "exif_transpose", lambda image: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):  # not one file's fault: never recorded as a bad file
        load_image(good)


def test_limit_takes_the_first_images_of_a_split(camvid_root):
    val = VOCDataset(camvid_root, "val", limit=3)
    assert val.ids == VOCDataset(camvid_root, "val").ids[:3] and len(val) == 3
    assert val.palette.name == "camvid" and val.palette.colour(1) == (128, 128, 128)
    with pytest.raises(InputError, match="limit: expected a number of images >= 1, got 0"):
        VOCDataset(camvid_root, "val", limit=0)
