"""engine.outputs through `moduseg segment` with the toy bank and backbone (fast): outputs never over or among the
inputs, named by each input's own path with its suffix, records that carry their provenance and are redone when
stale, and every per-item failure (reading, segmenting, writing; odd names, symlink loops, a full disk) recorded
while the run goes on."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine import outputs
from engine.cli import main


@pytest.fixture
def cli(toy, toy_bank, tmp_path, monkeypatch):
    """main(["segment", "--bank", BANK, *args]) over the toy bank saved to disk, the toy backbone standing in for
    the bank's; returns the exit code (run.bank: the bank's folder)."""
    bank = toy_bank.save(tmp_path / "bank")
    monkeypatch.setattr("engine.models.create_backbone", lambda name, **kw: toy.ColorBackbone(id=name))

    def run(*args):
        return main(["segment", "--bank", str(bank), *map(str, args)])

    run.bank = bank
    return run


def photo(path, rng, toy, height=96):
    """A toy scene written as an image file (format from the suffix); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image, _ = toy.scene(rng, height=height)
    Image.fromarray(image).save(path)
    return path


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def records(out):
    """The per-image records under `out` (not the run's classes.json)."""
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in out.rglob("*.json")
            if p != out / outputs.CLASSES_FILE}


# -------------------------------------------------------------------------------------------- outputs over inputs


def test_out_equal_to_or_inside_an_input_folder_is_a_usage_error(cli, toy, rng, tmp_path, capsys):
    """Was: `segment DIR --out DIR` replaced the input PNGs with label maps (exit 0), and an --out inside the input
    folder made each rerun segment its own outputs (2 -> 6 -> 14 images)."""
    inputs = tmp_path / "in"
    for name in ("a.png", "b.png"):
        photo(inputs / name, rng, toy)
    before = {p: p.read_bytes() for p in inputs.iterdir()}
    for out in (inputs, inputs / "seg", inputs / "deep" / "er"):
        with pytest.raises(SystemExit) as usage:
            cli(inputs, "--out", out)
        assert usage.value.code == 2
        err = capsys.readouterr().err
        assert "moduseg segment: error: --out" in err and f"the input folder {inputs}" in err, err
    with pytest.raises(SystemExit) as usage:  # a glob searches its leading folder
        cli(inputs / "*.png", "--out", inputs / "seg")
    assert usage.value.code == 2 and f"(searched by {inputs / '*.png'})" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # the inputs inside --out: outputs could replace them
        cli(inputs, "--out", tmp_path)
    assert usage.value.code == 2 and f"the input folder {inputs} lies inside --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        cli(inputs / "a.png", "--out", inputs)
    assert usage.value.code == 2 and f"input {inputs / 'a.png'} lies inside --out" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in inputs.iterdir()} == before  # nothing written, nothing replaced
    # beside the inputs, reruns find the same two images
    out = tmp_path / "seg"
    for _ in range(3):
        assert cli(inputs, "--out", out) == 0
    assert len(records(out)) == 2 and "0 written, 2 already done" in capsys.readouterr().out


