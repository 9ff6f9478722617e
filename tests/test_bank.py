"""Feature bank: SBP, SMFA, outlier rejection, save/load round trip and refusal of bad banks."""

import json

import cv2
import numpy as np
import pytest

from engine.bank import FeatureBank, erode, purify, reject_outliers
from engine.config import Config
from engine.data import Sample
from engine.errors import BankError, InputError
from engine.reference import soft_mask_pool_reference
from toy_models import CLASSES, ColorBackbone, scene, toy_samples

make_samples = toy_samples


def test_single_square_erosion_equals_iterated_3x3_with_unerodible_border():
    rng = np.random.default_rng()
    mask = cv2.dilate((rng.random((70, 90)) > 0.97).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    mask[:, :30] = True  # touches the left, top and bottom edges
    iterated = mask.astype(np.uint8)
    for _ in range(20):
        iterated = cv2.erode(iterated, np.ones((3, 3), np.uint8))
    np.testing.assert_array_equal(erode(mask, Config().erosion_size), iterated.astype(bool))
    assert erode(mask, 41)[:, 0].any(), "the image edge must not erode"


def test_purify_drops_small_regions_and_adaptive_keeps_thin_ones():
    pole = np.zeros((200, 200), bool)
    pole[20:180, 95:105] = True  # 10 px wide, 1600 px: erased whole by 20 erosions
    assert purify(pole, Config.paper()) is None
    kept = purify(pole, Config.paper(erosion="adaptive"))
    assert kept is not None and kept.sum() >= 300 and kept.sum() < pole.sum()
    assert not (kept & ~pole).any()
    tiny = np.zeros((50, 50), bool)
    tiny[10:20, 10:20] = True
    assert purify(tiny, Config(erosion="adaptive")) is None
    block = np.zeros((100, 100), bool)
    block[10:90, 10:90] = True
    np.testing.assert_array_equal(purify(block, Config.paper(erosion="adaptive")), purify(block, Config.paper()))
    assert purify(block, Config(erosion_iterations=0)).sum() == block.sum()


def test_outlier_rejection_drops_farthest_quarter_of_foreground_only():
    rng = np.random.default_rng()
    vectors = rng.normal(size=(18, 5)).astype(np.float32)
    labels = np.array([1] * 9 + [2] * 5 + [0] * 4)
    keep = reject_outliers(vectors, labels, Config.paper())
    assert keep[labels == 0].all()
    assert (~keep[labels == 1]).sum() == 2 and (~keep[labels == 2]).sum() == 1
    members = np.flatnonzero(labels == 1)
    distance = np.linalg.norm(vectors[members] - vectors[members].mean(0), axis=1)
    assert set(members[np.argsort(-distance)[:2]]) == set(members[~keep[members]])
    assert reject_outliers(vectors, labels, Config(outlier_ratio=0)).all()


def test_build_vectors_are_smfa_of_purified_masks():
    backbone = ColorBackbone()
    samples = make_samples(3)
    config = Config(outlier_ratio=0, min_area=50, erosion_iterations=2)
    bank = FeatureBank.build(samples, backbone, CLASSES, config, progress=False)
    np.testing.assert_allclose(np.linalg.norm(bank.vectors, axis=1), 1, atol=1e-5)
    assert bank.sources[0] == "img0"
    row = 0
    for sample in samples:
        features = backbone.features([sample.image])[0]
        for class_id in np.unique(sample.mask):
            mask = purify(sample.mask == class_id, config)
            want = soft_mask_pool_reference(features, mask[None], backbone.stride)[0]
            assert bank.labels[row] == class_id
            np.testing.assert_allclose(bank.vectors[row], want, atol=1e-5)
            row += 1
    assert row == len(bank)


def test_build_ignores_classes_absent_from_labels_and_void():
    rng = np.random.default_rng()
    image, label = scene(rng=rng, classes=(1, 2))
    label[:5] = 255
    bank = FeatureBank.build([Sample("a", image, [1], label)], ColorBackbone(), CLASSES,
                             Config(min_area=50, erosion_iterations=1), progress=False)
    assert sorted(bank.labels.tolist()) == [0, 1]


def test_build_rejects_bad_input():
    image, label = scene()
    with pytest.raises(InputError, match="mask of image"):
        FeatureBank.build([Sample("a", image, [1], label[:-1])], ColorBackbone(), CLASSES, progress=False)
    with pytest.raises(InputError, match="grayscale"):
        FeatureBank.build([Sample("a", image[..., 0], [1], label)], ColorBackbone(), CLASSES, progress=False)
    with pytest.raises(InputError, match="class ids"):
        FeatureBank.build([Sample("a", image, [7], label)], ColorBackbone(), CLASSES, progress=False)
    with pytest.raises(InputError, match="no bank vector"):
        FeatureBank.build([Sample("a", image, [1], label)], ColorBackbone(), CLASSES, Config(min_area=10 ** 6),
                          progress=False)


def test_nan_features_are_dropped():
    class NaNBackbone(ColorBackbone):
        def features(self, images):
            out = super().features(images)
            out[0][:] = np.nan
            return out

    samples = make_samples(2)
    bank = FeatureBank.build(samples, NaNBackbone(), CLASSES, Config(outlier_ratio=0), progress=False)
    assert set(bank.sources) == {"img1"}


@pytest.fixture
def saved_bank(tmp_path):
    bank = FeatureBank.build(make_samples(6), ColorBackbone(), CLASSES, Config(min_area=100), progress=False,
                             provenance={"data": "synthetic"})
    return bank, bank.save(tmp_path / "bank")


def test_round_trip(saved_bank):
    bank, path = saved_bank
    loaded = FeatureBank.load(path, backbone=ColorBackbone())
    np.testing.assert_array_equal(loaded.vectors, bank.vectors)
    np.testing.assert_array_equal(loaded.labels, bank.labels)
    assert loaded.class_names == CLASSES and loaded.config == bank.config and loaded.sources == bank.sources
    assert loaded.provenance["data"] == "synthetic"
    queries = np.random.default_rng().normal(size=(5, bank.dim)).astype(np.float32)
    for got, want in zip(loaded.search(queries, 4), bank.search(queries, 4)):
        np.testing.assert_array_equal(got, want)


def test_save_refuses_to_overwrite(saved_bank):
    bank, path = saved_bank
    with pytest.raises(BankError, match="exists"):
        bank.save(path)
    bank.save(path, overwrite=True)
    FeatureBank.load(path)


def test_mismatched_backbone_is_refused(saved_bank):
    _, path = saved_bank
    with pytest.raises(BankError, match="test/other"):
        FeatureBank.load(path, backbone=ColorBackbone(id="test/other"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest", "version"])
def test_corrupt_bank_is_refused(saved_bank, damage):
    _, path = saved_bank
    vectors = path / "vectors.npy"
    if damage == "truncate":
        vectors.write_bytes(vectors.read_bytes()[:-17])
    elif damage == "flip":
        data = bytearray(vectors.read_bytes())
        data[-3] ^= 0xFF
        vectors.write_bytes(bytes(data))
    elif damage == "delete":
        (path / "index.faiss").unlink()
    elif damage == "manifest":
        (path / "manifest.json").write_text("{not json")
    else:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["version"] = 99
        (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BankError):
        FeatureBank.load(path)


def test_not_a_bank(tmp_path):
    with pytest.raises(BankError, match="not a feature bank"):
        FeatureBank.load(tmp_path)


def test_ivf_index_option():
    rng = np.random.default_rng()
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    backbone = {"id": "test/random", "dim": 16, "stride": 1}
    flat = FeatureBank(vectors, rng.integers(0, 3, 2000), CLASSES[:3], backbone)
    ivf = FeatureBank(vectors, flat.labels, CLASSES[:3], backbone, Config(index="IVF16,Flat", nprobe=16))
    sims_flat, rows_flat = flat.search(vectors[:10], 5)
    sims_ivf, rows_ivf = ivf.search(vectors[:10], 5)
    np.testing.assert_array_equal(rows_flat, rows_ivf)  # nprobe = nlist visits every list: exact
    with pytest.raises(InputError, match="factory"):
        FeatureBank(vectors, flat.labels, CLASSES[:3], backbone, Config(index="NotAnIndex")).index


def test_hard_pooling_is_the_mean_of_patches_whose_centre_is_covered():
    rng = np.random.default_rng()
    from engine.bank import pool_regions

    stride = 8
    features = rng.normal(size=(5, 7, 6)).astype(np.float32)  # image 37 x 53: last patches partly padding
    masks = rng.random((4, 37, 53)) > 0.5
    got = pool_regions(features, masks, stride, Config(pooling="hard"), normalize=False)
    for mask, vector in zip(masks, got):
        covered = np.zeros((5, 7), bool)
        for i in range(5):
            for j in range(7):
                y, x = i * stride + stride // 2, j * stride + stride // 2
                covered[i, j] = y < 37 and x < 53 and mask[y, x]
        want = features[covered].sum(0) / (covered.sum() + 1e-8)
        np.testing.assert_allclose(vector, want, atol=1e-5)
    soft = pool_regions(features, masks, stride, Config(), normalize=False)
    np.testing.assert_allclose(soft, soft_mask_pool_reference(features, masks, stride, normalize=False), atol=1e-5)
