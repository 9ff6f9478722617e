"""engine.eval: one confusion matrix over a split, IoU per class (classes absent from the ground truth left out of
the mean), mIoU and the Markdown table."""

import numpy as np
import pytest

from engine.errors import InputError
from engine.eval import ConfusionMatrix, markdown_table


def test_miou_from_one_confusion_matrix_with_ignore():
    cm = ConfusionMatrix(["background", "a", "b"])
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]], np.uint8)
    cm.update(pred, truth)
    iou = cm.iou()
    # background: tp 1, fp 1 (pred 0 at a "2"), fn 1 -> 1/3; a: tp 2, fp 1 -> 2/3; b: tp 1, fn 1 -> 1/2
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 1 / 2])
    summary = cm.summary()
    assert summary["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert summary["images"] == 1
    assert "**mIoU**" in markdown_table(summary)


def test_class_absent_from_ground_truth_is_left_out_but_still_costs():
    cm = ConfusionMatrix(["background", "a", "b"])
    truth = np.array([[1, 1, 2, 2]], np.uint8)
    pred = np.array([[0, 1, 2, 2]], np.uint8)
    cm.update(pred, truth)
    summary = cm.summary()
    assert summary["per_class"]["background"] is None
    assert summary["miou"] == pytest.approx(100 * (0.5 + 1.0) / 2)


def test_shape_mismatch_and_out_of_range():
    cm = ConfusionMatrix(["background", "a"])
    with pytest.raises(InputError):
        cm.update(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(InputError):
        cm.update(np.full((2, 2), 5, np.uint8), np.zeros((2, 2), np.uint8))


def test_ceilings_name_proposals_and_atoms_by_the_ground_truth():
    from engine.eval import atoms_ceiling, proposals_ceiling
    from engine.regions import Proposals

    truth = np.zeros((20, 20), np.uint8)
    truth[2:12, 2:12] = 1
    truth[14:18, 14:18] = 2
    exact = np.zeros((3, 20, 20), bool)
    exact[0, 2:12, 2:12] = True  # the object exactly
    exact[1, 0:14, 0:14] = True  # the object and background around it: majority 1, less pure
    exact[2, 14:18, 14:18] = True  # 16 pixels: under min_area 20, never painted
    proposals = Proposals.from_masks(exact, np.ones(3))
    label_map = proposals_ceiling(proposals, truth, 3, min_area=20)
    np.testing.assert_array_equal(label_map[2:12, 2:12], 1)  # the purest one painted first
    assert (label_map[truth == 2] == 0).all()
    np.testing.assert_array_equal(atoms_ceiling(proposals, truth, 3), truth)  # atoms are exact here
