"""engine.pipeline: the Engine end to end with the toy backbone — retrieval names proposals, filters, NMS,
rasterisation, the reference kernels giving the compiled engine's label maps, segment_stream against
segment_batch, and bad input."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time

import numpy as np
import pytest
from PIL import Image

import engine
from engine import Config, Engine, FeatureBank, Proposals
from engine.errors import BankError, InputError, ModelError
from engine.models import ground_truth_proposals


@pytest.fixture
def make_engine(toy_bank, toy):
    def make(**options):
        bank = options.pop("bank", toy_bank)
        # these tests check the painted maps exactly: the boundary refinement after painting is tested on its own
        options.setdefault("config", dataclasses.replace(bank.config, boundary_radius=0))
        return Engine(bank, backbone=options.pop("backbone", toy.ColorBackbone()), **options)

    return make


def scenes(toy, rng, count):
    combos = [(1, 2), (3,), (2, 3), (1,), (1, 3)]
    # two sizes, so batches mix padded sizes
    return [toy.scene(rng, 96 if i % 3 else 80, 128, classes=combos[i % len(combos)]) for i in range(count)]


def assert_same(a, b):
    np.testing.assert_array_equal(a.label_map, b.label_map)
    assert a.label_map.dtype == b.label_map.dtype
    np.testing.assert_array_equal(a.owner, b.owner)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_array_equal(a.proposal_ids, b.proposal_ids)
    np.testing.assert_allclose(a.confidences, b.confidences, rtol=1e-6)
    assert (a.num_proposals, a.num_candidates, a.note) == (b.num_proposals, b.num_candidates, b.note)


# ------------------------------------------------------------------------------------------------ segment_batch


def test_ground_truth_proposals_give_the_ground_truth(make_engine, toy, rng):
    eng = make_engine()
    data = [toy.scene(rng, classes=c) for c in [(1, 2), (3,), (2, 3)]]
    results = eng.segment_batch([s[0] for s in data], [ground_truth_proposals(s[1]) for s in data])
    for (image, label), result in zip(data, results):
        np.testing.assert_array_equal(result.label_map, label)
        assert result.label_map.dtype == np.uint8 and result.owner.shape == label.shape
        assert sorted(result.classes.tolist()) == sorted(set(np.unique(label)) - {0})
        assert np.all(np.diff(result.confidences) <= 0)
        assert result.note == "" and result.num_proposals == result.num_candidates == len(result.classes)


def test_reference_kernels_give_the_compiled_label_maps(make_engine, toy, rng):
    data = scenes(toy, rng, 7)
    images = [image for image, _ in data]
    # ground-truth components, plus overlapping jittered boxes so that NMS and painting order matter
    proposals = []
    for _, label in data:
        gt = ground_truth_proposals(label, include_background=True)
        boxes = np.zeros((6, *label.shape), bool)
        for box in boxes:
            y0, x0 = rng.integers(0, label.shape[0] // 2), rng.integers(0, label.shape[1] // 2)
            box[y0:y0 + rng.integers(20, label.shape[0] // 2 + 20), x0:x0 + rng.integers(20, label.shape[1] // 2)] = 1
        proposals.append(Proposals.from_masks(np.concatenate([gt.masks, boxes]), rng.uniform(0.5, 1, len(gt) + 6)))
    compiled = make_engine()
    reference = make_engine(kernels="reference")
    assert compiled.describe()["kernels"] == "engine.ops" and reference.describe()["kernels"] == "engine.reference"
    assert reference.describe()["search"] == "numpy-exact, hubness penalty"
    assert compiled.describe()["search"] == "numpy-flat (BLAS), hubness penalty"
    want = compiled.segment_batch(images, proposals)
    assert sum(len(r.classes) for r in want) > len(want)  # something was named
    for a, b in zip(reference.segment_batch(images, proposals), want):
        assert_same(a, b)
    with pytest.raises(InputError, match="kernels must be one of"):
        make_engine(kernels="cuda")


def test_mixed_sizes_and_single_image(make_engine, toy, rng):
    eng = make_engine()
    small, large = toy.scene(rng, 60, 70), toy.scene(rng, 100, 150)
    results = eng.segment_batch([small[0], large[0]],
                                [ground_truth_proposals(small[1]), ground_truth_proposals(large[1])])
    assert results[0].label_map.shape == (60, 70) and results[1].label_map.shape == (100, 150)
    single = eng.segment(large[0], ground_truth_proposals(large[1]))
    np.testing.assert_array_equal(single.label_map, results[1].label_map)
    assert eng.segment_batch([]) == []


def test_no_proposals_is_all_background_and_said(make_engine, toy, rng):
    image, _ = toy.scene(rng)
    result = make_engine().segment(image, Proposals.empty(*image.shape[:2]))
    assert not result.label_map.any() and len(result.classes) == 0 and "no proposals" in result.note
    assert (result.owner == -1).all() and result.num_proposals == 0


def test_objectness_and_area_filters(make_engine, toy, toy_bank, rng):
    image, label = toy.scene(rng, classes=(1,))
    proposals = ground_truth_proposals(label)
    eng = make_engine()
    low = Proposals(proposals.atoms, proposals.members, np.full(len(proposals), 0.59))
    result = eng.segment(image, low)
    assert "filters" in result.note and result.num_candidates == 0 and result.num_proposals == len(proposals)
    at_threshold = eng.segment(image, Proposals(proposals.atoms, proposals.members, np.full(len(proposals), 0.6)))
    np.testing.assert_array_equal(at_threshold.label_map, label)  # objectness >= tau_obj passes
    tiny = np.zeros((1,) + label.shape, bool)
    tiny[0, :10, :10] = True  # 100 px < 300 px
    result = make_engine(config=toy_bank.config.replace(min_area=300)).segment(image, Proposals.from_masks(tiny, [1]))
    assert result.num_candidates == 0 and not result.label_map.any()
    exactly = make_engine(config=toy_bank.config.replace(min_area=100)).segment(image, Proposals.from_masks(tiny, [1]))
    assert exactly.num_candidates == 1  # area >= min_area passes


def test_background_proposal_is_dropped(make_engine, toy, rng):
    image, label = toy.scene(rng, classes=(2,))
    proposals = ground_truth_proposals(label, include_background=True)
    result = make_engine().segment(image, proposals)
    np.testing.assert_array_equal(result.label_map, label)
    assert 0 not in result.classes and result.num_candidates == 2 and len(result.classes) == 1


def test_every_proposal_voted_background_is_said(make_engine, toy, rng):
    image, label = toy.scene(rng, classes=(2,))
    proposals = Proposals.from_labels(label.astype(np.int32), [0])
    result = make_engine().segment(image, proposals)
    assert "voted background" in result.note and not result.label_map.any()


def test_nms_suppresses_duplicate_and_owner_points_to_input_index(make_engine, toy, rng):
    image, label = toy.scene(rng, classes=(1,))
    mask = label == 1
    nearly = mask.copy()
    nearly[np.flatnonzero(mask.any(1))[0]] = False  # drop one row: IoU ~ 0.98 with `mask`
    empty = np.zeros_like(mask)
    result = make_engine().segment(image, Proposals.from_masks(np.stack([empty, nearly, mask]), [1.0, 1.0, 1.0]))
    assert len(result.classes) == 1 and result.num_candidates == 2
    kept = int(result.proposal_ids[0])
    assert kept in (1, 2)
    assert set(np.unique(result.owner[result.label_map > 0])) == {kept}  # input indices, not candidate indices
    assert (result.owner[result.label_map == 0] == -1).all()


def test_label_map_is_int32_beyond_256_classes(toy_bank, make_engine, toy, rng):
    names = toy_bank.class_names + tuple(f"extra{i}" for i in range(300))
    wide = FeatureBank(toy_bank.vectors, toy_bank.labels, names, toy_bank.backbone, toy_bank.config,
                       center=toy_bank.center)
    image, label = toy.scene(rng, classes=(1, 3))
    result = make_engine(bank=wide).segment(image, ground_truth_proposals(label))
    assert result.label_map.dtype == np.int32
    np.testing.assert_array_equal(result.label_map, label)


def test_bad_inputs(make_engine, toy, rng):
    eng = make_engine()
    image, label = toy.scene(rng)
    proposals = ground_truth_proposals(label)
    for bad, message in [(image[..., 0], "grayscale"), (np.dstack([image, image[..., :1]]), "RGBA"),
                         (image.astype(np.float32), "uint8"), (image[:0], "empty"), ("x.jpg", "cannot read image x.jpg"),
                         ([1, 2, 3], "numpy array")]:
        with pytest.raises(InputError, match=message):
            eng.segment(bad, proposals)
    with pytest.raises(InputError, match=r"proposals\[0\]: atoms of shape \(96, 127\), the image is \(96, 128\)"):
        eng.segment(image, Proposals(proposals.atoms[:, :-1], proposals.members, proposals.objectness))
    with pytest.raises(InputError, match="expected engine.Proposals, got ndarray"):
        eng.segment(image, proposals.masks)
    with pytest.raises(InputError, match="proposal sets"):
        eng.segment_batch([image, image], [proposals])
    with pytest.raises(InputError, match="no proposals given"):
        make_engine(proposer=None).segment(image)
    with pytest.raises(InputError, match="unknown proposer"):
        make_engine(proposer="sam").segment(image)
    with pytest.raises(BankError, match="test/other"):
        make_engine(backbone=toy.ColorBackbone(id="test/other"))


def test_devices_are_checked(make_engine):
    with pytest.raises(InputError, match="device must be"):
        make_engine(device="tpu")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_gpu.py runs the engine on it")
    with pytest.raises(ModelError, match="sees no CUDA GPU"):
        make_engine(device="cuda")


def test_proposer_returning_the_wrong_count_is_a_model_error(make_engine, toy, rng):
    class Short:
        name = "short"

        def propose(self, images):
            return []

    image, _ = toy.scene(rng)
    with pytest.raises(ModelError, match="returned 0 proposal sets for 1 images"):
        make_engine(proposer=Short()).segment(image)


def test_module_level_segment_batch_with_bank_directory(toy_bank, toy, rng, tmp_path, monkeypatch):
    path = toy_bank.save(tmp_path / "bank")
    exact = Config(boundary_radius=0)  # the painted map itself
    monkeypatch.setattr("engine.models.create_backbone", lambda name, **kw: toy.ColorBackbone(id=name))
    image, label = toy.scene(rng, classes=(3,))
    results = engine.segment_batch([image], path, proposals=[ground_truth_proposals(label)], config=exact)
    np.testing.assert_array_equal(results[0].label_map, label)
    assert results[0].class_summary().keys() == {"background", "blue"}
    # an in-memory bank works the same
    again = engine.segment_batch([image], toy_bank, proposals=[ground_truth_proposals(label)], proposer=None,
                                 config=exact)
    np.testing.assert_array_equal(again[0].label_map, label)
    # a bank replaced on disk is served as replaced, not from the cached engine
    from engine import pipeline

    other = FeatureBank(toy_bank.vectors, np.where(toy_bank.labels == 3, 1, toy_bank.labels), toy_bank.class_names,
                        toy_bank.backbone, toy_bank.config, center=toy_bank.center)
    other.save(path, overwrite=True)
    replaced = engine.segment_batch([image], path, proposals=[ground_truth_proposals(label)], config=exact)
    assert set(np.unique(replaced[0].label_map)) == {0, 1}  # blue regions are now named red
    for i in range(pipeline.CACHED_ENGINES + 2):  # the cache stays bounded
        engine.segment_batch([image], path, proposals=[ground_truth_proposals(label)], config=Config(top_k=i + 1))
    assert len(pipeline._ENGINES) == pipeline.CACHED_ENGINES


def test_nan_or_misshapen_features_are_a_clear_error(make_engine, toy, rng):
    class Broken(toy.ColorBackbone):
        def __init__(self, damage):
            super().__init__()
            self.damage = damage

        def features(self, images):
            out = super().features(images)
            if self.damage == "nan":
                out[0][0, 0, 0] = np.nan
            else:
                out[0] = out[0][:-1]
            return out

    image, label = toy.scene(rng)
    for damage, message in (("nan", "NaN"), ("shape", "expected")):
        with pytest.raises(ModelError, match=message):
            make_engine(backbone=Broken(damage)).segment(image, ground_truth_proposals(label))


# ----------------------------------------------------------------------------------------------- segment_stream


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_stream_equals_batch_in_order(make_engine, toy, rng, batch_size):
    data = scenes(toy, rng, 11)
    eng = make_engine()
    proposals = [ground_truth_proposals(label) for _, label in data]
    expected = eng.segment_batch([image for image, _ in data], proposals)
    got = list(eng.segment_stream(zip([image for image, _ in data], proposals), batch_size=batch_size))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert_same(a, b)


def test_stream_decodes_paths_and_uses_the_proposer(make_engine, toy, rng, tmp_path):
    data = scenes(toy, rng, 5)
    paths = []
    for i, (image, _) in enumerate(data):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])

    class LookupProposer:  # ground truth by image content: stands in for a real proposer
        name = "lookup"

        def propose(self, images):
            return [ground_truth_proposals(next(label for im, label in data if np.array_equal(im, image)))
                    for image in images]

    eng = make_engine(proposer=LookupProposer())
    expected = eng.segment_batch([image for image, _ in data])
    # paths, str paths and arrays mixed; some with explicit proposals, some left to the proposer
    items = [paths[0], str(paths[1]), (data[2][0], None), (paths[3], ground_truth_proposals(data[3][1])), data[4][0]]
    got = list(eng.segment_stream(items, batch_size=2))
    assert len(got) == 5
    for a, b in zip(got, expected):
        assert_same(a, b)
    assert {"decode", "proposer", "filter", "backbone", "smfa", "search", "nms_raster"} <= set(eng.times.seconds)
    eng.times.reset()
    assert not eng.times.seconds


def test_stream_memory_is_bounded_and_close_stops_threads(make_engine, toy, rng):
    image, label = toy.scene(rng, classes=(1, 2))
    proposals = ground_truth_proposals(label)
    pulled = itertools.count()
    pulled_so_far = [0]

    def endless():
        while True:
            pulled_so_far[0] = next(pulled) + 1
            yield image, proposals

    before = threading.active_count()
    batch_size, prefetch = 2, 1
    stream = make_engine().segment_stream(endless(), batch_size=batch_size, prefetch=prefetch)
    first = next(stream)
    np.testing.assert_array_equal(first.label_map, label)
    time.sleep(0.5)  # let the stages fill every queue
    # the loader's chunk in hand + 3 queues + one batch in each of two stages + the batch being yielded
    bound = batch_size * (3 * prefetch + 4)
    assert 0 < pulled_so_far[0] <= bound
    stream.close()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_stream_raises_the_bad_input_and_stops(make_engine, toy, rng):
    data = scenes(toy, rng, 4)
    items = [(image, ground_truth_proposals(label)) for image, label in data]
    items[2] = (data[2][0][..., 0], items[2][1])  # grayscale
    eng = make_engine()
    stream = eng.segment_stream(items, batch_size=2)
    assert len([next(stream), next(stream)]) == 2
    with pytest.raises(InputError, match="grayscale"):
        next(stream)
    with pytest.raises(InputError, match="prefetch"):
        list(eng.segment_stream(items, prefetch=0))


def test_empty_stream_and_no_candidates(make_engine, toy, rng):
    eng = make_engine()
    assert list(eng.segment_stream([])) == []
    image, _ = toy.scene(rng)
    result = next(eng.segment_stream([(image, Proposals.empty(*image.shape[:2]))]))
    assert "no proposals" in result.note and not result.label_map.any()


def test_on_error_skip_keeps_the_good_items_in_order(make_engine, toy, rng, tmp_path):
    from PIL import Image

    from engine.batches import Skipped

    eng = make_engine()
    data = scenes(toy, rng, 5)
    path = tmp_path / "scene.png"
    Image.fromarray(data[1][0]).save(path)
    items = [data[0][0], str(path), "missing.jpg", data[3][0][..., 0], data[4][0]]  # file, missing, grayscale
    proposals = [ground_truth_proposals(label) for _, label in data]
    with pytest.raises(InputError, match="cannot read image missing.jpg"):
        eng.segment_batch(items, proposals)
    got = eng.segment_batch(items, proposals, on_error="skip")
    want = eng.segment_batch([data[i][0] for i in (0, 1, 4)], [proposals[i] for i in (0, 1, 4)])
    assert [type(r).__name__ for r in got] == ["Result", "Result", "Skipped", "Skipped", "Result"]
    assert got[2] == Skipped(2, "missing.jpg", got[2].reason) and "cannot read image" in got[2].reason
    assert got[3].index == 3 and "grayscale" in got[3].reason and got[3].item.startswith("array uint8")
    for a, b in zip([got[0], got[1], got[4]], want):
        np.testing.assert_array_equal(a.label_map, b.label_map)
    streamed = list(eng.segment_stream(zip(items, proposals), batch_size=2, on_error="skip"))
    assert [getattr(r, "index", None) for r in streamed] == [None, None, 2, 3, None]  # global indices, not in-batch
    items[2] = data[2][0]
    with pytest.raises(InputError, match=r"images\[3\]: grayscale"):  # the index in the stream, not in its batch
        list(eng.segment_stream(zip(items, proposals), batch_size=2))
    with pytest.raises(InputError, match="on_error must be one of"):
        eng.segment_batch(items, proposals, on_error="ignore")


def test_bgr_arrays_long_lists_and_the_size_limit(make_engine, toy, rng):
    eng = make_engine()
    data = scenes(toy, rng, 9)  # more than batch_size: segmented in chunks
    images, proposals = [image for image, _ in data], [ground_truth_proposals(label) for _, label in data]
    rgb = eng.segment_batch(images, proposals)
    bgr = eng.segment_batch([image[..., ::-1].copy() for image in images], proposals, channel_order="BGR")
    assert len(rgb) == 9
    for a, b in zip(rgb, bgr):
        np.testing.assert_array_equal(a.label_map, b.label_map)
    small = make_engine(config=eng.config.replace(max_image_pixels=1000))
    with pytest.raises(InputError, match="over Config.max_image_pixels"):
        small.segment(images[0], proposals[0])


def test_result_records_are_the_painted_segments(make_engine, toy, rng):
    import json

    from engine.utils import rle_decode

    image, label = toy.scene(rng, classes=(1, 2))
    result = make_engine().segment(image, ground_truth_proposals(label))
    record = json.loads(json.dumps(result.to_dict()))  # JSON-ready
    assert (record["height"], record["width"]) == label.shape and record["note"] == result.note
    assert 0 < len(record["segments"]) <= len(result.classes)
    painted = np.zeros(label.shape, np.int64)
    for segment in record["segments"]:
        mask = rle_decode(segment["segmentation"])
        assert segment["area"] == mask.sum() and segment["class"] == result.class_names[segment["class_id"]]
        x, y, w, h = segment["bbox"]
        assert mask[y:y + h, x:x + w].sum() == mask.sum()
        np.testing.assert_array_equal(result.label_map[mask], segment["class_id"])
        painted += mask
    assert painted.max() == 1 and (painted == 1).sum() == (result.owner >= 0).sum()


def test_segments_keep_only_what_was_painted_in_every_output_mode(rng):
    """A kept proposal painted over entirely by more confident ones has no record (it painted nothing); masks come
    as bool arrays, uncompressed RLE or COCO's compressed RLE (pycocotools decodes it)."""
    from engine.batches import Result
    from engine.utils import rle_decode

    owner = np.full((40, 60), -1, np.int32)
    owner[5:20, 10:50], owner[25:38, 3:30] = 7, 2  # proposal 4 was kept but every pixel of it went to 7 first
    label_map = np.select([owner == 7, owner == 2], [1, 3], 0).astype(np.uint8)
    result = Result(label_map, classes=np.array([1, 2, 3]), confidences=np.array([0.9, 0.8, 0.7], np.float32),
                    proposal_ids=np.array([7, 4, 2]), owner=owner, num_proposals=9, num_candidates=5,
                    class_names=("background", "a", "b", "c"))
    segments = result.segments()
    assert [s["proposal_id"] for s in segments] == [7, 2] and [s["area"] for s in segments] == [600, 351]
    for mode in ("binary_mask", "coco_rle"):
        for plain, other in zip(segments, result.segments(mode)):
            mask = other["segmentation"]
            if mode == "coco_rle":
                coco = pytest.importorskip("pycocotools.mask")
                assert isinstance(mask["counts"], str)
                mask = coco.decode({"size": mask["size"], "counts": mask["counts"].encode()}).astype(bool)
            np.testing.assert_array_equal(mask, rle_decode(plain["segmentation"]))
            np.testing.assert_array_equal(mask, owner == plain["proposal_id"])
    assert len(result.to_dict("coco_rle")["segments"]) == 2
    with pytest.raises(InputError, match="not JSON"):
        result.to_dict("binary_mask")
    with pytest.raises(InputError, match="output_mode must be one of"):
        result.segments("polygons")


