"""engine.bank: SBP, SMFA, outlier rejection, save/load round trip and refusal of bad banks, the FAISS index."""

import json

import cv2
import numpy as np
import pytest

from engine.bank import FeatureBank, erode, purify, reject_outliers
from engine.bank.centering import bank_center, centered
from engine.bank.hubness import hubness
from engine.config import Config
from engine.data import Sample
from engine.errors import BankError, InputError
from engine.reference import soft_mask_pool_reference
from engine.regions import Proposals
from engine.search import FaissIndex


@pytest.fixture
def CLASSES(toy):
    return toy.CLASSES


@pytest.fixture
def ColorBackbone(toy):
    return toy.ColorBackbone


def test_single_square_erosion_equals_iterated_3x3_with_unerodible_border(rng):
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


def test_outlier_rejection_drops_farthest_quarter_of_foreground_only(rng):
    vectors = rng.normal(size=(18, 5)).astype(np.float32)
    labels = np.array([1] * 9 + [2] * 5 + [0] * 4)
    keep = reject_outliers(vectors, labels, Config.paper())
    assert keep[labels == 0].all()
    assert (~keep[labels == 1]).sum() == 2 and (~keep[labels == 2]).sum() == 1
    members = np.flatnonzero(labels == 1)
    distance = np.linalg.norm(vectors[members] - vectors[members].mean(0), axis=1)
    assert set(members[np.argsort(-distance)[:2]]) == set(members[~keep[members]])
    assert reject_outliers(vectors, labels, Config(outlier_ratio=0)).all()


def _outliers_reference(vectors, labels, config, subject):
    """The rule as written: per class among the subject rows, int(n * ratio) rows farthest from the class mean
    (float64) dropped, the earlier row first among equal distances."""
    keep = np.ones(len(labels), bool)
    for class_id in np.unique(labels[subject]):
        rows = np.flatnonzero((labels == class_id) & subject)
        ratio = config.background_outlier_ratio if class_id == 0 else config.outlier_ratio
        mean = vectors[rows].astype(np.float64).mean(axis=0)
        distance = [np.linalg.norm(vectors[row].astype(np.float64) - mean) for row in rows]
        order = sorted(range(len(rows)), key=lambda k: (-distance[k], k))
        keep[rows[order[:int(len(rows) * ratio)]]] = False
    return keep