def test_inputs_reached_through_symlinks_into_out_are_skipped(cli, toy, rng, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "seg"
    photo(inputs / "a.png", rng, toy)
    assert cli(inputs, "--out", out) == 0
    (inputs / "outputs").symlink_to(out, target_is_directory=True)  # a symlinked folder is not entered
    (inputs / "label.png").symlink_to(out / "a.png.png")  # a file that is an output: not an input
    capsys.readouterr()
    assert cli(inputs, "--out", out) == 0
    assert "0 written, 1 already done, 0 failed, of 1 images" in capsys.readouterr().out
    assert cli(tmp_path / "in" / "**" / "*.png", "--out", out) == 0  # a recursive glob follows links: skipped too
    assert "of 1 images" in capsys.readouterr().out


def test_outputs_keep_the_suffix_so_x_jpg_and_x_png_do_not_collide(cli, toy, rng, tmp_path):
    """Was: x.jpg and x.png in one folder wrote one record x.json (the suffix was dropped)."""
    inputs, out = tmp_path / "in", tmp_path / "seg"
    photo(inputs / "x.jpg", rng, toy)
    photo(inputs / "x.png", rng, toy, height=80)
    assert cli(inputs, "--out", out) == 0
    assert files(out) == ["classes.json", "x.jpg.json", "x.jpg.overlay.png", "x.jpg.png", "x.png.json",
                          "x.png.overlay.png", "x.png.png"]
    found = records(out)
    assert found["x.jpg.json"]["image"] == str(inputs / "x.jpg") and found["x.png.json"]["height"] == 80


def test_output_paths_do_not_move_when_inputs_are_added(cli, toy, rng, tmp_path, capsys):
    """Was: outputs were named from the deepest folder holding everything found, so one more file (or a symlink to
    one elsewhere) moved every output and a rerun wrote them all again under new names."""
    inputs, out, elsewhere = tmp_path / "in", tmp_path / "seg", tmp_path / "elsewhere"
    photo(inputs / "a" / "x.jpg", rng, toy)
    assert cli(inputs, "--out", out) == 0
    assert files(out) == ["a/x.jpg.json", "a/x.jpg.overlay.png", "a/x.jpg.png", "classes.json"]
    photo(inputs / "b" / "c" / "y.jpg", rng, toy)
    (inputs / "a" / "link.jpg").symlink_to(photo(elsewhere / "deep" / "z.jpg", rng, toy))
    capsys.readouterr()
    assert cli(inputs, "--out", out) == 0
    assert "2 written, 1 already done" in capsys.readouterr().out
    # the symlink is named by its own name, inside its folder's outputs; nothing lands outside --out
    assert [f for f in files(out) if f.endswith(".jpg.json")] == ["a/link.jpg.json", "a/x.jpg.json", "b/c/y.jpg.json"]
    assert files(elsewhere) == ["deep/z.jpg"]
    # file arguments are named by their own names, whatever else is given with them
    single = tmp_path / "single"
    assert cli(inputs / "a" / "x.jpg", inputs / "b" / "c" / "y.jpg", "--out", single) == 0
    assert [f for f in files(single) if f.endswith(".jpg.json")] == ["x.jpg.json", "y.jpg.json"]


def test_two_inputs_with_one_output_name_are_a_usage_error(cli, toy, rng, tmp_path, capsys):
    inputs = tmp_path / "in"
    first, second = photo(inputs / "a" / "x.jpg", rng, toy), photo(inputs / "b" / "x.jpg", rng, toy)
    with pytest.raises(SystemExit) as usage:
        cli(first, second, "--out", tmp_path / "seg")
    assert usage.value.code == 2
    assert f"{first} and {second} would both write" in capsys.readouterr().err
    assert not (tmp_path / "seg").exists()
    assert cli(inputs, "--out", tmp_path / "seg") == 0  # their folder: a/x.jpg.* and b/x.jpg.*


def test_a_symlinked_folder_inside_out_does_not_lead_writes_outside(cli, toy, rng, tmp_path):
    inputs, out, elsewhere = tmp_path / "in", tmp_path / "seg", tmp_path / "elsewhere"
    photo(inputs / "a" / "x.jpg", rng, toy)
    photo(inputs / "y.jpg", rng, toy)
    elsewhere.mkdir()
    out.mkdir()
    (out / "a").symlink_to(elsewhere, target_is_directory=True)
    assert cli(inputs, "--out", out) == 1
    assert files(elsewhere) == []
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["image"] for f in failures] == [str(inputs / "a" / "x.jpg")]
    assert "leads outside --out" in failures[0]["reason"] and (out / "y.jpg.json").is_file()


# ------------------------------------------------------------------------------------------ resume and provenance


