"""engine.cli: the `moduseg` command's contract — build-bank, eval and segment on a small VOC-layout copy of
voc2012-mini with the real default backbone, clear errors, triton-repo, and serve stopping its server on SIGTERM."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.registry import DEFAULT_BACKBONE, triton_model_name


@pytest.mark.slow
def test_build_bank_eval_segment(small_voc, tmp_path, capsys):
    bank = tmp_path / "bank"
    assert main(["build-bank", "--data", str(small_voc), "--split", "train", "--masks", "gt", "--out", str(bank),
                 "--top-k", "1"]) == 0
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["backbone"]["id"].startswith("effnet-lite2/multilayer") and manifest["config"]["top_k"] == 1
    assert main(["build-bank", "--data", str(small_voc), "--out", str(bank)]) == 1
    assert "exists" in capsys.readouterr().err

    out = tmp_path / "eval"
    assert main(["eval", "--bank", str(bank), "--data", str(small_voc), "--split", "val", "--proposals", "gt",
                 "--out", str(out), "--save-predictions"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and set(metrics["per_class"]) == set(manifest["class_names"])
    # the metrics are those of the predictions written, scored against the ground truth
    from engine.data import VOCDataset
    from engine.eval import ConfusionMatrix

    val = VOCDataset(small_voc, "val")
    rescored = ConfusionMatrix(val.class_names)
    for sample in val:
        rescored.update(np.array(Image.open(out / "predictions" / f"{sample.id}.png")), sample.mask)
    assert rescored.summary()["miou"] == pytest.approx(metrics["miou"], abs=1e-9)
    assert sorted(p.stem for p in (out / "predictions").glob("*.png")) == sorted(val.ids)

    # files from two folders with the same name, found by a folder and again by a glob: outputs keep their paths
    # below the folder, suffix and all
    image = sorted((small_voc / "JPEGImages").glob("*.jpg"))[0]
    inputs = tmp_path / "inputs"
    for sub in ("a", "b"):
        (inputs / sub).mkdir(parents=True)
        shutil.copy(image, inputs / sub / image.name)
    (inputs / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    segmented = tmp_path / "segmented"
    code = main(["segment", "--bank", str(bank), str(inputs), str(inputs / "*" / "*.jpg"), "--out", str(segmented)])
    assert code == 1  # one image could not be read: the others are written, the failure recorded
    for sub in ("a", "b"):
        png = Image.open(segmented / sub / f"{image.name}.png")
        assert png.mode == "P" and png.size == Image.open(image).size
        assert np.asarray(png).max() < len(manifest["class_names"])
        record = json.loads((segmented / sub / f"{image.name}.json").read_text())
        assert record["image"].endswith(f"{sub}/{image.name}") and (record["height"], record["width"]) == png.size[::-1]
        assert all({"class", "score", "area", "bbox", "segmentation"} <= set(r) for r in record["segments"])
        assert record["provenance"]["bank"] == "sha256:" + hashlib.sha256((bank / "manifest.json").read_bytes()) \
            .hexdigest() and record["provenance"]["config"]["top_k"] == 1
        assert Image.open(segmented / sub / f"{image.name}.overlay.png").size[0] == png.size[0]
    failures = [json.loads(line) for line in (segmented / "failures.jsonl").read_text().splitlines()]
    assert [f["image"].endswith("broken.jpg") for f in failures] == [True] and "cannot read image" in failures[0]["reason"]


def test_clear_errors(small_voc, tmp_path, capsys):
    assert main(["segment", "--bank", str(tmp_path / "none"), "x.jpg", "--out", str(tmp_path)]) == 1
    assert "not a feature bank" in capsys.readouterr().err
    assert main(["eval", "--bank", str(tmp_path), "--data", str(small_voc), "--out", str(tmp_path / "o")]) == 1
    assert "not a feature bank" in capsys.readouterr().err
    assert main(["build-bank", "--data", str(tmp_path), "--out", str(tmp_path / "b")]) == 1
    assert "no split file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # a usage error: argparse's exit code 2
        main(["build-bank", "--data", str(small_voc), "--out", str(tmp_path / "b"), "--top-k", "five"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0 and "moduseg 0.1.0" in capsys.readouterr().out
    bad = small_voc.parent / "bad_labels"
    shutil.copytree(small_voc, bad)
    labels = json.loads((bad / "image_labels.json").read_text())
    labels[next(iter(labels))] = ["unicorn"]
    (bad / "image_labels.json").write_text(json.dumps(labels))
    assert main(["build-bank", "--data", str(bad), "--out", str(tmp_path / "b")]) == 1
    assert "unknown class names ['unicorn']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # a value Config refuses is a usage error, as "--top-k five" is
        main(["build-bank", "--data", str(small_voc), "--out", str(tmp_path / "b"), "--vote", "majority"])
    assert usage.value.code == 2 and "argument --vote: Config.vote must be one of" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["eval", "--bank", str(tmp_path), "--data", str(small_voc), "--out", str(tmp_path / "file")]) == 1
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"top_k": 3, "votes": "count"}))
    with pytest.raises(SystemExit) as usage:
        main(["build-bank", "--data", str(small_voc), "--out", str(tmp_path / "b"), "--config", str(settings)])
    assert usage.value.code == 2 and "unknown Config fields ['votes']" in capsys.readouterr().err


def test_console_script_is_installed():
    run = subprocess.run([sys.executable, "-m", "engine.cli", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "build-bank" in run.stdout and "report" in run.stdout


def test_triton_repo_configs_only(tmp_path, capsys):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")
    from engine.export import triton_config as tx

    assert main(["triton-repo", "--out", str(tmp_path), "--variants", "python", "onnx", "--configs-only",
                 "--max-batch-size", "4"]) == 0
    configs = tx.validate_repository(tmp_path)
    assert sorted(configs) == [triton_model_name(DEFAULT_BACKBONE, "onnx"),
                               triton_model_name(DEFAULT_BACKBONE, "python")]
    assert all(c.max_batch_size == 4 for c in configs.values())
    assert "config.pbtxt" in capsys.readouterr().out
    assert main(["triton-repo", "--out", str(tmp_path), "--backbone", "resnet/layer3", "--configs-only"]) == 1
    assert "unknown backbone" in capsys.readouterr().err


def test_triton_repo_knobs(tmp_path, capsys):
    """Every knob of the generated configs is reachable from the command line."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")
    import json

    from engine.export import triton_config as tx

    plan = tmp_path / "built-on-a100.plan"
    plan.write_bytes(b"engine")
    (tmp_path / "built-on-a100.plan.json").write_text(json.dumps(
        {"tensorrt": "10.3.0", "gpu": "NVIDIA A100", "compute_capability": "8.0", "min_side": 32, "max_side": 1024,
         "max_batch": 8}))
    repo = tmp_path / "repo"
    assert main(["triton-repo", "--out", str(repo), "--variants", "python", "tensorrt", "--instances", "2",
                 "--max-batch-size", "4", "--queue-delay-us", "50", "--gpus", "0,1", "--num-threads", "3",
                 "--no-warmup", "--max-side", "640", "--compute-capabilities", "8.6",
                 "--execution-env", "$$TRITON_MODEL_DIRECTORY/py.tar.gz", "--plan", str(plan), "--plan-cc", "8.0",
                 "--onnx", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "1/model.sm80.plan: TensorRT 10.3.0, built on NVIDIA A100 (compute capability 8.0)" in out
    configs = tx.validate_repository(repo)
    python, tensorrt = (configs[triton_model_name(DEFAULT_BACKBONE, v)] for v in ("python", "tensorrt"))
    for config in (python, tensorrt):
        assert config.max_batch_size == 4 and config.instance_group[0].count == 2 and not config.model_warmup
        assert config.dynamic_batching.max_queue_delay_microseconds == 50
    assert list(tensorrt.instance_group[0].gpus) == [0, 1] and sorted(tensorrt.cc_model_filenames) == ["8.0", "8.6"]
    assert tensorrt.parameters["max_side"].string_value == "640"  # the plan takes 1024: the stricter limit holds
    assert python.parameters["num_threads"].string_value == "3"
    assert python.parameters["EXECUTION_ENV_PATH"].string_value == "$$TRITON_MODEL_DIRECTORY/py.tar.gz"
    assert python.parameters["max_side"].string_value == "640"
    # the server's TensorRT version checked against the plans' records
    assert main(["triton-repo", "--out", str(repo), "--variants", "tensorrt", "--configs-only",
                 "--server-tensorrt", "10.3"]) == 0
    assert main(["triton-repo", "--out", str(repo), "--variants", "tensorrt", "--configs-only",
                 "--server-tensorrt", "10.5.0"]) == 1
    assert "built by TensorRT 10.3.0 on NVIDIA A100, the server has 10.5.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["triton-repo", "--out", str(repo), "--gpus", "0,-1", "--configs-only"])
    assert usage.value.code == 2
    assert "--gpus takes GPU ids >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_prints_urls_and_stops_the_server_on_sigterm(triton_launcher, repo_root, tmp_path):
    from engine.export import triton as tx
    from engine.models.backbones import model_path
    from engine.serving.server import free_port
    from engine.serving.server_env import SERVER_ENV_DIR

    tx.write_repository(tmp_path / "repo", DEFAULT_BACKBONE, variants=["python"],
                        onnx_path=model_path(DEFAULT_BACKBONE))
    ports = [str(free_port()) for _ in range(3)]
    command = [sys.executable, "-m", "engine.cli", "serve", "--repo", str(tmp_path / "repo"), "--http-port", ports[0],
               "--grpc-port", ports[1], "--metrics-port", ports[2], "--env", str(repo_root / SERVER_ENV_DIR)]
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server_pid = None
    try:
        lines = []
        for line in cli.stdout:
            lines.append(line)
            if line.startswith("use:"):
                break
        text = "".join(lines)
        assert f"HTTP    127.0.0.1:{ports[0]}" in text and f"gRPC    127.0.0.1:{ports[1]}" in text, text
        server_pid = int(re.search(r"tritonserver \(pid (\d+)\)", text).group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=5) as response:
            assert response.status == 200
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(60) == 0, cli.stdout.read()
        with pytest.raises(ProcessLookupError):
            for _ in range(100):  # the server is the CLI's child: gone once the CLI has reaped it
                os.kill(server_pid, 0)
                time.sleep(0.1)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        if server_pid is not None:
            try:
                os.kill(server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_config_file_then_flags(tmp_path):
    from engine.cli import build_parser
    from engine.cli_args import command_config

    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"top_k": 3, "region_purity": 0.7}))
    args = build_parser().parse_args(["eval", "--bank", "b", "--data", "d", "--out", "o", "--config", str(settings),
                                      "--top-k", "9"])
    config = command_config(args)
    assert (config.top_k, config.region_purity) == (9, 0.7)  # the flag wins over the file
    help_text = build_parser().parse_args(["segment", "--bank", "b", "x", "--out", "o"])  # parses
    assert help_text.overlay is True