@pytest.mark.parametrize("seed", range(4))
def test_outlier_rejection_matches_the_rule(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    vectors = rng.normal(size=(n, 7)).astype(np.float32)
    vectors[rng.integers(0, n, size=n // 3)] = vectors[0]  # exact ties in distance
    labels = rng.integers(0, 4, size=n)
    subject = rng.random(n) < 0.7
    config = Config(outlier_ratio=float(rng.uniform(0, 0.7)), background_outlier_ratio=float(rng.uniform(0, 0.5)))
    np.testing.assert_array_equal(reject_outliers(vectors, labels, config, subject),
                                  _outliers_reference(vectors, labels, config, subject))
    assert reject_outliers(vectors[:0], labels[:0], config).shape == (0,)


@pytest.mark.parametrize("pooling", ["soft", "hard"])
def test_build_vectors_are_smfa_of_purified_masks(rng, toy, CLASSES, ColorBackbone, pooling):
    backbone = ColorBackbone()
    samples = toy.samples(rng, 3)
    config = Config(outlier_ratio=0, min_area=50, erosion_iterations=2, pooling=pooling, region_entries=False,
                    center_bank=False)
    bank = FeatureBank.build(samples, backbone, CLASSES, config, progress=False)
    np.testing.assert_allclose(np.linalg.norm(bank.vectors, axis=1), 1, atol=1e-5)
    assert bank.sources[0] == "img0"
    row = 0
    for sample in samples:
        features = backbone.features([sample.image])[0]
        for class_id in np.unique(sample.mask):
            mask = purify(sample.mask == class_id, config)
            want = soft_mask_pool_reference(features, mask[None], backbone.stride, pooling=pooling)[0]
            assert bank.labels[row] == class_id
            np.testing.assert_allclose(bank.vectors[row], want, atol=1e-5)
            row += 1
    assert row == len(bank)


def test_build_ignores_classes_absent_from_labels_and_void(rng, toy, CLASSES, ColorBackbone):
    image, label = toy.scene(rng, classes=(1, 2))
    label[:5] = 255
    bank = FeatureBank.build([Sample("a", image, [1], label)], ColorBackbone(), CLASSES,
                             Config(min_area=50, erosion_iterations=1), progress=False)
    assert sorted(bank.labels[bank.kinds == 0].tolist()) == [0, 1]
    assert set(bank.labels.tolist()) <= {0, 1}  # region entries too: never an unlisted class


class FixedProposer:
    """Proposes the same regions for every image: one per given mask."""

    name = "fixed"

    def __init__(self, masks):
        self.masks = masks

    def propose(self, images):
        return [Proposals.from_masks(self.masks, np.ones(len(self.masks))) for _ in images]


def test_region_entries_are_pure_regions_named_by_the_majority(rng, toy, CLASSES, ColorBackbone):
    image, label = toy.scene(rng, classes=(1, 2))
    red, green = label == 1, label == 2
    mixed = red | (label == 0)  # mostly background, far below any purity threshold for red
    mostly_green = green.copy()
    mostly_green[np.flatnonzero(red.any(1))[0], np.flatnonzero(red.any(0))] = True  # a row of red: still ~green
    tiny = np.zeros_like(red)
    tiny[0, 0] = True
    masks = np.stack([red, green, mixed, mostly_green, tiny])
    config = Config(min_area=50, region_purity=0.9, outlier_ratio=0.5, center_bank=False)
    backbone = ColorBackbone()
    bank = FeatureBank.build([Sample("a", image, [1, 2], label)], backbone, CLASSES, config,
                             proposer=FixedProposer(masks), progress=False)
    regions = bank.kinds == 1
    assert bank.provenance["proposer"] == "fixed"
    purity = [(m & (label == np.bincount(label[m]).argmax())).sum() / m.sum() for m in masks[:4]]
    expected = [i for i in range(4) if purity[i] >= 0.9]  # tiny is under min_area
    assert bank.labels[regions].tolist() == [int(np.bincount(label[masks[i]]).argmax()) for i in expected]
    features = backbone.features([image])[0]
    want = soft_mask_pool_reference(features, masks[expected], backbone.stride)
    np.testing.assert_allclose(bank.vectors[regions], want, atol=1e-5)
    # outlier rejection applies to the class prototypes only
    without = FeatureBank.build([Sample("a", image, [1, 2], label)], backbone, CLASSES,
                                config.replace(region_entries=False), progress=False)
    assert (~regions).sum() == len(without)
    assert Config.paper().region_entries is False


def test_build_rejects_bad_input(rng, toy, CLASSES, ColorBackbone):
    image, label = toy.scene(rng)
    with pytest.raises(InputError, match="mask of image"):
        FeatureBank.build([Sample("a", image, [1], label[:-1])], ColorBackbone(), CLASSES, progress=False)
    with pytest.raises(InputError, match="grayscale"):
        FeatureBank.build([Sample("a", image[..., 0], [1], label)], ColorBackbone(), CLASSES, progress=False)
    with pytest.raises(InputError, match="class ids"):
        FeatureBank.build([Sample("a", image, [7], label)], ColorBackbone(), CLASSES, progress=False)
    with pytest.raises(InputError, match="no bank vector"):
        FeatureBank.build([Sample("a", image, [1], label)], ColorBackbone(), CLASSES, Config(min_area=10 ** 6),
                          progress=False)


def test_nan_features_are_dropped(rng, toy, CLASSES, ColorBackbone):
    class NaNBackbone(ColorBackbone):
        def features(self, images):
            out = super().features(images)
            out[0][:] = np.nan
            return out

    samples = toy.samples(rng, 2)
    bank = FeatureBank.build(samples, NaNBackbone(), CLASSES, Config(outlier_ratio=0), progress=False)
    assert set(bank.sources) == {"img1"}


@pytest.fixture
def saved_bank(tmp_path, rng, toy, CLASSES, ColorBackbone):
    bank = FeatureBank.build(toy.samples(rng, 6), ColorBackbone(), CLASSES, Config(min_area=100), progress=False,
                             provenance={"data": "synthetic"})
    return bank, bank.save(tmp_path / "bank")


def test_round_trip(saved_bank, rng, CLASSES, ColorBackbone):
    bank, path = saved_bank
    loaded = FeatureBank.load(path, backbone=ColorBackbone())
    assert np.shares_memory(loaded.vectors, np.load(path / "vectors.npy", mmap_mode="r")) or \
        isinstance(loaded.vectors.base, np.memmap)  # memory-mapped, not read
    assert sorted(p.name for p in path.iterdir()) == ["center.npy", "hubness.npy", "kinds.npy", "labels.npy",
                                                      "manifest.json", "sources.json",
                                                      "vectors.npy"]  # a flat bank: no index file
    np.testing.assert_array_equal(loaded.vectors, bank.vectors)
    np.testing.assert_array_equal(loaded.center, bank.center)
    np.testing.assert_array_equal(loaded.hubness, bank.hubness)
    np.testing.assert_array_equal(loaded.labels, bank.labels)
    assert loaded.class_names == CLASSES and loaded.config == bank.config and loaded.sources == bank.sources
    assert loaded.provenance["data"] == "synthetic" and loaded.backbone == bank.backbone
    assert loaded.backbone_name == "test/color" and loaded.index.ntotal == len(bank)
    np.testing.assert_array_equal(loaded.class_counts(), bank.class_counts())
    queries = rng.normal(size=(5, bank.dim)).astype(np.float32)
    searches = [FaissIndex(b.vectors, b.labels, len(CLASSES), b.config, b.index).search(queries, 4)
                for b in (loaded, bank)]
    for got, want in zip(*searches):
        np.testing.assert_array_equal(got, want)


def test_save_refuses_to_overwrite(saved_bank):
    bank, path = saved_bank
    with pytest.raises(BankError, match="exists"):
        bank.save(path)
    bank.save(path, overwrite=True)
    FeatureBank.load(path)


def test_mismatched_backbone_is_refused(saved_bank, ColorBackbone):
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
        (path / "labels.npy").unlink()
    elif damage == "manifest":
        (path / "manifest.json").write_text("{not json")
    else:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["version"] = 2  # the previous format, which stored the vectors twice
        (path / "manifest.json").write_text(json.dumps(manifest))
    message = {"version": "version 2.*rebuild the bank", "truncate": "truncated", "flip": "corrupt",
               "delete": "missing labels.npy", "manifest": "manifest.json is corrupt"}[damage]
    for verify in ("quick", "full"):  # a small bank's files are hashed whole by the quick check too
        with pytest.raises(BankError, match=message):
            FeatureBank.load(path, verify=verify)


def test_not_a_bank(tmp_path):
    with pytest.raises(BankError, match="not a feature bank"):
        FeatureBank.load(tmp_path)


def test_ivf_index_option(rng, CLASSES):
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    backbone = {"id": "test/random", "dim": 16, "stride": 1}
    flat = FeatureBank(vectors, rng.integers(0, 3, 2000), CLASSES[:3], backbone)
    ivf = FeatureBank(vectors, flat.labels, CLASSES[:3], backbone, Config(index="IVF16,Flat", nprobe=16))
    assert ivf.index.nprobe == 16 and ivf.index.ntotal == 2000
    sims_flat, rows_flat = flat.index.search(vectors[:10], 5)
    sims_ivf, rows_ivf = ivf.index.search(vectors[:10], 5)
    np.testing.assert_array_equal(rows_flat, rows_ivf)  # nprobe = nlist visits every list: exact
    with pytest.raises(InputError, match="factory"):
        FeatureBank(vectors, flat.labels, CLASSES[:3], backbone, Config(index="NotAnIndex")).index


def test_bank_checks_its_arrays(CLASSES):
    backbone = {"id": "test/random", "dim": 4}
    vectors = np.eye(4, dtype=np.float32)
    with pytest.raises(BankError, match="disagree"):
        FeatureBank(vectors, [0, 1, 2], CLASSES, backbone)
    with pytest.raises(BankError, match="backbone record says 5-d"):
        FeatureBank(vectors, [0, 1, 2, 3], CLASSES, {"id": "x", "dim": 5})
    with pytest.raises(BankError, match="labels outside 0..3"):
        FeatureBank(vectors, [0, 1, 2, 4], CLASSES, backbone)
    with pytest.raises(BankError, match="NaN or inf"):
        FeatureBank(vectors * np.nan, [0, 1, 2, 3], CLASSES, backbone)
    named = FeatureBank(vectors, [0, 1, 2, 3], CLASSES, {"id": "dinov2/final@tiny+zeropad14", "dim": 4})
    assert named.backbone_name == "dinov2/final@tiny"  # no "model" entry: the id without the padding rule
    recorded = FeatureBank(vectors, [0, 1, 2, 3], CLASSES, {"id": "dinov2/final@tiny+zeropad14", "dim": 4,
                                                            "model": "dinov2/final", "weights": "/models/tiny"})
    assert recorded.backbone_name == "dinov2/final"


def test_overwrite_replaces_only_a_bank_directory(saved_bank, tmp_path):
    bank, path = saved_bank
    bank.save(path, overwrite=True)  # a bank: replaced
    assert FeatureBank.load(path).sources == bank.sources
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # nothing left aside
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BankError, match="not a feature bank.*refusing"):
        bank.save(precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    (path / "extra.txt").write_text("mine")  # a bank with someone's file in it is not replaced either
    with pytest.raises(BankError, match=r"holds \['extra.txt'\]"):
        bank.save(path, overwrite=True)
    assert (path / "extra.txt").exists() and (path / "manifest.json").exists()
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(BankError, match="not a bank directory"):
        bank.save(file, overwrite=True)


def rewrite_manifest(path, change):
    """Change a bank's manifest and reseal it, as someone forging one would (an unsealed edit is refused first)."""
    from engine.bank.storage import sealed

    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(sealed(manifest)))


def reseal(path, name):
    """Re-record `name`'s checksum, as someone editing a bank by hand would."""
    from engine.bank.storage import file_record

    rewrite_manifest(path, lambda m: m["files"].__setitem__(name, file_record(path / name)))


@pytest.mark.parametrize("case, message", [
    ("no files list", "must list checksums of exactly"),
    ("file outside the bank", "must list checksums of exactly"),
    ("an index file in a flat bank", "must list checksums of exactly"),
    ("an index over other vectors", r"holds 3 x 4 .*the vectors are \d+ x 4"),
    ("an L2 index", "under inner product"),
    ("lists out of range", "must give each of the"),
    ("unknown storage", "unknown index storage"),
])
def test_a_bank_whose_parts_disagree_is_refused(saved_bank, tmp_path, case, message):
    import faiss

    bank, path = saved_bank
    if case == "no files list":
        rewrite_manifest(path, lambda m: m.pop("files"))
    elif case == "file outside the bank":
        rewrite_manifest(path, lambda m: m["files"].__setitem__("../secret", {"sha256": "0", "bytes": 0}))
    elif case == "an index file in a flat bank":
        faiss.write_index(faiss.IndexFlatIP(bank.dim), str(path / "index.faiss"))
        reseal(path, "index.faiss")
    elif case == "unknown storage":
        rewrite_manifest(path, lambda m: m.__setitem__("index_storage", "twice"))
    elif case == "lists out of range":  # an IVF-Flat bank whose list file names a list the index lacks
        path = FeatureBank(bank.vectors, bank.labels, bank.class_names, bank.backbone,
                           bank.config.replace(index="IVF2,Flat")).save(tmp_path / "ivf")
        lists = np.load(path / "ivf_lists.npy")
        lists[0] = 2
        np.save(path / "ivf_lists.npy", lists)
        reseal(path, "ivf_lists.npy")
    else:  # a bank storing its index's codes, whose index is not over its vectors
        path = FeatureBank(bank.vectors, bank.labels, bank.class_names, bank.backbone,
                           bank.config.replace(index="IVF2,SQ8")).save(tmp_path / "sq")
        index = faiss.index_factory(bank.dim, "IVF2,SQ8", faiss.METRIC_INNER_PRODUCT if case != "an L2 index"
                                    else faiss.METRIC_L2)
        index.train(bank.vectors)
        index.add(bank.vectors[:3] if case == "an index over other vectors" else bank.vectors)
        faiss.write_index(index, str(path / "index.faiss"))
        reseal(path, "index.faiss")
    with pytest.raises(BankError, match=message):
        FeatureBank.load(path)


def test_mask_values_outside_the_class_list_are_refused(rng, toy, CLASSES, ColorBackbone):
    image, label = toy.scene(rng, classes=(1, 2))
    label[0, 0] = 9
    with pytest.raises(InputError, match=r"values \[9\] are neither classes"):
        FeatureBank.build([Sample("a", image, [1, 2], label)], ColorBackbone(), CLASSES, progress=False)


def test_a_failed_replacement_leaves_the_old_bank_in_place(saved_bank, monkeypatch):
    import os

    bank, path = saved_bank
    before = FeatureBank.load(path).vectors.copy()
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old bank is aside, the new one is about to move in: the machine "crashes"
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr("engine.bank.storage.os.replace", failing_replace)
    other = FeatureBank(bank.vectors[:-1], bank.labels[:-1], bank.class_names, bank.backbone, bank.config,
                        center=bank.center)
    with pytest.raises(OSError, match="simulated crash"):
        other.save(path, overwrite=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(FeatureBank.load(path).vectors, before)  # the old bank, whole, where it was
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]  # no staging left


# ---------------------------------------------------------------------------------------------- parts, merge, append


def toy_parts(samples, ColorBackbone, CLASSES, config):
    from engine.bank import bank_parts
    from engine.models.embedded import resolve_proposer

    return list(bank_parts(samples, ColorBackbone(), CLASSES, config, resolve_proposer("embedded", config),
                           progress=False))


def assert_same_bank(got, want):
    np.testing.assert_array_equal(got.vectors, want.vectors)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.kinds, want.kinds)
    assert got.sources == want.sources and got.class_names == want.class_names and got.backbone == want.backbone


def test_build_is_from_parts_of_its_batches(rng, toy, CLASSES, ColorBackbone):
    config = Config(min_area=100, batch_size=2)
    samples = toy.samples(rng, 5)
    parts = toy_parts(samples, ColorBackbone, CLASSES, config)
    assert [p.images for p in parts] == [["img0", "img1"], ["img2", "img3"], ["img4"]]
    assert sum(len(p) for p in parts) > 0 and all(set(p.sources) <= set(p.images) for p in parts)
    built = FeatureBank.build(samples, ColorBackbone(), CLASSES, config, progress=False)
    merged = FeatureBank.from_parts(parts, CLASSES, ColorBackbone().describe(), config)
    assert_same_bank(merged, built)
    assert merged.provenance["vectors_before_outlier_rejection"] == sum(len(p) for p in parts) > len(merged)
    # regrouping per image and back gives the same parts
    from engine.bank import BankPart

    regrouped = BankPart.concatenate([single for p in parts for single in p.per_image()])
    whole = BankPart.concatenate(parts)
    np.testing.assert_array_equal(regrouped.vectors, whole.vectors)
    assert regrouped.sources == whole.sources and regrouped.images == whole.images


def test_shards_merge_and_append_equal_one_build_over_the_union(rng, toy, CLASSES, ColorBackbone, tmp_path):
    from engine.bank import load_parts, merge_parts, save_parts

    config = Config(min_area=100)
    samples = toy.samples(rng, 9)
    one_build = FeatureBank.build(samples, ColorBackbone(), CLASSES, config, progress=False)
    # two shards built apart, kept on disk, merged
    shards = []
    for k, shard in enumerate((samples[:5], samples[5:])):
        parts = toy_parts(shard, ColorBackbone, CLASSES, config)
        save_parts(parts, tmp_path / f"shard{k}", CLASSES, ColorBackbone().describe(), config)
        shards.append(load_parts(tmp_path / f"shard{k}")[0])
    record = load_parts(tmp_path / "shard0")[1]
    assert record["class_names"] == list(CLASSES) and record["backbone"]["id"] == "test/color"
    merged = FeatureBank.from_parts(merge_parts(*shards), CLASSES, ColorBackbone().describe(), config)
    assert_same_bank(merged, one_build)
    # appending is the same call over the old bank's kept parts and the new ones: rejection sees the union
    assert merged.provenance["vectors_before_outlier_rejection"] == sum(len(p) for s in shards for p in s)
    with pytest.raises(InputError, match="img0 is in parts of two builds"):
        merge_parts(shards[0], shards[0][:1])


def test_a_failed_parts_write_leaves_the_old_parts_and_no_staging(rng, toy, CLASSES, ColorBackbone, tmp_path,
                                                                   monkeypatch):
    # parts are written through the same stage-and-swap as banks (engine.bank.storage.staged)
    from engine.bank import BankPart, load_parts, save_parts

    config = Config(min_area=100, batch_size=1)
    parts = toy_parts(toy.samples(rng, 3), ColorBackbone, CLASSES, config)
    path = save_parts(parts[:1], tmp_path / "parts", CLASSES, ColorBackbone().describe(), config)
    real_save, calls = BankPart.save, []

    def failing_save(part, where):
        calls.append(where)
        if len(calls) == 2:  # the second part: the machine "crashes" half-way through the directory
            raise OSError("simulated crash")
        return real_save(part, where)

    monkeypatch.setattr(BankPart, "save", failing_save)
    for target in (path, tmp_path / "new"):
        calls.clear()
        with pytest.raises(OSError, match="simulated crash"):
            save_parts(parts, target, CLASSES, ColorBackbone().describe(), config, overwrite=True)
    monkeypatch.undo()
    assert len(load_parts(path)[0]) == 1 and not (tmp_path / "new").exists()  # the old parts, whole, where they were
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]  # no staging left behind
    with pytest.raises(BankError, match="exists: a bank part is never overwritten"):
        parts[0].save(path / "part-000000")


