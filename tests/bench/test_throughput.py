"""bench/throughput.py: a tiny run on real VOC images writes its JSON report, with the compiled engine and the
reference path (Engine(kernels="reference")) side by side. No timing assertions."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_throughput_benchmark_tiny_run_writes_json(repo_root, voc_root, tmp_path):
    out = tmp_path / "throughput.json"
    # no PYTHONPATH: the script must find the installed engine (a clean clone's sources have no compiled _C)
    run = subprocess.run([sys.executable, str(repo_root / "bench" / "throughput.py"), "--images",
                          str(voc_root / "JPEGImages"), "--repeats", "1", "--limit", "4", "--bank-limit", "6",
                          "--no-kernels", "--json", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["images_per_sec"] > 0 and report["reference_images_per_sec"] > 0
    assert report["backbone_only_images_per_sec"] > 0 and report["proposer_to_backbone"] > 0
    assert report["end_to_end_fraction_of_backbone"] == pytest.approx(
        report["images_per_sec"] / report["backbone_only_images_per_sec"])
    stages = {"decode", "proposer", "filter", "backbone", "smfa", "search", "nms_raster"}
    assert stages <= set(report["stages"]) and stages <= set(report["reference_stages"])
    assert report["device"] == "cpu" and report["backend"] == "onnxruntime" and report["images"] == 4
    assert report["search"] == "numpy-flat (BLAS), hubness penalty" and report["kernels"] == []
    assert "the backbone alone" in run.stdout and "reference path" in run.stdout