def test_records_carry_provenance_and_stale_ones_are_redone(cli, toy, toy_bank, rng, tmp_path, capsys):
    """Was: a rerun after changing the bank, --top-k or a photo printed "0 written, 1 already done" and kept the old
    answer; the record said nothing of the bank, config or input that made it."""
    inputs, out = tmp_path / "in", tmp_path / "seg"
    image = photo(inputs / "x.jpg", rng, toy)
    photo(inputs / "y.jpg", rng, toy)
    assert cli(inputs, "--out", out) == 0
    record = json.loads((out / "x.jpg.json").read_text())
    provenance = record["provenance"]
    assert provenance["bank"] == outputs.bank_id(cli.bank) and provenance["bank"].startswith("sha256:")
    assert provenance["config"]["top_k"] == toy_bank.config.top_k and "batch_size" not in provenance["config"]
    assert provenance["input"] == {"size": image.stat().st_size, "mtime_ns": image.stat().st_mtime_ns}
    capsys.readouterr()

    def rerun(*args):
        assert cli(inputs, "--out", out, *args) == 0
        return capsys.readouterr().out

    assert "0 written, 2 already done" in rerun("--batch-size", "1")  # batching does not change results
    text = rerun("--top-k", "1")
    assert "2 written, 0 already done" in text and "2 of them redone because their record was stale: config " \
        "changed 2" in text
    assert json.loads((out / "x.jpg.json").read_text())["provenance"]["config"]["top_k"] == 1
    assert "0 written, 2 already done" in rerun("--top-k", "1")
    photo(image, rng, toy, height=80)  # the photo replaced
    text = rerun("--top-k", "1")
    assert "1 written, 1 already done" in text and "input changed 1" in text
    assert json.loads((out / "x.jpg.json").read_text())["height"] == 80
    other = toy.bank(rng, count=6).save(tmp_path / "other")  # another bank
    assert main(["segment", "--bank", str(other), str(inputs), "--out", str(out), "--top-k", "1"]) == 0
    text = capsys.readouterr().out
    assert "2 written, 0 already done" in text and "bank changed 2" in text
    # a record of an older run (no provenance), a corrupt one and a missing label map are redone too
    old = json.loads((out / "x.jpg.json").read_text())
    del old["provenance"]
    (out / "x.jpg.json").write_text(json.dumps(old))
    (out / "y.jpg.png").unlink()
    text = rerun()
    assert "2 written" in text and "no provenance (an older run) 1" in text and "bank changed 1" in text
    (out / "y.jpg.json").write_text("{not json")
    (out / "x.jpg.overlay.png").unlink()
    text = rerun()
    assert "2 written" in text and "outputs missing 1, unreadable record 1" in text


# ------------------------------------------------------------------------------------------ per-item failures