def test_incomplete_parts_are_never_loaded(rng, toy, CLASSES, ColorBackbone, tmp_path):
    from engine.bank import BankPart, load_parts, save_parts

    config = Config(min_area=100)
    parts = toy_parts(toy.samples(rng, 3), ColorBackbone, CLASSES, config)
    path = save_parts(parts, tmp_path / "parts", CLASSES, ColorBackbone().describe(), config)
    assert sorted(p.name for p in path.iterdir()) == ["part-000000", "parts.json"]  # no staging left behind
    with pytest.raises(BankError, match="exists"):
        save_parts(parts, path, CLASSES, ColorBackbone().describe(), config)
    # a part without its marker (as a crash before part.json would leave it) or with a damaged file is refused
    part = path / "part-000000"
    (part / "part.json").rename(tmp_path / "marker")
    with pytest.raises(BankError, match="not a complete bank part"):
        load_parts(path)
    (tmp_path / "marker").rename(part / "part.json")
    np.save(part / "labels.npy", np.zeros(3, np.int32))
    with pytest.raises(BankError, match="labels.npy is missing, truncated or corrupt"):
        BankPart.load(part)
    # a parts directory without parts.json (staging, or half written) is refused, and never replaced
    (path / "parts.json").unlink()
    with pytest.raises(BankError, match="not a complete bank parts directory"):
        load_parts(path)
    with pytest.raises(BankError, match="not a bank parts directory"):
        save_parts(parts, path, CLASSES, ColorBackbone().describe(), config, overwrite=True)
    with pytest.raises(BankError, match="bank part 0 holds 4-d vectors"):
        FeatureBank.from_parts(parts, CLASSES, {"id": "other", "dim": 8}, config)


