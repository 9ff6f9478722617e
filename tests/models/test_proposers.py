"""engine.models.proposers: ground-truth proposals in atom form give exactly the masks of the old definition (one per
8-connected component of each non-void class, class by class, background only when asked), on random label maps
and on real VOC and CamVid ground truth."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from engine.constants import IGNORE
from engine.errors import InputError
from engine.models import ground_truth_proposals
from engine.regions import Proposals


def old_definition(label_map: np.ndarray, include_background: bool = False) -> np.ndarray:
    """(N, H, W) masks as the dense implementation built them: classes in increasing order, then components in
    OpenCV's labelling order."""
    masks = []
    for class_id in np.unique(label_map):
        if class_id == IGNORE or (class_id == 0 and not include_background):
            continue
        count, components = cv2.connectedComponents((label_map == class_id).astype(np.uint8), connectivity=8)
        masks.extend(components == c for c in range(1, count))
    return np.stack(masks) if masks else np.zeros((0, *label_map.shape), bool)


def random_label_map(rng, height, width, num_classes):
    """Blobs of a few classes over background, void borders and specks: several components per class, diagonal
    contacts (8- but not 4-connected)."""
    label = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(0, 12))):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        label[y0:y0 + rng.integers(1, height // 2 + 2), x0:x0 + rng.integers(1, width // 2 + 2)] = \
            rng.integers(1, num_classes + 1)
    specks = rng.random((height, width)) < 0.02
    label[specks] = rng.integers(0, num_classes + 1, specks.sum())
    label[rng.random((height, width)) < 0.03] = IGNORE
    if rng.random() < 0.5:
        label[::7, :] = IGNORE  # void lines split components
    return label


@pytest.mark.parametrize("include_background", [False, True])
def test_masks_equal_the_dense_definition_on_random_maps(rng, include_background):
    for _ in range(25):
        shape = (int(rng.integers(1, 60)), int(rng.integers(1, 60)))
        label = random_label_map(rng, *shape, num_classes=int(rng.integers(1, 6)))
        proposals = ground_truth_proposals(label, include_background=include_background)
        want = old_definition(label, include_background)
        assert isinstance(proposals, Proposals) and proposals.shape == shape
        np.testing.assert_array_equal(proposals.masks, want)
        np.testing.assert_array_equal(proposals.objectness, np.ones(len(want), np.float32))
        np.testing.assert_array_equal(proposals.areas(), want.reshape(len(want), -1).sum(1))


def test_components_are_8_connected_and_void_is_never_proposed():
    label = np.array([[1, 0, 0, 2],
                      [0, 1, 0, 2],
                      [0, 0, 255, 0],
                      [1, 1, 0, 255]], np.uint8)
    proposals = ground_truth_proposals(label)
    assert len(proposals) == 3  # class 1: the diagonal pair and the bottom pair; class 2: one column
    np.testing.assert_array_equal(proposals.masks[0], (label == 1) & (np.arange(4)[:, None] < 2))
    with_background = ground_truth_proposals(label, include_background=True)
    assert len(with_background) == 4 and with_background.masks[0].sum() == (label == 0).sum()
    assert not (with_background.masks.any(0) & (label == IGNORE)).any()


def test_degenerate_maps():
    assert len(ground_truth_proposals(np.zeros((5, 6), np.uint8))) == 0
    assert len(ground_truth_proposals(np.full((5, 6), IGNORE, np.uint8), include_background=True)) == 0
    single = ground_truth_proposals(np.full((3, 4), 7, np.int32))
    assert len(single) == 1 and single.masks.all()
    with pytest.raises(InputError, match=r"expected shape \(H, W\)"):
        ground_truth_proposals(np.zeros((2, 3, 4), np.uint8))


def test_real_ground_truth(voc_root, camvid_root):
    from engine.data import load_label_map

    paths = sorted((voc_root / "SegmentationClass").glob("*.png"))[:6] + \
        sorted((camvid_root / "SegmentationClass").glob("*.png"))[:3]
    for path in paths:
        label = load_label_map(path)
        for include_background in (False, True):
            proposals = ground_truth_proposals(label, include_background)
            np.testing.assert_array_equal(proposals.masks, old_definition(label, include_background))
