"""bench/kernels.py: engine.ops against engine.reference on random atom partitions (each row checks the outputs
agree before timing them: the single-image ops, the batched SMFA and the vote), and --cuda timing TorchIndex and the
batched ops on a GPU or saying why it skips. No timing assertions."""

import subprocess
import sys


def test_kernel_bench_quick_run(repo_root, tmp_path):
    run = subprocess.run([sys.executable, str(repo_root / "bench" / "kernels.py"), "--quick", "--repeats", "1",
                          "--threads", "1", "--cuda"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| soft_mask_pool", "| mask_nms_raster",
                                                                         "| merge_regions", "| vote"))]
    ops = sorted(line.split("|")[1].strip() for line in rows)
    assert ops == ["mask_nms_raster", "merge_regions", "soft_mask_pool", "soft_mask_pool_batch", "vote (count)",
                   "vote (softmax)"], ops
    assert all(line.rstrip().endswith("x |") for line in rows)
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if gpu:
        assert "| search (" in run.stdout and "cuda ms" in run.stdout
    else:
        assert "--cuda: skipping the GPU search rows" in run.stdout
