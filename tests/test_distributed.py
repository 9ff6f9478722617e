"""engine.distributed on a local Ray cluster (2 CPUs, loopback): the Ray bank build equals the single-process one
(ground-truth and pseudo masks), distributed outlier rejection equals reject_outliers (ties included), `moduseg
segment --ray` writes what the single-process command writes, records bad files and resumes, and a killed actor is
either recovered from or ends the build with a clear error and no bank."""

import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="ray[data] is not installed (pip install 'moduseg-engine[ray]')")

from engine import distributed  # noqa: E402
from engine.bank import BankPart, FeatureBank, bank_parts, local_map, reject_outliers, reject_outliers_parts  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.data import VOCDataset  # noqa: E402
from engine.errors import InputError, ModelError  # noqa: E402
from engine.models.embedded import resolve_proposer  # noqa: E402
from engine.registry import DEFAULT_BACKBONE  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (2 CPUs, no dashboard), shut down after it."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def single_process_parts(root, masks, config, backbone_factory):
    dataset = VOCDataset(root, "train")
    backbone = backbone_factory(DEFAULT_BACKBONE)
    samples = dataset
    if masks == "pseudo":
        from engine.models.pseudo_masks import pseudo_mask_samples

        samples = pseudo_mask_samples(dataset, config, backbone=backbone, progress=False)
    proposer = resolve_proposer("embedded", config) if config.region_entries else None
    return list(bank_parts(samples, backbone, dataset.class_names, config, proposer, progress=False)), dataset, backbone


def assert_same_parts(got, want):
    assert [p.images for p in got] == [p.images for p in want]
    for g, w in zip(got, want):
        assert g.sources == w.sources
        np.testing.assert_array_equal(g.labels, w.labels)
        np.testing.assert_array_equal(g.kinds, w.kinds)
        np.testing.assert_allclose(g.vectors, w.vectors, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("masks", ["gt", "pseudo"])
def test_ray_bank_equals_single_process_bank(cluster, small_voc, backbone_factory, masks):
    config = Config(batch_size=2)  # 3 batches of the 6 images, over 2 actors
    want, dataset, backbone = single_process_parts(small_voc, masks, config, backbone_factory)
    got = distributed.build_parts_ray(small_voc, "train", masks, DEFAULT_BACKBONE, config, progress=False)
    assert_same_parts(got, want)
    keep = distributed.reject_outliers_ray(got, config, progress=False)
    whole = BankPart.concatenate(want)
    np.testing.assert_array_equal(keep, reject_outliers(whole.vectors, whole.labels, config, whole.kinds == 0))
    ray_bank = FeatureBank.from_parts(got, dataset.class_names, backbone.describe(), config, keep=keep)
    single_bank = FeatureBank.from_parts(want, dataset.class_names, backbone.describe(), config)
    assert ray_bank.sources == single_bank.sources
    np.testing.assert_allclose(ray_bank.vectors, single_bank.vectors, atol=1e-5, rtol=0)


def random_parts(rng) -> list[BankPart]:
    """Random parts with exact ties (repeated vectors), empty parts, and region entries that are never rejected."""
    parts = []
    for k in range(5):
        n = int(rng.integers(0, 12))
        vectors = rng.normal(size=(n, 6)).astype(np.float32)
        if n > 3:
            vectors[1] = vectors[0]  # equal distances: the earlier one must be dropped first
        labels, kinds = rng.integers(0, 4, n), rng.integers(0, 2, n)
        parts.append(BankPart(vectors, labels, kinds, [f"p{k}"] * n, [f"p{k}"]))
    parts.append(BankPart(np.repeat(parts[0].vectors[:1], 8, axis=0) if len(parts[0]) else np.ones((8, 6)),
                          [1] * 8, [0] * 8, ["dup"] * 8, ["dup"]))  # a class of identical vectors
    return parts


def test_distributed_outlier_rejection_equals_reject_outliers(cluster, rng):
    config = Config(outlier_ratio=0.3, background_outlier_ratio=0.1)
    parts = random_parts(rng)
    whole = BankPart.concatenate(parts)
    want = reject_outliers(whole.vectors, whole.labels, config, whole.kinds == 0)
    got = distributed.reject_outliers_ray(parts, config, progress=False)
    assert (~want).sum() > 0
    np.testing.assert_array_equal(got, want)
    # the same algorithm mapped here, part by part
    np.testing.assert_array_equal(reject_outliers_parts(parts, config, local_map(parts)),
                                  want)


@pytest.mark.parametrize("seed", range(5))
def test_outlier_rejection_over_a_local_map_equals_reject_outliers(seed):
    rng = np.random.default_rng(seed)
    config = Config(outlier_ratio=float(rng.uniform(0.1, 0.6)), background_outlier_ratio=float(rng.uniform(0, 0.3)))
    parts = random_parts(rng)
    whole = BankPart.concatenate(parts)
    want = reject_outliers(whole.vectors, whole.labels, config, whole.kinds == 0)
    got = reject_outliers_parts(parts, config, local_map(parts))
    np.testing.assert_array_equal(got, want)
    empty = [BankPart(np.zeros((0, 6), np.float32), [], [], [], ["e"])]
    assert reject_outliers_parts(empty, config, local_map(empty)).shape == (0,)
    regions_only = [BankPart(np.ones((3, 6), np.float32), [1, 1, 1], [1, 1, 1], ["r"] * 3, ["r"])]
    assert reject_outliers_parts(regions_only, config, local_map(regions_only)).all()


@pytest.fixture(scope="module")
def voc_bank(small_voc, tmp_path_factory):
    """A ground-truth bank of the 6 small-voc train images, built by the single-process command."""
    out = tmp_path_factory.mktemp("ray_bank") / "bank"
    assert main(["build-bank", "--data", str(small_voc), "--out", str(out), "--no-keep-parts"]) == 0
    return out


def bad_files(folder):
    """Three bad images: garbage bytes, a truncated JPEG, a text file named .png."""
    good = sorted(folder.glob("*.jpg"))[0].read_bytes()
    (folder / "garbage.jpg").write_bytes(os.urandom(2000))
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "text.png").write_text("not an image\n")
    return {str((folder / name).resolve()) for name in ("garbage.jpg", "truncated.jpg", "text.png")}


