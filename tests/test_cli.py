"""The `moduseg` CLI contract on a small VOC-layout copy of voc2012-mini, with the real default backbone."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from toy_models import copy_small_voc

VOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-mini"
pytestmark = pytest.mark.skipif(not VOC.is_dir(), reason=f"needs {VOC}")


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory):
    return copy_small_voc(VOC, tmp_path_factory.mktemp("voc"))


@pytest.mark.slow
def test_build_bank_eval_segment(small_voc, tmp_path, capsys):
    bank = tmp_path / "bank"
    assert main(["build-bank", "--data", str(small_voc), "--split", "train", "--masks", "gt", "--out", str(bank),
                 "--top-k", "1"]) == 0
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["backbone"]["id"].startswith("effnet-lite2/block19") and manifest["config"]["top_k"] == 1
    assert main(["build-bank", "--data", str(small_voc), "--out", str(bank)]) == 2
    assert "exists" in capsys.readouterr().err

    out = tmp_path / "eval"
    assert main(["eval", "--bank", str(bank), "--data", str(small_voc), "--split", "val", "--proposals", "gt",
                 "--out", str(out), "--save-predictions"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["miou"] <= 100 and metrics["images"] == 3
    assert set(metrics["per_class"]) == set(manifest["class_names"])
    assert len(list((out / "predictions").glob("*.png"))) == 3

    image = next((small_voc / "JPEGImages").glob("*.jpg"))
    segmented = tmp_path / "segmented"
    assert main(["segment", "--bank", str(bank), str(image), "--out", str(segmented)]) == 0
    png = Image.open(segmented / f"{image.stem}.png")
    assert png.mode == "P" and png.size == Image.open(image).size
    assert np.asarray(png).max() < len(manifest["class_names"])


def test_clear_errors(small_voc, tmp_path, capsys):
    assert main(["eval", "--bank", str(tmp_path), "--data", str(small_voc), "--out", str(tmp_path / "o")]) == 2
    assert "not a feature bank" in capsys.readouterr().err
    assert main(["build-bank", "--data", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "no split file" in capsys.readouterr().err
    bad = small_voc.parent / "bad_labels"
    shutil.copytree(small_voc, bad)
    labels = json.loads((bad / "image_labels.json").read_text())
    labels[next(iter(labels))] = ["unicorn"]
    (bad / "image_labels.json").write_text(json.dumps(labels))
    assert main(["build-bank", "--data", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "unknown class names ['unicorn']" in capsys.readouterr().err
    assert main(["build-bank", "--data", str(small_voc), "--out", str(tmp_path / "b"), "--vote", "majority"]) == 2
    assert "Config.vote must be one of" in capsys.readouterr().err


def test_console_script_is_installed():
    run = subprocess.run([sys.executable, "-m", "engine.cli", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "build-bank" in run.stdout and "report" in run.stdout
