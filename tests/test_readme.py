"""README.md's Python blocks run as written: each ```python block in a fresh interpreter, from a folder laid out as
the checkout is beside the data (../shared/data), so the relative paths it names resolve as from the repository root,
while what it writes (runs/bank) lands in a temporary folder, never in the checkout."""

import os
import re
import subprocess
import sys

import pytest


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_python_blocks_are_found():
    assert python_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n") == ["x = 1\n",
                                                                                                 "y = 2\n"]


@pytest.mark.slow
def test_readme_python_blocks_run_as_written(repo_root, voc_root, tmp_path):
    """Was: the README's Python API block used names it never defined (images, bgr_array, gts, "a.jpg") and built
    two banks over all of voc2012-mini train (nearly 3 minutes of pseudo-masks on 2 cores)."""
    blocks = python_blocks((repo_root / "README.md").read_text())
    assert blocks
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(voc_root.parent)  # ../shared/data, wherever the data sets are
    for index, block in enumerate(blocks):
        script = tmp_path / f"readme_block_{index}.py"
        script.write_text(block)
        run = subprocess.run([sys.executable, str(script)], cwd=checkout, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
        assert run.returncode == 0, f"README's python block {index} failed:\n{block}\n{run.stderr[-4000:]}"
    assert (checkout / "runs" / "bank" / "manifest.json").is_file()
