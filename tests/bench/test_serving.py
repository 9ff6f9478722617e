"""bench/serving.py: a tiny load run and fault run against the real local tritonserver writes its JSON report with
the keys the issue names; the fault run must end every request (no hang) and give no wrong answer. No timing
assertions."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_serving_benchmark_tiny_run_with_a_fault_writes_json(repo_root, voc_root, triton_launcher, tmp_path):
    out = tmp_path / "serving.json"
    run = subprocess.run([sys.executable, str(repo_root / "bench" / "serving.py"), "--data", str(voc_root),
                          "--bank-images", "6", "--images", "3", "--requests", "4", "--levels", "1", "3",
                          "--fault-requests", "16", "--json", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "MODUSEG_TRITON_ENV": str(triton_launcher.parents[1])})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["identical_to_inprocess"] is True and report["errors"] == 0
    assert set(report["requests_per_sec"]) == {"1", "3"} and report["p99_ms"]["3"] >= report["p50_ms"]["3"] > 0
    assert [level["requests"] for level in report["levels"]] == [4, 4]
    fault = report["fault"]
    assert fault["hung"] == 0 and fault["WRONG ANSWER"] == 0 and fault["ok"] + fault["error"] == 16
    assert fault["ready_again_at_s"] > fault["killed_at_s"] > 0 and fault["max_seconds"] <= fault["bound_seconds"]
    assert all("Triton" in sample for sample in fault["error_samples"])  # failures say what failed