@pytest.mark.slow
def test_segment_ray_writes_what_segment_writes_records_bad_files_and_resumes(cluster, small_voc, voc_bank,
                                                                             tmp_path, capsys):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    images = sorted((small_voc / "JPEGImages").glob("*.jpg"))[:4]
    for i, image in enumerate(images):
        shutil.copy(image, inputs / ("sub" if i % 2 else "") / image.name)
    # a name that is not UTF-8 (no Arrow string; it crashed the overlay writer) travels as bytes
    odd = os.fsdecode(os.path.join(os.fsencode(inputs / "sub"), b"caf\xe9.jpg"))
    shutil.copy(images[0], odd)
    bad = bad_files(inputs)
    out, reference = tmp_path / "ray", tmp_path / "single"
    assert main(["segment", "--bank", str(voc_bank), str(inputs), "--out", str(reference)]) == 1
    capsys.readouterr()
    assert main(["segment", "--bank", str(voc_bank), str(inputs), "--out", str(out), "--ray"]) == 1
    printed = capsys.readouterr()
    assert "5 written, 0 already done, 3 failed" in printed.out
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert {f["image"] for f in failures} == bad and all(f["reason"] for f in failures)
    # the same files as the single-process command, with the same contents (overlays: same size)
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert len([p for p in written if p.suffix == ".json" and p.name != "classes.json"]) == 5
    for name in written:  # scores may differ in the last bits (one runtime thread per actor here)
        if name.suffix == ".png":
            np.testing.assert_array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(reference / name)))
        elif name.suffix == ".json":
            got, want = (json.loads((root / name).read_text()) for root in (out, reference))
            if name.name == "classes.json":
                assert got == want and got["palette"] == "voc"
                continue
            scores = [[segment.pop("score") for segment in record["segments"]] for record in (got, want)]
            np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)
            assert got == want, name
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    # a rerun writes nothing new; one missing record is redone, and only it; so is one whose input changed
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert main(["segment", "--bank", str(voc_bank), str(inputs), "--out", str(out), "--ray"]) == 1
    assert "0 written, 5 already done, 3 failed" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    record = next(out.rglob("*.jpg.json"))
    record.unlink()
    assert main(["segment", "--bank", str(voc_bank), str(inputs), "--out", str(out), "--ray"]) == 1
    assert "1 written, 4 already done, 3 failed" in capsys.readouterr().out and record.is_file()
    shutil.copy(images[1], odd)
    assert main(["segment", "--bank", str(voc_bank), str(inputs), "--out", str(out), "--ray"]) == 1
    printed = capsys.readouterr().out
    assert "1 written, 4 already done, 3 failed" in printed and "redone because their record was stale: input " \
        "changed 1" in printed
    assert json.loads((out / "sub" / "caf\udce9.jpg.json").read_text())["provenance"]["input"]["size"] == \
        os.path.getsize(odd)
    # fixed inputs leave the failure list; a manifest's missing file is recorded, not fatal
    for path in bad:
        os.remove(path)
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# inputs\n{images[0].name}\n\n{tmp_path / 'missing.jpg'}\n")
    shutil.copy(images[0], tmp_path / images[0].name)
    listed = tmp_path / "listed"
    assert main(["segment", "--bank", str(voc_bank), "--manifest", str(manifest), "--out", str(listed),
                 "--ray", "--no-overlay"]) == 1
    failures = [json.loads(line) for line in (listed / "failures.jsonl").read_text().splitlines()]
    assert [f["image"] for f in failures] == [str(tmp_path / "missing.jpg")]
    assert (listed / f"{images[0].name}.json").is_file()
    assert main(["segment", "--bank", str(voc_bank), str(inputs), "--out", str(out), "--ray"]) == 0
    assert "(all done)" in capsys.readouterr().out and not (out / "failures.jsonl").exists()


