"""engine.utils: the input checks, padding and bucketing every model and the bank share."""

import numpy as np
import pytest

from engine.errors import InputError
from engine.utils import bucket_by_size, ceil_div, check_image, check_masks, pad_to_multiple, padded_size


def test_check_image_accepts_rgb_uint8_and_names_what_is_wrong():
    image = np.zeros((4, 6, 3), np.uint8)[:, ::2]  # not contiguous
    checked = check_image(image)
    assert checked.flags.c_contiguous and checked.shape == (4, 3, 3)
    for bad, message in [(np.zeros((4, 4), np.uint8), "grayscale"), (np.zeros((4, 4, 4), np.uint8), "RGBA"),
                         (np.zeros((4, 4, 2), np.uint8), "HxWx3"), (np.zeros((0, 4, 3), np.uint8), "empty"),
                         (np.zeros((4, 4, 3), np.float32), "uint8"), ([[0, 0, 0]], "numpy array")]:
        with pytest.raises(InputError, match=message) as error:
            check_image(bad, "images[3]")
        assert str(error.value).startswith("images[3]: ")


def test_check_masks():
    masks = check_masks(np.array([[[0, 2], [1, 0]]], np.uint8), 2, 2)
    assert masks.dtype == np.bool_ and masks.tolist() == [[[False, True], [True, False]]]
    with pytest.raises(InputError, match=r"expected shape \(N, 2, 3\)"):
        check_masks(np.zeros((1, 2, 2), bool), 2, 3)
    with pytest.raises(InputError, match="bool or integer"):
        check_masks(np.zeros((1, 2, 2), np.float32), 2, 2)


def test_padding_to_a_multiple():
    assert ceil_div(0, 32) == 0 and ceil_div(1, 32) == 1 and ceil_div(64, 32) == 2 and ceil_div(65, 32) == 3
    assert padded_size(375, 500, 32) == (384, 512) and padded_size(28, 14, 14) == (28, 14)
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) + 1
    padded = pad_to_multiple(image, 4)
    assert padded.shape == (4, 4, 3) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:2, :3], image)
    assert not padded[2:].any() and not padded[:, 3:].any()  # zeros bottom/right, no resize
    mask = pad_to_multiple(np.ones((3, 5), bool), 4)  # a 2-D mask pads the same way
    assert mask.shape == (4, 8) and mask.sum() == 15 and not mask[3].any()
    exact = np.zeros((4, 4))
    assert pad_to_multiple(exact, 4) is exact


def test_bucket_by_size_groups_equal_sizes_in_first_seen_order():
    sizes = [(32, 64), (64, 64), (32, 64), (32, 64), (64, 64), (96, 32), (32, 64)]
    assert bucket_by_size(sizes, 2) == [[0, 2], [3, 6], [1, 4], [5]]
    assert bucket_by_size(sizes, 10) == [[0, 2, 3, 6], [1, 4], [5]]
    assert bucket_by_size([], 3) == []


def test_rle_round_trip_and_coco_convention(rng):
    from engine.utils import mask_box, rle_decode, rle_encode

    for shape in [(1, 1), (5, 7), (40, 33)]:
        for fill in (0.0, 0.3, 1.0):
            mask = rng.random(shape) < fill
            rle = rle_encode(mask)
            assert rle["size"] == list(shape) and sum(rle["counts"]) == mask.size
            np.testing.assert_array_equal(rle_decode(rle), mask)
    mask = np.array([[0, 1], [1, 1]], bool)  # column-major: 0, 1, 1, 1 -> one 0 then three 1s
    assert rle_encode(mask)["counts"] == [1, 3]
    assert rle_encode(np.ones((2, 2), bool))["counts"] == [0, 4]
    assert mask_box(mask) == [0, 0, 2, 2] and mask_box(np.zeros((3, 3), bool)) == [0, 0, 0, 0]
    box = np.zeros((10, 10), bool)
    box[2:5, 3:9] = True
    assert mask_box(box) == [3, 2, 6, 3]