def test_write_failures_are_recorded_and_the_run_goes_on(cli, toy, rng, tmp_path, monkeypatch, capsys):
    """Was: a full disk or a read-only folder was a traceback that ended the run."""
    inputs, out = tmp_path / "in", tmp_path / "seg"
    for name in ("full.jpg", "ok.jpg", "ro/x.jpg", "ok2.jpg"):
        photo(inputs / name, rng, toy)
    from engine import data

    save_label_map, replace = data.save_label_map, os.replace

    def disk_full(label_map, path, palette=None):
        if ".full.jpg." in path.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save_label_map(label_map, path, palette)

    def read_only(source, target):
        if os.path.dirname(target) == str(out / "ro"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
        replace(source, target)

    monkeypatch.setattr(data, "save_label_map", disk_full)
    monkeypatch.setattr(os, "replace", read_only)
    assert cli(inputs, "--out", out) == 1
    assert "2 written, 0 already done, 2 failed, of 4 images" in capsys.readouterr().out
    failures = {f["image"]: f["reason"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert set(failures) == {str(inputs / "full.jpg"), str(inputs / "ro" / "x.jpg")}
    assert "cannot write its outputs: OSError: [Errno 28] No space left on device" in failures[str(inputs / "full.jpg")]
    assert "Read-only file system" in failures[str(inputs / "ro" / "x.jpg")]
    assert sorted(records(out)) == ["ok.jpg.json", "ok2.jpg.json"] and not list(out.rglob(".*"))
    # the disk has room again: only the failed ones are done
    monkeypatch.setattr(data, "save_label_map", save_label_map)
    monkeypatch.setattr(os, "replace", replace)
    assert cli(inputs, "--out", out) == 0
    assert "2 written, 2 already done, 0 failed" in capsys.readouterr().out and not (out / "failures.jsonl").exists()


def test_an_unwritable_out_is_a_clear_error_and_an_unwritable_failures_file_goes_to_stderr(cli, toy, rng, tmp_path,
                                                                                        monkeypatch, capsys):
    inputs, out = tmp_path / "in", tmp_path / "seg"
    photo(inputs / "x.jpg", rng, toy)
    (inputs / "bad.jpg").write_bytes(b"not a jpeg")
    import tempfile

    def refused(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out))

    with monkeypatch.context() as patch:  # a read-only --out (permission bits do not stop root, so simulated)
        patch.setattr(tempfile, "TemporaryFile", refused)
        assert cli(inputs, "--out", out) == 1
    assert f"moduseg segment: error: --out {out}: cannot write there: [Errno 30] Read-only file system" in \
        capsys.readouterr().err
    monkeypatch.setattr(outputs, "write_failures", lambda out, failures: refused())
    assert cli(inputs, "--out", out) == 1
    captured = capsys.readouterr()
    assert "1 written, 0 already done, 1 failed" in captured.out
    assert f"cannot write {out / 'failures.jsonl'}" in captured.err and f"{inputs / 'bad.jpg'}: cannot read image" \
        in captured.err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_a_clear_error(cli, toy, rng, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "seg"
    photo(inputs / "x.jpg", rng, toy)
    out.mkdir()
    out.chmod(0o555)
    try:
        assert cli(inputs, "--out", out) == 1
    finally:
        out.chmod(0o755)
    assert "cannot write there" in capsys.readouterr().err


def test_non_utf8_names_are_segmented_recorded_and_resumed(cli, toy, rng, tmp_path, capsys):
    """Was: a file name that is not UTF-8 crashed the process (SIGSEGV in cv2.imwrite of the overlay)."""
    inputs, out = tmp_path / "in", tmp_path / "seg"
    odd = os.fsdecode(os.path.join(os.fsencode(inputs), b"caf\xe9.jpg"))
    photo(inputs / "plain.jpg", rng, toy)
    image, _ = toy.scene(rng)
    Image.fromarray(image).save(odd, format="JPEG")
    manifest = tmp_path / "list.txt"
    manifest.write_bytes(b"in/caf\xe9.jpg\n")
    assert cli(inputs, "--out", out) == 0
    names = sorted(os.listdir(os.fsencode(out)))
    assert names == [b"caf\xe9.jpg.json", b"caf\xe9.jpg.overlay.png", b"caf\xe9.jpg.png", b"classes.json",
                     b"plain.jpg.json", b"plain.jpg.overlay.png", b"plain.jpg.png"]
    assert json.loads((out / "caf\udce9.jpg.json").read_text())["image"] == odd
    assert cli(inputs, "--out", out) == 0
    assert "0 written, 2 already done" in capsys.readouterr().out
    assert cli("--manifest", manifest, "--out", tmp_path / "listed") == 0  # a manifest may list such a name
    assert b"caf\xe9.jpg.png" in os.listdir(os.fsencode(tmp_path / "listed" / "in"))


def test_overlay_writes_to_a_non_utf8_name_without_crashing(tmp_path):
    """The root of the crash, in a process of its own: cv2.imwrite(str(path)) of a name with surrogate escapes."""
    code = (
        "import os, sys, numpy as np\n"
        "from types import SimpleNamespace\n"
        "from engine.report import overlay\n"
        "label = np.zeros((8, 8), np.uint8); label[2:6, 2:6] = 1\n"
        "result = SimpleNamespace(label_map=label, class_names=('background', 'thing'),\n"
        "                         class_summary=lambda: {'background': 0.75, 'thing': 0.25})\n"
        "overlay(np.zeros((8, 8, 3), np.uint8), result, os.fsdecode(os.path.join(os.fsencode(sys.argv[1]), "
        "b'caf\\xe9.jpg')))\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, (run.returncode, run.stderr)
    assert os.listdir(os.fsencode(tmp_path)) == [b"caf\xe9.jpg"]


def test_a_manifest_symlink_loop_and_a_missing_file_are_recorded_failures(cli, toy, rng, tmp_path, capsys):
    """Was: a manifest listing a symlink loop was a traceback (RuntimeError from Path.resolve)."""
    folder = tmp_path / "listed"
    photo(folder / "good.jpg", rng, toy)
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    manifest = folder / "list.txt"
    manifest.write_text("loop.jpg\ngood.jpg\ndangling.jpg\nmissing.jpg\n")
    out = tmp_path / "seg"
    assert cli("--manifest", manifest, "--out", out) == 1
    assert "1 written, 0 already done, 3 failed" in capsys.readouterr().out
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["image"] for f in failures] == [str(folder / n) for n in ("loop.jpg", "dangling.jpg", "missing.jpg")]
    assert "Too many levels of symbolic links" in failures[0]["reason"]
    assert all(f["reason"].startswith("cannot read image") for f in failures)
    assert cli(folder / "loop.jpg", folder / "good.jpg", "--out", tmp_path / "args") == 1  # named on the command line
    assert "1 written" in capsys.readouterr().out


def test_an_error_while_segmenting_one_image_is_that_images_failure(toy, toy_bank, rng, tmp_path, monkeypatch,
                                                                    capsys):
    """Not a decode error (those are Skipped records): an exception of the model on one image of a batch."""
    class Fragile(toy.ColorBackbone):
        def features(self, images):
            if any(image.shape[0] == 80 for image in images):
                raise RuntimeError("the model fell over")
            return super().features(images)

    bank = toy_bank.save(tmp_path / "bank")
    monkeypatch.setattr("engine.models.create_backbone", lambda name, **kw: Fragile(id=name))
    inputs, out = tmp_path / "in", tmp_path / "seg"
    for i, height in enumerate((96, 96, 80, 96, 96)):
        photo(inputs / f"{i}.png", rng, toy, height=height)
    assert main(["segment", "--bank", str(bank), str(inputs), "--out", str(out), "--batch-size", "2"]) == 1
    assert "4 written, 0 already done, 1 failed, of 5 images" in capsys.readouterr().out
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failures == [{"image": str(inputs / "2.png"), "reason": "RuntimeError: the model fell over"}]


def test_find_inputs_keys(tmp_path):
    """The naming rule on its own: relative to the argument, suffix kept; a manifest entry outside its folder keeps
    its absolute path; each path once, the first argument's key winning."""
    (tmp_path / "in" / "a").mkdir(parents=True)
    for name in ("a/x.jpg", "y.png", "notes.txt"):
        (tmp_path / "in" / name).write_bytes(b"")
    manifest = tmp_path / "in" / "list.txt"
    manifest.write_text(f"a/x.jpg\n{tmp_path / 'elsewhere.jpg'}\n")
    found = outputs.find_inputs([str(tmp_path / "in" / "y.png"), str(tmp_path / "in")], manifest,
                                out=tmp_path / "seg")
    keys = {str(i.path.relative_to(tmp_path)): str(i.key) for i in found}
    assert keys == {"in/y.png": "y.png", "in/a/x.jpg": "a/x.jpg",
                    "elsewhere.jpg": str(tmp_path / "elsewhere.jpg").lstrip(os.sep)}
    assert outputs.output_files("a/x.jpg", tmp_path) == outputs.OutputFiles(
        tmp_path / "a" / "x.jpg.png", tmp_path / "a" / "x.jpg.overlay.png", tmp_path / "a" / "x.jpg.json")


def test_segment_help_states_the_naming(capsys):
    with pytest.raises(SystemExit) as done:
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "a/x.jpg -> OUT/a/x.jpg.png (label map), .json (record), .overlay.png" in text
    assert "outside every input folder" in text


def test_output_mode_coco_rle_records_decode_with_pycocotools_and_a_change_redoes_them(cli, toy, rng, tmp_path,
                                                                                       capsys):
    """--output-mode coco_rle: each record's masks as COCO's compressed RLE (what pycocotools.mask.decode takes), the
    same pixels as the default uncompressed RLE; the mode is part of the provenance, so changing it redoes records."""
    coco = pytest.importorskip("pycocotools.mask")
    from engine.utils import rle_decode

    inputs, out = tmp_path / "in", tmp_path / "seg"
    photo(inputs / "x.jpg", rng, toy)
    assert cli(inputs, "--out", out) == 0
    plain = json.loads((out / "x.jpg.json").read_text())
    assert plain["segments"] and plain["provenance"]["output_mode"] == "uncompressed_rle"
    capsys.readouterr()
    assert cli(inputs, "--out", out, "--output-mode", "coco_rle") == 0
    assert "output_mode changed 1" in capsys.readouterr().out
    compressed = json.loads((out / "x.jpg.json").read_text())
    for a, b in zip(plain["segments"], compressed["segments"]):
        assert isinstance(b["segmentation"]["counts"], str)
        mask = coco.decode({"size": b["segmentation"]["size"], "counts": b["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(mask.astype(bool), rle_decode(a["segmentation"]))


# ------------------------------------------------------------------------------------------- how outputs look


@pytest.fixture
def camvid_cli(toy, rng, tmp_path, monkeypatch):
    """As `cli`, over a toy bank whose classes are CamVid's (the toy scenes' three colours named sky, building and
    pole)."""
    from engine import Config, FeatureBank
    from engine.palettes import CAMVID_CLASSES

    bank = FeatureBank.build(toy.samples(rng, 9), toy.ColorBackbone(), CAMVID_CLASSES, Config(min_area=100, top_k=3),
                             progress=False).save(tmp_path / "camvid_bank")
    monkeypatch.setattr("engine.models.create_backbone", lambda name, **kw: toy.ColorBackbone(id=name))
    return lambda *args: main(["segment", "--bank", str(bank), *map(str, args)])


def test_label_maps_overlays_and_the_class_list_use_the_banks_own_palette(camvid_cli, toy, rng, tmp_path, capsys):
    """Was: every label map and overlay was drawn in VOC's palette (CamVid's sky maroon; car, sky and fence alike),
    overlays were JPEGs at a fixed opacity, and nothing beside the label maps said which id is which class."""
    from engine.data import load_image
    from engine.palettes import CAMVID_CLASSES, CAMVID_COLOURS, voc_colours

    inputs, out = tmp_path / "in", tmp_path / "seg"
    image = load_image(photo(inputs / "x.png", rng, toy))
    assert camvid_cli(inputs, "--out", out) == 0
    png = Image.open(out / "x.png.png")
    assert png.getpalette()[:36] == [c for colour in CAMVID_COLOURS for c in colour]
    labels = np.asarray(png)
    assert set(np.unique(labels).tolist()) - {0} and set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
    assert json.loads((out / "classes.json").read_text()) == {
        "palette": "camvid",
        "classes": [{"id": i, "name": name, "color": list(colour)}
                    for i, (name, colour) in enumerate(zip(CAMVID_CLASSES, CAMVID_COLOURS))]}
    assert records(out)["x.png.json"]["provenance"]["rendering"] == {"palette": "auto", "opacity": 0.5}

    def drawn():  # the overlay's picture part (the legend is below it), as written: PNG, so exactly
        overlay = Image.open(out / "x.png.overlay.png")
        assert overlay.format == "PNG" and overlay.mode == "RGB"
        return np.asarray(overlay)[:image.shape[0]].astype(int)

    painted = labels != 0
    half = drawn()
    np.testing.assert_array_equal(half[~painted], image[~painted])
    assert np.abs(half[painted] - (image[painted] + np.array(CAMVID_COLOURS)[labels[painted]]) / 2).max() <= 0.5
    capsys.readouterr()
    assert camvid_cli(inputs, "--out", out, "--opacity", "1") == 0
    assert "rendering changed 1" in capsys.readouterr().out
    np.testing.assert_array_equal(drawn()[painted], np.array(CAMVID_COLOURS)[labels[painted]])
    assert camvid_cli(inputs, "--out", out, "--opacity", "0") == 0
    np.testing.assert_array_equal(drawn(), image)
    assert camvid_cli(inputs, "--out", out, "--opacity", "0", "--palette", "voc") == 0
    assert "rendering changed 1" in capsys.readouterr().out
    assert Image.open(out / "x.png.png").getpalette()[:63] == voc_colours()[:21].ravel().tolist()
    assert json.loads((out / "classes.json").read_text())["classes"][1] == {"id": 1, "name": "sky",
                                                                            "color": [128, 0, 0]}
    assert camvid_cli(inputs, "--out", out, "--opacity", "0", "--palette", "voc") == 0
    assert "0 written, 1 already done" in capsys.readouterr().out
    assert not list(out.rglob(".*"))  # classes.json, like every file, written through a temporary name


@pytest.mark.parametrize("flags, message", [
    (["--opacity", "1.5"], "argument --opacity: expected a number from 0 (the image alone) to 1"),
    (["--opacity", "half"], "argument --opacity: expected a number from 0"),
    (["--palette", "rainbow"], "argument --palette: invalid choice: 'rainbow'"),
])
def test_palette_and_opacity_usage_errors(cli, toy, rng, tmp_path, capsys, flags, message):
    photo(tmp_path / "in" / "x.jpg", rng, toy)
    with pytest.raises(SystemExit) as usage:
        cli(tmp_path / "in", "--out", tmp_path / "seg", *flags)
    assert usage.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "seg").exists()


def test_an_input_named_like_the_runs_own_files_is_refused(cli, toy, rng, tmp_path, capsys):
    """classes.json is the run's: a file argument named `classes` would have its record there."""
    odd = photo(tmp_path / "in" / "x.jpg", rng, toy).rename(tmp_path / "in" / "classes")
    with pytest.raises(SystemExit) as usage:
        cli(odd, "--out", tmp_path / "seg")
    assert usage.value.code == 2 and "the run's own classes.json file" in capsys.readouterr().err


def test_overlay_legend_says_below_one_percent_rather_than_zero(tmp_path, monkeypatch):
    """Was: a class painting 0.3% of the image read "0%" in the legend."""
    from types import SimpleNamespace

    from engine import report

    texts, put_text = [], report.cv2.putText
    monkeypatch.setattr(report.cv2, "putText", lambda image, text, *args: (texts.append(text), put_text(image, text,
                                                                                                         *args))[1])
    label = np.zeros((100, 100), np.uint8)
    label[:60] = 1
    label[99, :30] = 2
    result = SimpleNamespace(label_map=label, class_names=("background", "big", "sliver"),
                             class_summary=lambda: {"background": 0.397, "big": 0.6, "sliver": 0.003})
    report.overlay(np.zeros((100, 100, 3), np.uint8), result, tmp_path / "x.overlay.png")
    assert texts == ["big 60%", "sliver <1%"]
    assert (report.share_text(0.004), report.share_text(0.01), report.share_text(0.996)) == ("<1%", "1%", "100%")