def test_threads_sharing_one_engine_get_what_each_would_alone(make_engine, toy, rng):
    data = scenes(toy, rng, 6)
    images = [image for image, _ in data]
    alone = make_engine().segment_batch(images)  # the embedded proposer on the toy features
    shared = make_engine()  # its proposer is made lazily, by whichever thread asks first
    outputs, errors = {}, []

    def work(k):
        try:
            outputs[k] = shared.segment_batch(images)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and len(outputs) == 4
    for results in outputs.values():
        for a, b in zip(results, alone):
            assert_same(a, b)


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (1, 5000), (3, 5000), (5000, 1)])
def test_tiny_and_extreme_aspect_images_return_at_once(make_engine, rng, shape):
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    finished = []
    thread = threading.Thread(target=lambda: finished.append(make_engine().segment(image)), daemon=True)
    thread.start()
    thread.join(60)  # a hang guard, not a timing assertion
    assert finished, "the engine did not return"
    result = finished[0]
    assert result.label_map.shape == shape and (result.note or len(result.classes))


class CountingKernels:
    """engine._C behind a counter: how many calls each entry point gets (each call is one launch sequence)."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, {}

    def __getattr__(self, name):
        target = getattr(self.real, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return target(*args, **kwargs)

        return counted


@pytest.mark.parametrize("images, proposals_each", [(1, 1), (8, 1), (8, 12), (16, 40)])
def test_one_call_per_op_per_batch_whatever_the_images_and_proposals(make_engine, toy, rng, monkeypatch, images,
                                                                     proposals_each):
    from engine import ops

    data = scenes(toy, rng, images)
    proposals = []
    for image, label in data:  # the ground-truth regions plus random blocks: many overlapping proposals
        masks = [label == c for c in np.unique(label)]
        for _ in range(proposals_each):
            mask = np.zeros(label.shape, bool)
            y, x = rng.integers(0, 60), rng.integers(0, 90)
            mask[y:y + 30, x:x + 30] = True
            masks.append(mask)
        proposals.append(Proposals.from_masks(np.stack(masks), np.ones(len(masks), np.float32)))
    counting = CountingKernels(ops._C)
    monkeypatch.setattr(ops._core, "_C", counting)  # where every face looks the extension up
    eng = make_engine(config=Config(batch_size=images))
    results = eng.segment_batch([image for image, _ in data], proposals)
    assert len(results) == images
    assert counting.calls == {"soft_mask_pool": 1, "top_k": 1, "vote": 1, "mask_nms_raster": 1}


def test_any_error_reading_one_item_is_recorded_and_the_batch_goes_on(make_engine, toy, rng, tmp_path, monkeypatch,
                                                                     broken_png):
    # a PNG whose chunk made PIL raise SyntaxError once escaped on_error="skip": the good images of its batch lost
    import struct

    import engine.data
    from engine.batches import Skipped

    eng = make_engine()
    data = scenes(toy, rng, 4)
    good, broken, odd = tmp_path / "good.png", tmp_path / "broken.png", tmp_path / "odd.png"
    Image.fromarray(data[1][0]).save(good)
    broken.write_bytes(broken_png(data[2][0]))
    Image.fromarray(data[3][0]).save(odd)
    items = [data[0][0], str(good), str(broken), str(odd)]
    proposals = [ground_truth_proposals(label) for _, label in data]
    read = engine.data.load_image

    def load_image(path):
        if str(path) == str(odd):
            raise struct.error("unpack requires a buffer of 4 bytes")  # not an InputError: still this item's
        return read(path)

    monkeypatch.setattr(engine.data, "load_image", load_image)
    for got in (eng.segment_batch(items, proposals, on_error="skip"),
                list(eng.segment_stream(zip(items, proposals), batch_size=4, on_error="skip"))):
        assert [type(r).__name__ for r in got] == ["Result", "Result", "Skipped", "Skipped"]
        assert got[2] == Skipped(2, str(broken), got[2].reason)
        assert "cannot read image" in got[2].reason and "SyntaxError" in got[2].reason
        assert got[3].index == 3 and got[3].reason == "error: unpack requires a buffer of 4 bytes"
        want = eng.segment_batch([data[0][0], data[1][0]], proposals[:2])
        for a, b in zip(got[:2], want):
            assert_same(a, b)
    with pytest.raises(InputError, match=r"cannot read image .*broken.png: SyntaxError"):
        eng.segment_batch(items[:3], proposals[:3])
    with pytest.raises(struct.error):  # on_error="raise": the item's own error, as it was raised
        eng.segment_batch(items[3:], proposals[3:])
    monkeypatch.setattr(engine.data, "load_image", lambda path: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):  # the process's trouble, not the item's: never a Skipped record
        eng.segment_batch([str(good)], proposals[1:2], on_error="skip")


def test_a_single_path_is_refused_not_read_a_character_at_a_time(make_engine, toy_bank, tmp_path):
    # a str once became one Skipped record per character
    from pathlib import Path

    eng = make_engine()
    for images in ("photo.jpg", Path("photo.jpg"), b"photo.jpg"):
        with pytest.raises(InputError, match=r"single path 'photo.jpg'; wrap it in a list: \['photo.jpg'\]"):
            eng.segment_batch(images, on_error="skip")
        with pytest.raises(InputError, match="wrap it in a list"):
            eng.segment_stream(images, on_error="skip")
    with pytest.raises(InputError, match=r"images: expected a sequence of images, got the single path"):
        engine.segment_batch(str(tmp_path / "photo.jpg"), toy_bank, proposer=None, on_error="skip")
    image = np.zeros((48, 64, 3), np.uint8)  # one image: once read as 48 grayscale rows, each skipped
    for run in (eng.segment_batch, eng.segment_stream):
        with pytest.raises(InputError, match=r"single uint8 array of shape \(48, 64, 3\); wrap it in a list"):
            run(image, on_error="skip")


def test_paper_settings_normalise_the_pooled_vector_once(toy, rng):
    """Config.paper() with a multi-layer backbone: the pooled vector is L2-normalised once, as the paper does (not each
    layer on its own, the engine's default); bank and queries must be pooled alike, so an engine refuses the other."""
    class Layered(toy.ColorBackbone):
        groups = (3, 1)  # colour, constant: two "layers" of very different norms

    backbone = Layered(id="test/layered")
    samples = toy.samples(rng, 4)
    paper = FeatureBank.build(samples, backbone, toy.CLASSES, Config.paper(min_area=100), progress=False)
    ours = FeatureBank.build(samples, backbone, toy.CLASSES, Config(min_area=100, center_bank=False), progress=False)
    for bank, per_layer in ((ours, True), (paper, False)):
        vectors = np.asarray(bank.vectors)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
        colour, constant = np.linalg.norm(vectors[:, :3], axis=1), np.linalg.norm(vectors[:, 3:], axis=1)
        assert np.allclose(colour, constant, rtol=1e-4) == per_layer
    with pytest.raises(InputError, match="normalize_layers"):
        Engine(paper, backbone=backbone, config=Config(min_area=100, center_bank=False))
    image, label = toy.scene(rng, classes=(1, 3))
    result = Engine(paper, backbone=backbone).segment(image, ground_truth_proposals(label))
    assert set(np.unique(result.label_map)) <= {0, 1, 3} and result.classes.size


def test_bank_building_fields_an_engine_cannot_apply_are_warned(toy_bank, toy):
    """Config fields the bank fixes (erosion, outlier ratios, region entries, ...) given to an Engine were silently
    ignored: now a warning names them and the bank's values."""
    with pytest.warns(UserWarning, match=r"outlier_ratio=0\.5 ignored: the bank was built with outlier_ratio="):
        Engine(toy_bank, backbone=toy.ColorBackbone(), config=toy_bank.config.replace(outlier_ratio=0.5))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(toy_bank, backbone=toy.ColorBackbone(), config=toy_bank.config.replace(top_k=1))  # inference knobs


# ------------------------------------------------------------------------------------------- boundary refinement


class _TruthProposer:
    """A proposer that proposes each known scene's ground-truth regions: the engine's own regions, to refine."""

    name, uses_features = "truth", False

    def __init__(self, data):
        self.truth = {image.tobytes(): label for image, label in data}

    def propose(self, images):
        return [ground_truth_proposals(self.truth[image.tobytes()]) for image in images]


def test_refinement_snaps_the_proposers_regions_and_frees_changed_pixels(make_engine, toy, rng):
    from engine.boundaries import snap_to_edges

    data = [toy.scene(rng, classes=c) for c in [(1, 2), (3,), (2, 3)]]
    images = [s[0] for s in data]
    painted = make_engine(proposer=_TruthProposer(data)).segment_batch(images)
    config = dataclasses.replace(make_engine().config, boundary_radius=8)
    refined = make_engine(config=config, proposer=_TruthProposer(data)).segment_batch(images)
    changed = 0
    for image, before, after in zip(images, painted, refined):
        expected = snap_to_edges(before.label_map, image, 8, config.boundary_eps)
        np.testing.assert_array_equal(after.label_map, expected)
        moved = after.label_map != before.label_map
        changed += int(moved.sum())
        np.testing.assert_array_equal(after.owner[moved], -1)  # no segment keeps a pixel of another class
        np.testing.assert_array_equal(after.owner[~moved], before.owner[~moved])
        for segment in after.segments("binary_mask"):
            assert (after.label_map[segment["segmentation"]] == segment["class_id"]).all()
    assert changed  # the toy rectangles' corners are rounded at this radius: the test sees a change
    # proposals the caller gives are painted as given
    given = make_engine(config=config).segment_batch(images, [ground_truth_proposals(s[1]) for s in data])
    for before, result in zip(painted, given):
        np.testing.assert_array_equal(result.label_map, before.label_map)


class _NestedBlocksProposer:
    """Nested regions as a merge tree's cuts give them: a 4 x 4 grid of blocks (the atoms; proposed alone when
    `singles`), each row of blocks but the last (so that its atoms are covered by larger regions only), the halves
    of the image and the whole image."""

    def __init__(self, singles: bool = True):
        self.singles = singles

    def propose(self, images):
        out = []
        for image in images:
            height, width = image.shape[:2]
            atoms = ((np.arange(height)[:, None] * 4 // height) * 4 + np.arange(width)[None, :] * 4 // width)
            grid = np.arange(16).reshape(4, 4)
            regions = [grid == a for a in range(16)] if self.singles else []
            regions += [grid // 4 == r for r in range(3)] + [grid // 8 == 0, grid // 8 == 1, grid >= 0]
            members = np.stack([r.reshape(-1) for r in regions])
            out.append(Proposals(atoms.astype(np.int32), members, np.ones(len(members), np.float32)))
        return out


def test_superpixel_vote_repaints_each_atom_by_the_regions_that_contain_it(make_engine, toy, rng, monkeypatch):
    """Config.superpixel_vote against the paper's painting of the same regions: the shares the vote sums are the
    search's own (checked against the loop from their definition), each covered atom takes the class of the loop's
    summed shares, the rest of the map is the painting's, and a pixel whose class changed is no segment's."""
    import engine.pipeline
    from test_retrieval import shares_loop, superpixel_loop

    data = scenes(toy, rng, 6)
    images = [image for image, _ in data]
    paper = make_engine(proposer=_NestedBlocksProposer())
    paper.config = dataclasses.replace(paper.config, superpixel_vote=False)
    painted = paper.segment_batch(images)
    voting = make_engine(proposer=_NestedBlocksProposer())
    assert voting.config.superpixel_vote
    voting.config = dataclasses.replace(voting.config, unsure_margin=0.0)  # the sum alone (the next test: the rest)
    searched, summed, voted = _record_vote(voting, monkeypatch)
    results = voting.segment_batch(images)
    sims, rows = (np.concatenate(parts) for parts in zip(*searched))  # one search a batch
    config = voting.config
    want_shares = shares_loop(sims, voting.index.neighbour_labels(rows), len(toy.CLASSES), config.vote,
                              temperature=config.vote_temperature)
    np.testing.assert_allclose(np.concatenate([shares for _, shares in summed]), want_shares, rtol=1e-5, atol=1e-6)
    changed = 0
    for image, before, after, (members, shares), atom_classes in zip(images, painted, results, summed, voted):
        np.testing.assert_array_equal(atom_classes, superpixel_loop(members, shares))
        atoms = _NestedBlocksProposer().propose([image])[0].atoms
        want = np.where(atom_classes[atoms] >= 0, atom_classes[atoms], before.label_map)
        np.testing.assert_array_equal(after.label_map, want)
        moved = after.label_map != before.label_map
        np.testing.assert_array_equal(after.owner, np.where(moved, -1, before.owner))
        changed += int(moved.sum())
    assert changed  # the halves and the whole image straddle the toy objects: some block's class moves
    # proposals the caller gives are painted as given
    given = [_NestedBlocksProposer().propose([image])[0] for image in images]
    for a, b in zip(paper.segment_batch(images, given), voting.segment_batch(images, given)):
        np.testing.assert_array_equal(a.label_map, b.label_map)


def _record_vote(engine_, monkeypatch):
    """Records an engine's searches, (members, shares) of each image's `atom_shares` and each image's atom classes
    (`superpixel_classes`), as the pipeline calls them."""
    import engine.pipeline

    searched, summed, voted = [], [], []
    search = engine_.index.search
    engine_.index.search = lambda queries, k: searched.append(search(queries, k)) or searched[-1]
    sums, classes = engine.pipeline.atom_shares, engine.pipeline.superpixel_classes
    monkeypatch.setattr(engine.pipeline, "atom_shares",
                        lambda members, shares: summed.append((members, shares)) or sums(members, shares))
    monkeypatch.setattr(engine.pipeline, "superpixel_classes",
                        lambda atoms_summed: voted.append(classes(atoms_summed)) or voted[-1])
    return searched, summed, voted


def test_unsure_superpixels_are_searched_on_their_own(make_engine, toy, rng, monkeypatch):
    """Config.unsure_margin: the atoms whose summed shares are unsure (the loop's rule) are searched alone, in one
    more search for the batch, and their own shares join the sum (the loop's classes); margin 0 asks none."""
    from test_retrieval import shares_loop, superpixel_loop, unsure_loop

    images = [image for image, _ in scenes(toy, rng, 4)]
    for margin in (0.0, 0.4, 1.0):
        voting = make_engine(proposer=_NestedBlocksProposer(singles=False))
        voting.config = dataclasses.replace(voting.config, unsure_margin=margin)
        searched, summed, voted = _record_vote(voting, monkeypatch)
        voting.segment_batch(images)
        assert len(searched) == (2 if margin else 1)  # one more search for the whole batch
        config, num_classes = voting.config, len(toy.CLASSES)
        assert config.min_area <= 300 and images[0].shape[0] * images[0].shape[1] // 16 >= 300  # blocks are asked
        areas = [_NestedBlocksProposer().propose([image])[0].atom_areas() for image in images]
        asked = [unsure_loop(superpixel_sum(members, shares), margin, area, config.min_area) if margin else None
                 for (members, shares), area in zip(summed, areas)]
        own = np.zeros((0, num_classes))
        if margin:
            sims, rows = searched[1]
            assert len(sims) == sum(a.sum() for a in asked)  # one query an unsure atom
            own = shares_loop(sims, voting.index.neighbour_labels(rows), num_classes, config.vote,
                              temperature=config.vote_temperature)
        start = 0
        for (members, shares), atom_classes, a in zip(summed, voted, asked):
            per_atom = [None] * members.shape[1]
            for atom in (np.flatnonzero(a) if a is not None else []):
                per_atom[atom], start = own[start], start + 1
            np.testing.assert_array_equal(atom_classes, superpixel_loop(members, shares, per_atom))
        assert margin < 1 or all(a.all() for a in asked)
        monkeypatch.undo()


def superpixel_sum(members, shares):
    """Each atom's shares summed over the candidates that contain it, by a loop."""
    return np.array([shares[members[:, atom]].sum(axis=0) for atom in range(members.shape[1])])


def test_unpainted_pixels_are_filled_only_without_a_background_class(toy_bank, toy, rng):
    no_background = FeatureBank(toy_bank.vectors[toy_bank.labels != 0], toy_bank.labels[toy_bank.labels != 0],
                                toy_bank.class_names, toy_bank.backbone, toy_bank.config, center=toy_bank.center,
                                hubness=toy_bank.hubness[toy_bank.labels != 0])
    image, label = toy.scene(rng, classes=(1, 3))
    proposer = _TruthProposer([(image, label)])  # the grey background is no region: it stays unpainted
    exact = Config(boundary_radius=0, unsure_margin=0.0)  # unsure_margin would name it by its own query

    def segment(bank, config, **kwargs):
        return Engine(bank, backbone=toy.ColorBackbone(), config=config, proposer=proposer).segment_batch([image],
                                                                                                          **kwargs)[0]

    filled = segment(no_background, exact)
    assert (filled.label_map != 0).all() and (filled.owner[label == 0] == -1).all()
    np.testing.assert_array_equal(filled.label_map[label != 0], label[label != 0])
    np.testing.assert_array_equal(segment(no_background, exact.replace(fill_unpainted=False)).label_map, label)
    np.testing.assert_array_equal(segment(toy_bank, exact).label_map, label)
    # the same regions given by the caller are painted as given: what they leave unpainted stays background
    given = segment(no_background, exact, proposals=[ground_truth_proposals(label)])
    np.testing.assert_array_equal(given.label_map, label)


def test_a_centred_bank_is_searched_with_queries_centred_on_its_mean(toy, rng):
    """Config.center_bank (the default): the bank's vectors are moved off their mean and normalised again, each layer
    and then the whole, and every query is moved off the same mean before its search; checked against the rule
    written out in NumPy from SMFA's own vectors."""
    from engine.reference import soft_mask_pool_reference
    from test_bank import centered_reference

    class Layered(toy.ColorBackbone):
        groups = (2, 2)

    backbone = Layered(id="test/layered")
    samples = toy.samples(rng, 5)
    plain = FeatureBank.build(samples, backbone, toy.CLASSES, Config(min_area=100, center_bank=False), progress=False)
    bank = FeatureBank.build(samples, backbone, toy.CLASSES, Config(min_area=100), progress=False)
    assert plain.center is None and bank.config.center_bank
    np.testing.assert_allclose(bank.center, np.asarray(plain.vectors, np.float64).mean(0), atol=1e-6)
    np.testing.assert_allclose(bank.vectors, centered_reference(plain.vectors, bank.center, (2, 2)), atol=1e-5)
    np.testing.assert_array_equal(bank.labels, plain.labels)

    image, label = toy.scene(rng, classes=(1, 3))
    masks = np.concatenate([ground_truth_proposals(label, include_background=True).masks,
                            np.ones((1, *label.shape), bool)])
    eng = Engine(bank, backbone=backbone, proposer=None, config=dataclasses.replace(bank.config, boundary_radius=0))
    searched = []
    search = eng.index.search
    eng.index.search = lambda queries, k: searched.append(queries) or search(queries, k)
    eng.segment(image, Proposals.from_masks(masks, np.ones(len(masks))))
    pooled = soft_mask_pool_reference(backbone.features([image])[0], masks, backbone.stride, groups=(2, 2))
    np.testing.assert_allclose(searched[0], centered_reference(pooled, bank.center, (2, 2)), atol=1e-5)
    # a bank built without centring is searched with SMFA's queries as they are
    plain_engine = Engine(plain, backbone=backbone, proposer=None)
    plain_engine.index.search = lambda queries, k: searched.append(queries) or search(queries, k)
    plain_engine.segment(image, Proposals.from_masks(masks, np.ones(len(masks))))
    np.testing.assert_allclose(searched[1], pooled, atol=1e-5)


def test_the_proposer_can_be_replaced_after_construction(make_engine, toy, rng):
    """Engine.proposer stays assignable, as it was before the batch's proposals moved to engine.proposing."""
    image = toy.scene(rng, classes=(1, 3))[0]
    eng = make_engine(proposer=None)
    with pytest.raises(InputError, match="no proposer"):
        eng.segment(image)
    nested = _NestedBlocksProposer()
    eng.proposer = nested
    assert eng.proposer is nested
    result = eng.segment(image)
    assert result.label_map.shape == image.shape[:2]