def test_clear_errors(cluster, voc_bank, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert main(["segment", "--bank", str(voc_bank), "--manifest", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "lists no image paths" in capsys.readouterr().err
    start = time.perf_counter()
    with pytest.raises(InputError, match="nothing answers at 127.0.0.1:1"):
        distributed._check_reachable("127.0.0.1:1")
    assert time.perf_counter() - start < 10
    with pytest.raises(InputError, match="expected HOST:PORT"):
        distributed._check_reachable("no-port")
    with pytest.raises(InputError, match="--actors must be >= 1"):
        distributed._pool(ray, 0, Config())
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(ModelError, match=r"pip install 'moduseg-engine\[ray\]'"):
        distributed.ray_module()


@pytest.mark.slow
def test_killed_actor_is_recovered_or_fails_clearly_without_a_bank(cluster, small_voc, backbone_factory, tmp_path,
                                                                   monkeypatch, capsys):
    config = Config(batch_size=2)
    want, _, _ = single_process_parts(small_voc, "gt", config, backbone_factory)
    # one actor's process exits on its 2nd batch, once: Ray restarts it and retries the batch
    marker = tmp_path / "crashed"
    monkeypatch.setenv(distributed.FAULT_ENV, f"2:{marker}")
    got = distributed.build_parts_ray(small_voc, "train", "gt", DEFAULT_BACKBONE, config, progress=False)
    assert marker.exists()  # the crash happened
    assert_same_parts(got, want)
    # every actor's process exits on its first batch: restarts run out, the build stops in bounded time with a
    # clear error, and neither a bank nor a parts directory appears
    monkeypatch.setenv(distributed.FAULT_ENV, "1")
    out = tmp_path / "bank"
    start = time.perf_counter()
    assert main(["build-bank", "--data", str(small_voc), "--out", str(out), "--ray", "--batch-size", "2"]) == 1
    assert time.perf_counter() - start < 90
    assert "Ray bank build failed: ActorDiedError" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashed"]


# ----------------------------------------------------------------------- workers import the installed engine


def regular_install(tmp_path):
    """A Python that imports `engine` as a regular (non-editable) install does: a plain copy of the engine under
    test, on the path through a .pth of a pip-less venv that then lists this environment's site-packages (so no
    editable-install finder takes over the import). Returns its interpreter and the copy's folder."""
    import site
    import subprocess
    import sys

    import engine

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    copy = tmp_path / "installed"
    shutil.copytree(os.path.dirname(engine.__file__), copy / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "moduseg_test.pth").write_text("\n".join([str(copy), *site.getsitepackages()]) + "\n")
    return venv / "bin" / "python", copy / "engine"


DRIVER = """
import json, sys
import ray
import engine
from engine import distributed
from engine.config import Config
from engine.registry import DEFAULT_BACKBONE

parts = distributed.build_parts_ray(sys.argv[1], "train", "gt", DEFAULT_BACKBONE, Config(batch_size=2), actors=2,
                                    progress=False)

@ray.remote
def where():
    import engine
    return engine.__file__

print(json.dumps({"images": sum(len(p.images) for p in parts), "driver": engine.__file__,
                  "workers": sorted(set(ray.get([where.remote() for _ in range(4)])))}))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["checkout", "shadowing"])
def test_a_ray_bank_build_from_any_working_folder_runs_the_installed_engine(folder, small_voc, repo_root, tmp_path):
    """The driver (distributed.connect) starts its own local cluster from the checkout root, or from a folder whose
    engine/ fails on import: Ray puts that folder first on every worker's sys.path, and without the worker setup
    hook the workers imported its engine/ (the checkout's sources, no compiled module) instead of the installed one
    the driver runs."""
    import subprocess

    python, installed = regular_install(tmp_path)
    if folder == "checkout":
        cwd = repo_root
    else:
        cwd = tmp_path / "shadowing"
        (cwd / "engine").mkdir(parents=True)
        (cwd / "engine" / "__init__.py").write_text("raise ImportError('the engine/ of the working folder')\n")
    driver = tmp_path / "driver" / "drive.py"
    driver.parent.mkdir()
    driver.write_text(DRIVER)
    environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", distributed.FAULT_ENV)}
    run = subprocess.run([str(python), str(driver), str(small_voc)], cwd=cwd, env=environment, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["images"] == 6
    assert report["driver"] == str(installed / "__init__.py")
    assert report["workers"] == [report["driver"]]
