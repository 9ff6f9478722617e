"""README.md's result rows, pinned: the defaults on the real data give the mIoU the README prints, to its precision.

Each row runs as the README says it is made: `moduseg build-bank` on train, then `moduseg eval` on val (what
scripts/run_voc.sh runs). A change that moves a row fails here; if the move is meant, the README's table changes
with it (`moduseg report` regenerates every row)."""

import json

import pytest

from engine.cli import main

#: (data set fixture, bank masks, proposals, the README's mIoU on val with the defaults)
ROWS = {
    "voc2012-mini embedded default": ("voc_root", "pseudo", "auto", 40.0),
    "camvid ground-truth bank + embedded proposals": ("camvid_root", "gt", "auto", 57.7),
}


@pytest.mark.slow
@pytest.mark.parametrize("row", list(ROWS))
def test_readme_row(row, request, tmp_path):
    fixture, masks, proposals, miou = ROWS[row]
    data = str(request.getfixturevalue(fixture))
    assert main(["build-bank", "--data", data, "--split", "train", "--masks", masks, "--out",
                 str(tmp_path / "bank")]) == 0
    assert main(["eval", "--bank", str(tmp_path / "bank"), "--data", data, "--split", "val", "--proposals", proposals,
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert round(metrics["miou"], 1) == miou, f"{row}: {metrics['miou']:.2f} mIoU, the README says {miou}"


def test_the_pinned_rows_are_the_readmes(repo_root):
    """The numbers above are the ones the README's results table prints (bold: the defaults' main rows)."""
    table = (repo_root / "README.md").read_text()
    assert "| voc2012-mini (24 images) | pseudo-mask bank + embedded proposals (embedded default) | **40.0** |" in table
    assert "| camvid (101 images) | ground-truth bank + embedded proposals | **57.7** |" in table