def test_boolean_config_flags_parse_both_ways():
    from engine.cli import build_parser
    from engine.cli_args import command_config

    parser = build_parser()
    args = parser.parse_args(["eval", "--bank", "b", "--data", "d", "--out", "o", "--no-region-entries"])
    assert command_config(args).region_entries is False
    args = parser.parse_args(["eval", "--bank", "b", "--data", "d", "--out", "o", "--region-entries"])
    assert command_config(args).region_entries is True
    args = parser.parse_args(["eval", "--bank", "b", "--data", "d", "--out", "o", "--region-purity", "0.7"])
    assert command_config(args).region_purity == 0.7 and command_config(args).region_entries is True


def test_yaml_config_file(tmp_path):
    from engine.cli import build_parser
    from engine.cli_args import command_config

    settings = tmp_path / "settings.yaml"
    settings.write_text("top_k: 7\nregion_entries: false\n")
    args = build_parser().parse_args(["eval", "--bank", "b", "--data", "d", "--out", "o", "--config", str(settings)])
    config = command_config(args)
    assert (config.top_k, config.region_entries) == (7, False)


@pytest.mark.slow
def test_build_bank_merges_shards_and_appends(small_voc, tmp_path, capsys):
    from engine.bank import FeatureBank

    train = (small_voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for name, ids in (("first", train[:3]), ("rest", train[3:])):
        (small_voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    build = ["build-bank", "--data", str(small_voc), "--batch-size", "2"]
    assert main(build + ["--split", "train", "--out", str(tmp_path / "whole"), "--no-keep-parts"]) == 0
    assert not (tmp_path / "whole.parts").exists()
    for split in ("first", "rest"):
        assert main(build + ["--split", split, "--out", str(tmp_path / split), "--keep-parts"]) == 0
        assert (tmp_path / f"{split}.parts" / "parts.json").is_file()
    # merged shards, and the second shard appended to the first: both are the one build over all six images
    assert main(["build-bank", "--add-parts", str(tmp_path / "first.parts"), str(tmp_path / "rest.parts"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert main(build + ["--split", "rest", "--add-parts", str(tmp_path / "first.parts"),
                         "--out", str(tmp_path / "appended")]) == 0
    whole = FeatureBank.load(tmp_path / "whole")
    for name in ("merged", "appended"):
        bank = FeatureBank.load(tmp_path / name)
        np.testing.assert_array_equal(bank.vectors, whole.vectors)
        np.testing.assert_array_equal(bank.labels, whole.labels)
        assert bank.sources == whole.sources
    capsys.readouterr()
    assert main(build + ["--split", "first", "--add-parts", str(tmp_path / "first.parts"),
                         "--out", str(tmp_path / "twice")]) == 1
    assert "in parts of two builds" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    with pytest.raises(SystemExit) as usage:
        main(["build-bank", "--out", str(tmp_path / "nothing")])
    assert usage.value.code == 2 and "give --data" in capsys.readouterr().err


@pytest.mark.slow
def test_segment_resumes_and_reads_a_manifest(small_voc, tmp_path, capsys):
    bank = tmp_path / "bank"
    assert main(["build-bank", "--data", str(small_voc), "--out", str(bank), "--no-keep-parts"]) == 0
    images = sorted((small_voc / "JPEGImages").glob("*.jpg"))[:2]
    manifest = tmp_path / "images.txt"
    manifest.write_text("\n".join(str(p) for p in images) + "\n# a comment\nmissing.jpg\n")
    out = tmp_path / "out"
    segment = ["segment", "--bank", str(bank), "--manifest", str(manifest), "--out", str(out), "--no-overlay"]
    capsys.readouterr()
    assert main(segment) == 1  # the missing file is a recorded failure, not an error
    assert "2 written, 0 already done, 1 failed" in capsys.readouterr().out
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["image"] for f in failures] == [str(tmp_path / "missing.jpg")]
    records = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    assert len(records) == 3 and (out / "classes.json") in records and not list(out.rglob(".*"))
    assert main(segment) == 1
    assert "0 written, 2 already done, 1 failed" in capsys.readouterr().out
    assert records == {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}  # classes.json too: the same classes
    manifest.write_text("\n".join(str(p) for p in images) + "\n")
    assert main(segment + ["--no-resume"]) == 0
    assert "2 written, 0 already done, 0 failed, of 2 images" in capsys.readouterr().out
    assert not (out / "failures.jsonl").exists()
    manifest.write_text("# nothing\n")
    assert main(segment) == 1
    assert "lists no image paths" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "segment"])
def test_bank_building_knobs_other_than_the_banks_are_refused(toy_bank, tmp_path, capsys, command):
    # --erosion, --no-region-entries, ... were accepted by eval and segment, ignored, and written into metrics.json
    bank = toy_bank.save(tmp_path / "bank")
    assert (toy_bank.config.erosion, toy_bank.config.region_entries) == ("adaptive", True)
    run = {"eval": ["eval", "--bank", str(bank), "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "o")],
           "segment": ["segment", "--bank", str(bank), str(tmp_path / "x.jpg"), "--out", str(tmp_path / "o")]}[command]
    for flags, named in ((["--erosion", "fixed"], "--erosion fixed: a bank-building knob"),
                         (["--no-region-entries", "--outlier-ratio", "0.5"], "--outlier-ratio 0.5, "
                                                                             "--no-region-entries: bank-building"),
                         (["--index-train-size", "1000"], "--index-train-size 1000"),
                         (["--erosion-iterations", "5", "--top-k", "25"], "--erosion-iterations 5:")):
        with pytest.raises(SystemExit) as usage:
            main(run + flags)
        err = capsys.readouterr().err
        assert usage.value.code == 2 and named in err, err
        assert f"that {command} cannot change: the bank was built with" in err and "moduseg build-bank" in err
    settings = tmp_path / "paper.yaml"
    settings.write_text("erosion: fixed\ntop_k: 25\n")
    with pytest.raises(SystemExit) as usage:
        main(run + ["--config", str(settings)])
    assert usage.value.code == 2 and "erosion: 'fixed' (--config): a bank-building knob" in capsys.readouterr().err
    if command == "eval":  # the bank's own values, and an index trained here, pass on to the next check
        settings.write_text("erosion: adaptive\ntop_k: 25\n")
        for flags in (["--config", str(settings), "--region-entries", "--erosion", "adaptive"],
                      ["--index", "IVF4,Flat", "--index-train-size", "1000"]):
            assert main(run + flags) == 1
            err = capsys.readouterr().err
            assert "dataset" in err and "bank-building" not in err, err  # refused later, for the missing data


def test_flag_values_config_refuses_are_usage_errors(capsys):
    for flag, value, message in (("--smfa-eps", "inf", r"Config.smfa_eps must be a finite number in (0, 1]"),
                                 ("--smfa-eps", "nan", "Config.smfa_eps must be a finite number"),
                                 ("--smfa-eps", "-1", "Config.smfa_eps must be a finite number"),
                                 ("--objectness-threshold", "nan", "Config.objectness_threshold must be in [0, 1]"),
                                 ("--top-k", "0", "Config.top_k must be >= 1"),
                                 ("--top-k", "2.5", "expected an integer, got '2.5'")):
        with pytest.raises(SystemExit) as usage:
            main(["build-bank", "--out", "nowhere", flag, value])
        err = capsys.readouterr().err
        assert usage.value.code == 2 and f"argument {flag}: {message}" in err, err


@pytest.mark.parametrize("name, text, message", [
    ("missing.yaml", None, "missing.yaml: cannot read it: No such file or directory"),
    ("syntax.yaml", "top_k: [5\n", "syntax.yaml: not valid YAML"),
    ("tag.yaml", "top_k: !!python/object/apply:os.system ['echo owned']\n",
     "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("list.yaml", "- top_k\n- 5\n", "list.yaml: expected a mapping of Config fields, got list"),
    ("bomb.yaml", "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
        f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "top_k: *i\n",
     "an alias (*a): a config file may not use aliases"),
    ("deep.yaml", "top_k: " + "[" * 5000 + "]" * 5000, "nested more than 16 deep"),
    ("large.yaml", "# " + "x" * (16 * 1024) + "\ntop_k: 3\n", "large.yaml: larger than 16 KiB"),
    ("latin1.yaml", "vote: 'caf\xe9'\n", "latin1.yaml: not UTF-8 text"),
    ("nan.yaml", "smfa_eps: .nan\n", "nan.yaml: Config.smfa_eps must be a finite number"),
    ("keys.yaml", "1: 2\ntop_k: 3\n", "keys.yaml: unknown Config fields ['1']"),
    ("syntax.json", "{\"top_k\": 5,}", "syntax.json: not JSON"),
    ("deep.json", "[" * 5000 + "]" * 5000, "deep.json: not a config file: nested too deeply"),
    ("infinite.json", "{\"smfa_eps\": Infinity}", "infinite.json: Config.smfa_eps must be a finite number"),
])
def test_config_files_that_cannot_be_used_are_usage_errors(tmp_path, capsys, name, text, message):
    # each was a traceback (missing file, syntax error, python tag), or slow: a 413-byte alias bomb took 29 s and 4 GB
    import time

    path = tmp_path / name
    if text is not None:
        path.write_bytes(text.encode("latin-1" if name == "latin1.yaml" else "utf-8"))
    start = time.perf_counter()
    with pytest.raises(SystemExit) as usage:
        main(["build-bank", "--out", str(tmp_path / "bank"), "--config", str(path)])
    err = capsys.readouterr().err
    assert usage.value.code == 2 and "argument --config: " in err and message in err, err
    assert time.perf_counter() - start < 2 and not (tmp_path / "bank").exists()


def test_eval_and_segment_help_lists_the_bank_building_knobs_apart(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    fixed = text.split("bank-building knobs (fixed by the bank):")[1]
    assert "--erosion " in fixed and "--region-entries" in fixed and "--top-k" not in fixed


# ---------------------------------------------------------------------------------------- the command's contract


def _subcommands():
    import argparse

    from engine.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_flag_has_help_and_finite_choices_are_listed():
    """Was: --split, --backbone, eval's --bank / --data / --split, serve's ports and report's --datasets and --out
    had no help; --device, --vote, --erosion and --pooling took a word without saying which."""
    import argparse

    parser, commands = _subcommands()
    missing = [f"{name} {action.option_strings or action.dest}" for name, sub in [("moduseg", parser), *commands.items()]
               for action in sub._actions if not isinstance(action, argparse._HelpAction)
               and not (action.help and action.help.strip() and action.help != argparse.SUPPRESS)]
    assert not missing
    options = {(name, option): action for name, sub in commands.items() for action in sub._actions
               for option in action.option_strings}
    for name, option, choices in [("segment", "--device", ("cpu", "cuda")),
                                  ("segment", "--palette", ("auto", "voc", "camvid", "distinct")),
                                  ("segment", "--protocol", ("http", "grpc")),
                                  ("segment", "--vote", ("count", "balanced", "weighted", "softmax")),
                                  ("eval", "--erosion", ("fixed", "adaptive")),
                                  ("build-bank", "--pooling", ("soft", "hard")),
                                  ("build-bank", "--masks", ("gt", "pseudo")),
                                  ("eval", "--proposals", ("gt", "auto"))]:
        assert tuple(options[name, option].choices) == choices, (name, option)
    assert "effnet-lite2/multilayer" in options["build-bank", "--backbone"].help


@pytest.mark.parametrize("argv, message", [
    (["segment", "--bank", "B", "--url", "127.0.0.1:1", "x.jpg"], "give --bank (segment here) or --url"),
    (["segment", "x.jpg"], "give --bank (segment here) or --url (a Triton server's segmentation model), one of"),
    (["segment", "--url", "127.0.0.1:1", "--ray", "x.jpg"], "--url and --ray do not combine"),
    (["segment", "--url", "127.0.0.1:1", "--header", "novalue", "x.jpg"], "--header 'novalue': expected KEY=VALUE"),
    (["segment", "--url", "127.0.0.1:1", "--top-k", "3", "x.jpg"], "top_k: the served model segments with its own"),
    (["segment", "--bank", "B", "--device", "tpu", "x.jpg"], "argument --device: invalid choice: 'tpu'"),
    (["build-bank"], "give --data (images to featurise) and/or --add-parts"),
    (["build-bank", "--data", "D", "--parts", "P", "--no-keep-parts"], "--parts P with --no-keep-parts"),
    (["triton-repo", "--bank", "B", "--variants", "onnx", "--segment-backbone", "python"],
     "--segment-backbone python is not among --variants onnx"),
    (["eval", "--bank", "B", "--data", "D", "--vote", "most"], "argument --vote: Config.vote must be one of"),
])
def test_usage_errors_exit_2_and_make_no_folder(tmp_path, monkeypatch, capsys, argv, message):
    """Was: contradicting flags (--bank with --url, --url with --ray, no --data nor --add-parts, ...) were the
    engine's error, exit 1, while the README says usage errors exit 2."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as usage:
        main(argv + ["--out", "out"])
    err = capsys.readouterr().err
    assert usage.value.code == 2 and message in err, err
    assert os.listdir(tmp_path) == []


def test_a_wrong_data_root_or_split_is_named(small_voc, toy_bank, tmp_path, capsys):
    """Was: "dataset X: no split file X/ImageSets/Segmentation/val.txt" for a mistyped root and a mistyped split
    alike; and eval, report made their --out folder before finding out."""
    bank = toy_bank.save(tmp_path / "bank")
    data = tmp_path / "data"
    data.mkdir()
    (data / "voc2012-mini").symlink_to(small_voc)
    for argv, message in [
        (["build-bank", "--data", str(tmp_path / "nowhere")], f"dataset root {tmp_path / 'nowhere'}: no such folder"),
        (["build-bank", "--data", str(tmp_path)], f"dataset root {tmp_path}: not in the VOC layout"),
        (["build-bank", "--data", str(small_voc), "--split", "trian"],
         f"dataset {small_voc}: no split 'trian' ({small_voc}/ImageSets/Segmentation/trian.txt missing); its "
         "splits: "),  # train, val and those other tests add
        (["eval", "--bank", str(bank), "--data", str(small_voc), "--split", "test"], "no split 'test'"),
        (["report", "--data-root", str(tmp_path / "nowhere")], f"data root {tmp_path / 'nowhere'}: no such folder"),
        (["report", "--data-root", str(data), "--datasets", "voc2021"],
         f"data root {data}: no data set 'voc2021'; it holds: voc2012-mini"),
    ]:
        assert main(argv + ["--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert message in err and ("its splits" not in err or "train, val" in err), err
        assert not (tmp_path / "out").exists(), argv


def test_a_run_that_fails_before_its_work_leaves_no_output_folder(small_voc, toy, toy_bank, tmp_path, monkeypatch,
                                                                  capsys):
    """Was: segment made --out before making its engine or reaching the server, and eval before finding an image
    without ground truth: a failed run left an empty folder (or one holding predictions/)."""
    out = tmp_path / "out"
    image = next((small_voc / "JPEGImages").glob("*.jpg"))
    assert main(["segment", "--bank", str(tmp_path / "nothing"), str(image), "--out", str(out)]) == 1
    assert "not a feature bank" in capsys.readouterr().err
    # nothing answers at port 1: the client's retries run out (a few seconds) before any folder is made
    assert main(["segment", "--url", "127.0.0.1:1", str(image), "--out", str(out)]) == 1
    assert "Triton http server at 127.0.0.1:1" in capsys.readouterr().err
    monkeypatch.setattr("engine.models.create_backbone", lambda name, **kw: (_ for _ in ()).throw(
        __import__("engine").ModelError(f"cannot load {name}")))
    bank = toy_bank.save(tmp_path / "bank")
    assert main(["segment", "--bank", str(bank), str(image), "--out", str(out)]) == 1
    assert "cannot load test/color" in capsys.readouterr().err
    assert not out.exists()
    # eval: the bank's classes are not the data's; an image of the split has no ground truth
    assert main(["eval", "--bank", str(bank), "--data", str(small_voc), "--out", str(out)]) == 1
    assert "differ from the dataset's" in capsys.readouterr().err
    from engine import Config, FeatureBank
    from engine.data import VOC_CLASSES

    voc_bank = FeatureBank.build(toy.samples(np.random.default_rng(0)), toy.ColorBackbone(), VOC_CLASSES,
                                 Config(min_area=100, top_k=3), progress=False)
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(small_voc, unlabelled)
    first = (unlabelled / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    (unlabelled / "SegmentationClass" / f"{first}.png").unlink()
    assert main(["eval", "--bank", str(voc_bank.save(tmp_path / "voc_bank")), "--data", str(unlabelled),
                 "--save-predictions", "--out", str(out)]) == 1
    assert f"no ground truth for 1 of 3 images ({first}; expected SegmentationClass/ID.png)" in \
        capsys.readouterr().err
    assert not out.exists()


def test_build_bank_writes_parts_only_when_asked(small_voc, toy, tmp_path, monkeypatch, capsys):
    """Was: every local build wrote OUT.parts beside the bank (79 MB beside a 76 MB bank), needed only to merge or
    append to it later."""
    monkeypatch.setattr("engine.models.create_backbone", lambda name, **kw: toy.ColorBackbone(id=name))
    build = ["build-bank", "--data", str(small_voc), "--no-region-entries", "--top-k", "1"]
    assert main(build + ["--out", str(tmp_path / "plain")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"] and "parts:" not in capsys.readouterr().out
    assert main(build + ["--out", str(tmp_path / "kept"), "--keep-parts"]) == 0
    assert (tmp_path / "kept.parts" / "parts.json").is_file()
    assert main(build + ["--out", str(tmp_path / "elsewhere"), "--parts", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "parts.json").is_file() and not (tmp_path / "elsewhere.parts").exists()
    assert f"(parts: {tmp_path / 'mine'})" in capsys.readouterr().out


def test_segment_at_the_other_protocols_port_is_told_so(not_http_port, small_voc, tmp_path, monkeypatch, capsys):
    """Was: `moduseg segment --url HOST:8001` (the gRPC port, the protocol left at http) ended in "HTTPParseError:
    ('Expected HTTP/, RTSP/ or ICE/', 8)"; and a grpc:// address was read as HTTP unless --protocol grpc was given."""
    from types import SimpleNamespace

    monkeypatch.setattr("engine.models.triton_runtime.time", SimpleNamespace(monotonic=time.monotonic,
                                                                             sleep=lambda seconds: None))
    image, out = next((small_voc / "JPEGImages").glob("*.jpg")), tmp_path / "out"
    assert main(["segment", "--url", f"127.0.0.1:{not_http_port}", str(image), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Is this the gRPC port? The answer was not HTTP/1.1: try --protocol grpc" in err and not out.exists()
    assert main(["segment", "--url", f"grpc://127.0.0.1:{not_http_port}", str(image), "--out", str(out)]) == 1
    assert f"Triton grpc server at 127.0.0.1:{not_http_port}" in capsys.readouterr().err  # the scheme's protocol
    with pytest.raises(SystemExit) as usage:
        main(["segment", "--url", f"grpc://127.0.0.1:{not_http_port}", "--protocol", "http", str(image), "--out",
              str(out)])
    assert usage.value.code == 2 and "is a grpc address: --protocol http contradicts it" in capsys.readouterr().err
    assert not out.exists()