def clustered_bank(rng, CLASSES, rows=6000, dim=16, index="IVF16,PQ4", nprobe=4):
    """A bank of `rows` clustered unit vectors (so approximate search has neighbours to find) with random labels."""
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 64, rows)] + 0.3 * rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return FeatureBank(vectors, rng.integers(0, len(CLASSES), rows), CLASSES, {"id": "test/random", "dim": dim},
                       Config(index=index, nprobe=nprobe, index_train_size=3000))


@pytest.mark.parametrize("index, storage, files", [
    ("Flat", "exact", []),
    ("IVF16,Flat", "ivf-lists", ["index.faiss", "ivf_lists.npy"]),
    ("IVF16,PQ4", "codes", ["index.faiss"]),
])
def test_each_index_is_stored_without_a_second_copy_of_the_vectors(rng, tmp_path, CLASSES, index, storage, files):
    from engine.search import create_index

    bank = clustered_bank(rng, CLASSES, index=index)
    path = bank.save(tmp_path / "bank")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["index_storage"] == storage and manifest["version"] == 4
    base = ["kinds.npy", "labels.npy", "manifest.json", "sources.json", "vectors.npy"]
    assert sorted(p.name for p in path.iterdir()) == sorted(base + files)
    if files:  # the index adds its codes (4 bytes a vector here) or lists (8), never the vectors' 64
        assert (path / "index.faiss").stat().st_size < (path / "vectors.npy").stat().st_size / 4
    loaded = FeatureBank.load(path)
    queries = bank.vectors[:50] + 0.01
    for backend in ("faiss", "exact"):
        got, want = (create_index(b, b.config, backend).search(queries, 5) for b in (loaded, bank))
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_quick_verification_checks_sizes_and_ends_full_every_byte(rng, tmp_path, CLASSES, monkeypatch):
    monkeypatch.setattr("engine.bank.storage.HASH_BLOCK", 256)  # so that the bank's vectors.npy has a middle
    bank = clustered_bank(rng, CLASSES, rows=400)
    path = bank.save(tmp_path / "bank")
    record = json.loads((path / "manifest.json").read_text())["files"]["vectors.npy"]
    assert record["block"] == 256 and record["bytes"] > 4 * 256 and {"head_sha256", "tail_sha256"} <= set(record)
    vectors = path / "vectors.npy"
    original = vectors.read_bytes()
    FeatureBank.load(path, verify="full")

    def damaged(offset):
        data = bytearray(original)
        data[offset] ^= 0x01
        vectors.write_bytes(bytes(data))

    damaged(len(original) // 2)  # the middle: only the full check reads it
    FeatureBank.load(path)
    with pytest.raises(BankError, match="vectors.npy is corrupt"):
        FeatureBank.load(path, verify="full")
    with pytest.raises(BankError, match="vectors.npy is corrupt"):
        FeatureBank.verify(path)
    for offset, where in ((200, "first 256 bytes"), (len(original) - 5, "last 256 bytes")):
        damaged(offset)
        for verify in ("quick", "full"):
            with pytest.raises(BankError, match="vectors.npy is corrupt" + (f" in its {where}" * (verify == "quick"))):
                FeatureBank.load(path, verify=verify)
    for data in (original[:-64], original + b"\0" * 64):  # truncated, extended: the size says so
        vectors.write_bytes(data)
        with pytest.raises(BankError, match="vectors.npy is truncated or corrupt"):
            FeatureBank.load(path, verify="quick")
    vectors.write_bytes(original)
    assert FeatureBank.verify(path)["size"] == 400
    with pytest.raises(InputError, match="verify must be one of"):
        FeatureBank.load(path, verify="none")


def test_ondisk_bank_round_trip(rng, tmp_path, CLASSES):
    faiss = pytest.importorskip("faiss")
    from engine.ivf import ondisk_data_file, train_index
    from engine.search import FaissIndex, create_index

    bank = clustered_bank(rng, CLASSES, rows=5000, index="IVF16,PQ4", nprobe=4)
    path = bank.save(tmp_path / "bank", ondisk=True, shard_rows=2000)
    assert sorted(p.name for p in path.iterdir()) == ["index.faiss", "index.ivfdata", "kinds.npy", "labels.npy",
                                                      "manifest.json", "sources.json", "vectors.npy"]
    moved = path.rename(tmp_path / "moved")  # the lists are found beside the index wherever the bank goes
    loaded = FeatureBank.load(moved)
    assert ondisk_data_file(loaded.index) == (moved / "index.ivfdata").absolute()
    # the same trained index, filled in memory, answers exactly the same
    memory = train_index(bank.vectors, bank.config)
    memory.add(bank.vectors)
    queries = bank.vectors[::50] + 0.01
    got = create_index(loaded, loaded.config, "faiss").search(queries, 5)
    want = FaissIndex(bank.vectors, bank.labels, len(CLASSES), bank.config, memory).search(queries, 5)
    assert "on disk" in create_index(loaded, loaded.config, "faiss").describe()
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    again = FeatureBank.load(loaded.save(tmp_path / "copy"))  # re-saved: still on disk, the lists copied
    assert ondisk_data_file(again.index) == (tmp_path / "copy" / "index.ivfdata").absolute()
    np.testing.assert_array_equal(create_index(again, again.config, "faiss").search(queries, 5)[1], got[1])
    data = moved / "index.ivfdata"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(BankError, match="index.ivfdata is truncated"):
        FeatureBank.load(moved)
    with pytest.raises(InputError, match="needs an IVF index"):
        clustered_bank(rng, CLASSES, rows=100, index="Flat").save(tmp_path / "flat", ondisk=True)
    del faiss


def test_verify_bank_command(saved_bank, capsys):
    from engine.cli import main

    _, path = saved_bank
    assert main(["verify-bank", str(path)]) == 0
    assert "all checksums match" in capsys.readouterr().out
    vectors = path / "vectors.npy"
    data = bytearray(vectors.read_bytes())
    data[len(data) // 2] ^= 0x01
    vectors.write_bytes(bytes(data))
    assert main(["verify-bank", str(path)]) == 1
    assert "vectors.npy is corrupt" in capsys.readouterr().err


def test_an_ondisk_bank_saved_in_memory_gets_lists_of_its_own(rng, tmp_path, CLASSES):
    pytest.importorskip("faiss")
    from engine.ivf import ondisk_data_file
    from engine.search import create_index

    bank = clustered_bank(rng, CLASSES, rows=3000)
    loaded = FeatureBank.load(bank.save(tmp_path / "disk", ondisk=True))
    copy = FeatureBank.load(loaded.save(tmp_path / "memory", ondisk=False))
    assert json.loads((tmp_path / "memory" / "manifest.json").read_text())["index_storage"] == "codes"
    assert ondisk_data_file(copy.index) is None and not (tmp_path / "memory" / "index.ivfdata").exists()
    queries = bank.vectors[::30]
    np.testing.assert_array_equal(create_index(copy, copy.config).search(queries, 5)[1],
                                  create_index(loaded, loaded.config).search(queries, 5)[1])


@pytest.mark.parametrize("edit", ["swap class names", "change the config", "rename the backbone", "drop the seal"])
def test_a_manifest_changed_by_hand_is_refused(saved_bank, capsys, edit):
    # the manifest was outside every checksum: class names swapped by hand passed verify-bank and every load
    from engine.bank import SEAL
    from engine.cli import main

    bank, path = saved_bank
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest[SEAL] and FeatureBank.load(path).class_names == bank.class_names
    if edit == "swap class names":
        names = manifest["class_names"]
        names[1], names[2] = names[2], names[1]
    elif edit == "change the config":
        manifest["config"]["top_k"] = 25
    elif edit == "rename the backbone":
        manifest["backbone"]["id"] = "test/other"
    else:
        del manifest[SEAL]
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    message = "is not sealed" if edit == "drop the seal" else "was changed after it was written"
    for verify in ("quick", "full"):
        with pytest.raises(BankError, match=f"manifest.json {message}.*rebuild the bank"):
            FeatureBank.load(path, verify=verify)
    assert main(["verify-bank", str(path)]) == 1
    assert f"manifest.json {message}" in capsys.readouterr().err


def test_a_bank_of_the_unsealed_format_is_refused_with_the_reason(saved_bank):
    _, path = saved_bank
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = 3
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BankError, match=r"version 3, this engine reads version 4 \(its manifest is not sealed.*\); "
                                        "rebuild the bank"):
        FeatureBank.load(path)


def reseal_json(file, change):
    """Change a sealed JSON record and reseal it, as someone forging one would."""
    from engine.bank.storage import sealed

    record = json.loads(file.read_text())
    change(record)
    file.write_text(json.dumps(sealed(record)))


@pytest.mark.parametrize("case, message", [
    ("a part outside the folder", r"part '../outside_part' is not the name of a directory inside"),
    ("a part in a subfolder", r"part 'sub/part-000000' is not the name of a directory inside"),
    ("the folder itself", r"part '\.' is not the name of a directory inside"),
    ("a link out of the folder", r"part 'linked' is not the name of a directory inside"),
    ("a part named by a number", r"part 0 is not the name of a directory inside"),
    ("no parts list", r"parts.json: expected parts \(a list\).*; got parts: missing"),
    ("class names not a list", r"parts.json: expected .*; got class_names: str"),
    ("class names swapped by hand", "parts.json was changed after it was written.*rebuild the parts"),
    ("images of a part edited by hand", "part.json was changed after it was written.*rebuild the parts"),
    ("the unsealed format", r"parts.json: bank parts format version 1, this engine reads version 2 \(.*not sealed"),
])
def test_parts_are_sealed_and_stay_inside_their_folder(rng, toy, CLASSES, ColorBackbone, tmp_path, case, message):
    # parts.json could name ../outside_part (and it was loaded); one without a parts list was a KeyError
    from engine.bank import load_parts, save_parts

    config = Config(min_area=100)
    parts = toy_parts(toy.samples(rng, 3), ColorBackbone, CLASSES, config)
    path = save_parts(parts, tmp_path / "parts", CLASSES, ColorBackbone().describe(), config)
    outside = save_parts(parts, tmp_path / "other", CLASSES, ColorBackbone().describe(), config)
    (outside / "part-000000").rename(tmp_path / "outside_part")
    assert len(load_parts(path)[0]) == len(parts)
    record = path / "parts.json"
    if case == "a part outside the folder":
        reseal_json(record, lambda r: r.__setitem__("parts", ["../outside_part"]))
    elif case == "a part in a subfolder":
        (path / "sub").mkdir()
        (path / "part-000000").rename(path / "sub" / "part-000000")
        reseal_json(record, lambda r: r.__setitem__("parts", ["sub/part-000000"]))
    elif case == "the folder itself":
        reseal_json(record, lambda r: r.__setitem__("parts", ["."]))
    elif case == "a link out of the folder":
        (path / "linked").symlink_to(tmp_path / "outside_part", target_is_directory=True)
        reseal_json(record, lambda r: r.__setitem__("parts", ["linked"]))
    elif case == "a part named by a number":
        reseal_json(record, lambda r: r.__setitem__("parts", [0]))
    elif case == "no parts list":
        reseal_json(record, lambda r: r.pop("parts"))
    elif case == "class names not a list":
        reseal_json(record, lambda r: r.__setitem__("class_names", "background"))
    elif case == "class names swapped by hand":
        edited = json.loads(record.read_text())
        edited["class_names"][1:3] = edited["class_names"][2:0:-1]
        record.write_text(json.dumps(edited))
    elif case == "images of a part edited by hand":
        part = path / "part-000000" / "part.json"
        edited = json.loads(part.read_text())
        edited["images"][0] = "someone-else"
        part.write_text(json.dumps(edited))
    else:
        reseal_json(record, lambda r: r.__setitem__("version", 1))
    with pytest.raises(BankError, match=message):
        load_parts(path)


# ---------------------------------------------------------------------------------------------------------- centring


def centered_reference(vectors, center, groups=()):
    """Centring written from its definition, a row and a layer at a time: the row minus the mean, each layer's part
    L2-normalised, then the whole row (a part or row that is exactly zero stays zero)."""
    bounds = np.cumsum([0, *(groups or [vectors.shape[1]])])
    out = np.zeros(vectors.shape, np.float64)
    for i, row in enumerate(np.asarray(vectors, np.float64) - np.asarray(center, np.float64)):
        for start, stop in zip(bounds[:-1], bounds[1:]):
            norm = np.linalg.norm(row[start:stop])
            out[i, start:stop] = row[start:stop] / norm if norm > 0 else 0.0
        norm = np.linalg.norm(out[i])
        out[i] = out[i] / norm if norm > 0 else 0.0
    return out


@pytest.mark.parametrize("groups", [(), (3, 5, 2), (10,)])
def test_centring_is_its_definition(rng, groups):
    vectors = rng.normal(size=(int(rng.integers(2, 40)), 10)).astype(np.float32)
    center = bank_center(vectors)
    np.testing.assert_allclose(center, vectors.astype(np.float64).mean(axis=0), atol=1e-6)
    vectors[0] = center  # on the mean: a zero row, which stays zero
    vectors[1, :(groups or (10,))[0]] = center[:(groups or (10,))[0]]  # one layer on the mean
    got = centered(vectors, center, groups)
    assert got.dtype == np.float32 and got.shape == vectors.shape
    np.testing.assert_allclose(got, centered_reference(vectors, center, groups), atol=1e-6)
    assert not got[0].any()
    one = centered(vectors[2:3], center, groups)  # one query
    np.testing.assert_allclose(one, centered_reference(vectors[2:3], center, groups), atol=1e-6)
    assert centered(vectors[:0], center, groups).shape == (0, 10)  # no queries
    with pytest.raises(InputError, match="do not sum"):
        centered(vectors, center, (3, 3))


def test_a_centred_bank_keeps_its_center_and_an_old_bank_loads_uncentred(saved_bank, rng, tmp_path):
    from test_bank import rewrite_manifest

    bank, path = saved_bank
    assert bank.config.center_bank and bank.center is not None
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["centered"] is True and "center.npy" in manifest["files"]
    queries = rng.normal(size=(3, bank.dim)).astype(np.float32)
    np.testing.assert_allclose(FeatureBank.load(path).center_queries(queries),
                               centered_reference(queries, bank.center), atol=1e-6)
    (path / "center.npy").unlink()
    with pytest.raises(BankError, match="missing center.npy"):
        FeatureBank.load(path)
    # a bank saved before centring existed: no center_bank in its config, no center.npy, no "centered"
    plain = FeatureBank(bank.vectors, bank.labels, bank.class_names, bank.backbone,
                        bank.config.replace(center_bank=False))
    old = plain.save(tmp_path / "old")
    rewrite_manifest(old, lambda m: (m.pop("centered"), m["config"].pop("center_bank"),
                                     m["config"].pop("superpixel_vote"), m["config"].pop("unsure_margin")))
    loaded = FeatureBank.load(old)
    assert loaded.center is None and not loaded.config.center_bank
    # it paints as the engine that built it did
    assert not loaded.config.superpixel_vote and loaded.config.unsure_margin == 0
    new = FeatureBank.load(plain.save(tmp_path / "new")).config
    assert new.superpixel_vote and new.unsure_margin == 0.2  # a bank that says so keeps it
    assert loaded.center_queries(queries) is queries
    with pytest.raises(BankError, match="center"):
        FeatureBank(bank.vectors, bank.labels, bank.class_names, bank.backbone, bank.config, center=bank.center[:2])


# ---------------------------------------------------------------------------------------------------------- hubness


@pytest.mark.parametrize("neighbours", [1, 3, 12, 40])
def test_hubness_is_its_definition(rng, monkeypatch, neighbours):
    monkeypatch.setattr("engine.bank.hubness.QUERY_ROWS", 7)  # several blocks of rows
    vectors = rng.normal(size=(int(rng.integers(2, 30)), 6)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[-1] = vectors[0]  # an identical pair: each is the other's nearest, at similarity 1
    sims = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    want = [np.sort(np.delete(sims[i], i))[::-1][:neighbours].mean() for i in range(len(vectors))]
    got = hubness(vectors, neighbours)
    assert got.dtype == np.float32 and got.shape == (len(vectors),)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert hubness(vectors[:1], neighbours).tolist() == [0.0] and hubness(vectors[:0], neighbours).shape == (0,)


def test_a_bank_scores_hubness_in_its_search_space_and_the_search_discounts_it(rng, toy, CLASSES, ColorBackbone,
                                                                               tmp_path, monkeypatch):
    from engine.search import create_index
    from test_bank import rewrite_manifest

    bank = FeatureBank.build(toy.samples(rng, 5), ColorBackbone(), CLASSES, Config(min_area=100), progress=False)
    assert bank.config.hub_neighbours == 10
    np.testing.assert_allclose(bank.hubness, hubness(bank.vectors, 10), atol=1e-6)  # of the centred vectors
    np.testing.assert_allclose(bank.search_offsets(), -0.25 * bank.hubness, atol=1e-7)
    assert bank.search_offsets(bank.config.replace(hub_penalty=0)) is None
    assert create_index(bank, bank.config.replace(hub_penalty=0)).offsets is None
    np.testing.assert_allclose(create_index(bank, bank.config).offsets, bank.search_offsets())
    none = FeatureBank.build(toy.samples(rng, 2), ColorBackbone(), CLASSES, Config(min_area=100, hub_neighbours=0),
                             progress=False)
    assert none.hubness is None and none.search_offsets() is None
    loaded = FeatureBank.load(bank.save(tmp_path / "bank"))
    np.testing.assert_array_equal(loaded.hubness, bank.hubness)
    old = none.save(tmp_path / "old")  # a bank from before hubness: no field in its config, no "hubness" key
    rewrite_manifest(old, lambda m: (m.pop("hubness"), m["config"].pop("hub_neighbours")))
    assert FeatureBank.load(old).config.hub_neighbours == 0
    with pytest.raises(BankError, match="hubness"):
        FeatureBank(bank.vectors, bank.labels, bank.class_names, bank.backbone, bank.config, center=bank.center,
                    hubness=bank.hubness[:2])
    monkeypatch.setattr("engine.bank.feature_bank.MAX_HUBNESS_ROWS", 3)  # a bank too large for the exact self-search
    with pytest.warns(UserWarning, match="gets no hubness"):
        large = FeatureBank.build(toy.samples(rng, 2), ColorBackbone(), CLASSES, Config(min_area=100), progress=False)
    assert large.hubness is None and large.config.hub_neighbours == 0 and large.center is not None
