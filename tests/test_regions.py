"""engine.regions: Proposals as unions of atoms (built from dense masks, from a label map, empty), their areas,
masks and filtering, and the Records container."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InputError
from engine.regions import Proposals, Records


def overlapping_masks(rng, count, height, width):
    """Random overlapping masks: rectangles, speckle, one pixel, empty, full and duplicates."""
    masks = np.zeros((count, height, width), bool)
    for n in range(count):
        kind = int(rng.integers(0, 7))
        if kind == 0:
            continue
        if kind == 1:
            masks[n] = True
        elif kind == 2:
            masks[n, rng.integers(height), rng.integers(width)] = True
        elif kind == 3:
            masks[n] = rng.random((height, width)) < rng.random()
        elif kind == 4 and n:
            masks[n] = masks[rng.integers(n)]
        else:
            y0, x0 = rng.integers(0, height), rng.integers(0, width)
            masks[n, y0:rng.integers(y0, height) + 1, x0:rng.integers(x0, width) + 1] = True
    return masks


@pytest.mark.parametrize("count,height,width", [(1, 5, 7), (3, 17, 9), (8, 20, 30), (9, 11, 13), (40, 24, 31),
                                                (64, 8, 8)])
@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64])
def test_from_masks_round_trips_exactly(rng, count, height, width, dtype):
    masks = overlapping_masks(rng, count, height, width)
    objectness = rng.random(count)
    proposals = Proposals.from_masks(masks.astype(dtype), objectness)
    np.testing.assert_array_equal(proposals.masks, masks)
    assert proposals.masks.dtype == np.bool_ and proposals.shape == (height, width)
    assert proposals.atoms.dtype == np.int32 and proposals.members.dtype == np.bool_
    np.testing.assert_allclose(proposals.objectness, objectness.astype(np.float32))
    np.testing.assert_array_equal(proposals.areas(), masks.sum(axis=(1, 2)))
    # atoms are the cells of the arrangement: every atom is used, and no two atoms have the same membership
    assert set(np.unique(proposals.atoms)) == set(range(proposals.num_atoms))
    columns = {proposals.members[:, a].tobytes() for a in range(proposals.num_atoms)}
    assert len(columns) == proposals.num_atoms
    assert proposals.atom_areas().sum() == height * width


def test_from_masks_empty_and_bad_input():
    none = Proposals.from_masks(np.zeros((0, 6, 5), bool), [])
    assert len(none) == 0 and none.shape == (6, 5) and none.masks.shape == (0, 6, 5)
    with pytest.raises(InputError, match=r"expected shape \(N, H, W\)"):
        Proposals.from_masks(np.zeros((6, 5), bool), [])
    with pytest.raises(InputError, match="bool or integer"):
        Proposals.from_masks(np.zeros((1, 6, 5), np.float32), [1.0])
    with pytest.raises(InputError, match="2 proposals but 1 objectness"):
        Proposals.from_masks(np.ones((2, 6, 5), bool), [1.0])


def test_from_labels_one_proposal_per_listed_value():
    labels = np.array([[0, 0, 3, 3], [7, 7, 3, 3], [7, 0, 0, 9]], np.int32)
    proposals = Proposals.from_labels(labels, [3, 7])
    np.testing.assert_array_equal(proposals.masks, np.stack([labels == 3, labels == 7]))
    np.testing.assert_array_equal(proposals.objectness, [1.0, 1.0])
    np.testing.assert_array_equal(proposals.areas(), [4, 3])
    scored = Proposals.from_labels(labels.astype(np.uint8), [9], objectness=[0.25])
    assert scored.objectness.tolist() == [0.25] and scored.areas().tolist() == [1]
    assert len(Proposals.from_labels(labels, [])) == 0
    with pytest.raises(InputError, match=r"regions \[5\] do not occur"):
        Proposals.from_labels(labels, [3, 5])
    with pytest.raises(InputError, match=r"regions \[10\] do not occur"):
        Proposals.from_labels(labels, [10])  # beyond the largest value
    with pytest.raises(InputError, match="integer map"):
        Proposals.from_labels(labels.astype(np.float32), [3])


def test_empty_proposals():
    empty = Proposals.empty(4, 6)
    assert len(empty) == 0 and empty.shape == (4, 6) and empty.num_atoms == 1
    assert empty.masks.shape == (0, 4, 6) and empty.areas().shape == (0,)


def test_direct_construction_validates_and_converts():
    atoms = np.array([[0, 1], [2, 2]], np.int64)
    members = np.array([[1, 0, 1], [0, 1, 0]], np.uint8)
    proposals = Proposals(atoms, members, [0.5, 0.75])
    assert proposals.atoms.dtype == np.int32 and proposals.atoms.flags.c_contiguous
    assert proposals.members.dtype == np.bool_ and proposals.objectness.dtype == np.float32
    np.testing.assert_array_equal(proposals.masks, [[[True, False], [True, True]], [[False, True], [False, False]]])
    np.testing.assert_array_equal(proposals.areas(), [3, 1])
    # an atom no pixel uses counts nothing
    sparse = Proposals(np.zeros((2, 2), np.int32), np.array([[True, True], [False, True]]), [1, 1])
    np.testing.assert_array_equal(sparse.areas(), [4, 0])
    for atoms_bad, members_bad, message in [
        (np.zeros((2, 2, 2), np.int32), members, "dense"),
        (atoms.astype(np.float32), members, "integer map"),
        (atoms, members.astype(np.float32), r"\(N, A\) bool"),
        (atoms, members[0], r"\(N, A\) bool"),
        (atoms + 1, members, r"ids must lie in \[0, 3\)"),
        (atoms - 1, members, r"ids must lie in \[0, 3\)"),
    ]:
        with pytest.raises(InputError, match=message):
            Proposals(atoms_bad, members_bad, [0.5, 0.75])
    with pytest.raises(InputError, match="2 proposals but 3 objectness"):
        Proposals(atoms, members, [0.5, 0.75, 1.0])


def test_filter_keeps_atoms_and_selects_rows(rng):
    masks = overlapping_masks(rng, 10, 12, 14)
    proposals = Proposals.from_masks(masks, np.linspace(0, 1, 10))
    keep = np.array([True, False] * 5)
    kept = proposals.filter(keep)
    assert kept.atoms is proposals.atoms
    np.testing.assert_array_equal(kept.masks, masks[keep])
    np.testing.assert_array_equal(kept.objectness, proposals.objectness[keep])
    reordered = proposals.filter(np.array([9, 0, 4]))
    np.testing.assert_array_equal(reordered.masks, masks[[9, 0, 4]])


def test_records_filter_together_and_check_lengths():
    records = Records(id=np.arange(4), score=np.array([0.1, 0.9, 0.5, 0.7]))
    assert len(records) == 4 and len(Records()) == 0
    records["class"] = [3, 1, 2, 1]
    kept = records.filter(records["score"] > 0.3)
    assert kept["id"].tolist() == [1, 2, 3] and kept["class"].tolist() == [1, 2, 1]
    ordered = records.filter(np.argsort(-records["score"]))
    assert ordered["id"].tolist() == [1, 3, 2, 0]
    with pytest.raises(InputError, match="'bad' has 2 rows, the others 4"):
        records["bad"] = [1, 2]
    with pytest.raises(KeyError):
        records["missing"]


def test_atom_histogram_and_majority_naming(rng):
    truth = rng.integers(0, 4, (30, 40)).astype(np.uint8)
    truth[:3] = 255  # void is not counted
    masks = rng.random((5, 30, 40)) < 0.4
    proposals = Proposals.from_masks(masks, np.ones(5))
    histogram = proposals.atom_histogram(truth, 4)
    assert histogram.sum() == (truth != 255).sum()
    classes, purity = proposals.majority(truth, 4)
    for mask, got, pure in zip(masks, classes, purity):
        counts = np.bincount(truth[mask & (truth != 255)], minlength=4)
        assert got == counts.argmax()
        assert pure == pytest.approx(counts.max() / mask.sum())
    with pytest.raises(InputError, match="label map of shape"):
        proposals.atom_histogram(truth[:-1], 4)


@pytest.mark.parametrize("count", [1, 63, 64, 65, 200])
def test_from_masks_cells_are_exact_across_64_bit_words(rng, count):
    """The arrangement's cells from masks packed into several 64-bit words: masks that differ only beyond the first
    word still give distinct cells, every mask is rebuilt exactly, and no two atoms share a membership column."""
    masks = rng.random((count, 23, 31)) < 0.3
    masks[-1] = masks[0]  # a duplicate mask
    if count > 64:
        masks[64] = ~masks[0]  # only the second word tells these pixels apart from the first mask's
    proposals = Proposals.from_masks(masks.astype(np.uint8), np.ones(count))
    np.testing.assert_array_equal(proposals.masks, masks)
    columns = {tuple(column) for column in proposals.members.T}
    assert len(columns) == proposals.num_atoms == len(np.unique(proposals.atoms))
