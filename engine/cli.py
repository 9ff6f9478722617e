"""The `moduseg` command: build-bank, eval, segment.

    moduseg build-bank --data ROOT --split train --masks gt|pseudo --out BANK_DIR
    moduseg eval --bank BANK_DIR --data ROOT --split val --proposals gt|auto --out RESULT_DIR
    moduseg segment --bank BANK_DIR IMAGES... --out DIR
    moduseg triton-repo --out REPO [--backbone NAME] [--variants python onnx tensorrt] [--gpus 0,1] [--no-warmup] ...
    moduseg serve --repo REPO [--http-port 8000 --grpc-port 8001] [--server-arg=--log-verbose=1]
    moduseg triton-env [--env DIR]
    moduseg info [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from . import __version__
from .config import BANK_FIELDS, EROSIONS, POOLINGS, VOTES, Config
from .errors import InputError, ModuSegError
from .registry import DEFAULT_BACKBONE, backbone_names



def _add_config_flags(parser: argparse.ArgumentParser, bank: str = "build") -> None:
    """One flag per Config field (--top-k, --vote, ...) with its documented meaning, and --config FILE (JSON or YAML,
    any Config fields); unset flags keep the file's, then the bank's or the default value. A value Config refuses,
    or a --config file that cannot be read, is a usage error (exit 2).

    bank: "build" for build-bank; "fixed" for commands that use a built bank (eval, segment): its bank-building
    knobs (BANK_FIELDS) are listed apart, and a value other than the bank's is refused (see _config)."""
    group = parser.add_argument_group("method knobs (engine.Config)")
    group.add_argument("--config", dest="config_values", type=_read_config_file, default=None, metavar="FILE",
                       help=f"a JSON or YAML file of Config fields, at most {CONFIG_FILE_LIMIT // 1024} KiB (flags "
                            "given too take precedence)")
    fixed = None
    if bank == "fixed":
        fixed = parser.add_argument_group(
            "bank-building knobs (fixed by the bank)",
            "The bank was built with these: its values are used, and another value is refused (exit 2); rebuild the "
            "bank with `moduseg build-bank` to change them.")
    meanings = _field_docs()
    for f in dataclasses.fields(Config):
        kind, flag = type(f.default), f"--{f.name.replace('_', '-')}"
        text = f"{meanings.get(f.name, '')} (default {f.default})".strip()
        where = fixed if fixed is not None and f.name in BANK_FIELDS else group
        if kind is bool:  # --region-entries / --no-region-entries
            where.add_argument(flag, dest=f"config_{f.name}", action=argparse.BooleanOptionalAction, default=None,
                               help=text)
            continue
        choices = CONFIG_CHOICES.get(f.name)  # listed by --help; a wrong value is refused by Config's own message
        where.add_argument(flag, dest=f"config_{f.name}", type=_field_type(f.name, kind), default=None,
                           choices=choices, metavar=None if choices else kind.__name__.upper(), help=text)
    parser.set_defaults(config_parser=parser)  # for the usage errors _config finds once the bank is loaded


#: the Config fields that take one of a few words
CONFIG_CHOICES = {"vote": VOTES, "erosion": EROSIONS, "pooling": POOLINGS}


def _field_type(name: str, kind: type):
    """argparse type of the flag of Config field `name`: the text as `kind`, refused (a usage error naming the flag)
    unless Config accepts it, so --smfa-eps nan stops at the command line."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
                from None
        try:
            Config(**{name: value})
        except InputError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    parse.__name__ = kind.__name__
    return parse


def _field_docs() -> dict[str, str]:
    """Config's docstring, one line of meaning per field (what the --help of each flag says)."""
    docs, name = {}, None
    for line in (Config.__doc__ or "").splitlines():
        stripped = line.strip()
        head, _, rest = stripped.partition(": ")
        if head in {f.name for f in dataclasses.fields(Config)} and rest:
            name, docs[head] = head, rest
        elif name and line.startswith(" " * 12) and stripped:
            docs[name] += " " + stripped
        else:
            name = None
    return {k: v.replace("%", "%%") for k, v in docs.items()}


def _config(args, base: Config | None = None) -> Config:
    """The command's Config: `base` (a bank's config for eval and segment, else the defaults), then the --config
    file's fields, then the flags given.

    With a bank, a bank-building knob (BANK_FIELDS) set to another value than the bank's is a usage error naming
    build-bank: the bank fixes it, and the engine would ignore it while metrics.json recorded it as applied.
    index_train_size is the exception where it applies: Config.index names another approximate index than the
    bank's, which the engine then trains itself."""
    from_bank = base is not None
    base = base or Config()
    values = dict(getattr(args, "config_values", None) or {})
    flags = {f.name: getattr(args, f"config_{f.name}") for f in dataclasses.fields(Config)
             if getattr(args, f"config_{f.name}", None) is not None}
    config = base.replace(**{**values, **flags})
    if from_bank:
        changed = [name for name in BANK_FIELDS if getattr(config, name) != getattr(base, name)]
        if config.index not in ("Flat", base.index) and "index_train_size" in changed:
            changed.remove("index_train_size")
        if changed:
            given = [_flag(name, getattr(config, name)) if name in flags else f"{name}: {getattr(config, name)!r} "
                     "(--config)" for name in changed]
            message = (f"{', '.join(given)}: {'a bank-building knob' if len(given) == 1 else 'bank-building knobs'} "
                       f"that {args.command} cannot change: the bank was built with "
                       f"{', '.join(f'{name}={getattr(base, name)!r}' for name in changed)}. Rebuild it with them "
                       f"(moduseg build-bank ... {' '.join(_flag(name, getattr(config, name)) for name in changed)}), "
                       "or leave them out")
            parser = getattr(args, "config_parser", None)
            if parser is None:
                raise InputError(message)
            parser.error(message)
    return config


def _flag(name: str, value) -> str:
    """The command-line form of Config field `name` set to `value`."""
    option = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{option}" if value else f"--no-{option}"
    return f"--{option} {value}"


#: the largest --config file read: a Config is some twenty fields, under 1 KiB; the limit keeps a wrong or hostile
#: file from being read whole, and bounds the pure-Python YAML parser's time (at most 0.5 s measured at 16 KiB)
CONFIG_FILE_LIMIT = 16 * 1024


def _read_config_file(path) -> dict:
    """Config fields from a JSON file, or a YAML one (with PyYAML installed), as Config checks them: argparse's type
    for --config, so a file that is missing, too large, not UTF-8, not JSON or YAML, not a mapping, or holding
    unknown fields or values Config refuses is a usage error (exit 2) naming the file and the problem.

    YAML is read by a safe loader without aliases (_yaml_loader): a config file needs none, and a few hundred bytes of
    nested aliases ("billion laughs") expand to billions of values downstream."""
    def refuse(message: str):
        return argparse.ArgumentTypeError(f"{path}: {message}")

    try:
        with open(path, "rb") as handle:
            data = handle.read(CONFIG_FILE_LIMIT + 1)
    except OSError as error:
        raise refuse(f"cannot read it: {error.strerror or error}") from None
    if len(data) > CONFIG_FILE_LIMIT:
        raise refuse(f"larger than {CONFIG_FILE_LIMIT // 1024} KiB; a config file holds a few Config fields")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise refuse(f"not UTF-8 text: {error}") from None
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise refuse("reading YAML needs PyYAML (pip install pyyaml), or give JSON") from None
        try:
            values = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a safe loader, with aliases refused)
        except yaml.YAMLError as error:
            raise refuse(f"not valid YAML (or a YAML feature a config file may not use): {error}") from None
        except RecursionError:
            raise refuse("not a config file: nested too deeply") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise refuse(f"not JSON: {error}") from None
        except RecursionError:
            raise refuse("not a config file: nested too deeply") from None
    if not isinstance(values, dict):
        raise refuse(f"expected a mapping of Config fields, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(repr(key) if not isinstance(key, str) else key for key in values if key not in known)
    if unknown:
        raise refuse(f"unknown Config fields {unknown[:10]}" + (f" and {len(unknown) - 10} more" if len(unknown) > 10
                     else "") + f"; known: {sorted(known)}")
    try:
        Config(**values)
    except InputError as error:
        raise refuse(str(error)) from None
    return values


#: how deep [ ] and { } may nest in a YAML config file (its values are plain: depth 1); PyYAML's scanner takes time
#: quadratic in the depth (60 s for 8000 levels in 16 KiB)
YAML_FLOW_DEPTH = 16


def _yaml_loader():
    """yaml.SafeLoader (plain data only: a python tag is an error) that refuses aliases (*name) and [ ] or { } nested
    deeper than YAML_FLOW_DEPTH."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"an alias (*{event.anchor}): a config file may not "
                                                  "use aliases", event.start_mark)
            return super().compose_node(parent, index)

        def fetch_flow_collection_start(self, TokenClass):
            if self.flow_level >= YAML_FLOW_DEPTH:
                raise yaml.scanner.ScannerError(None, None, f"[ ] or {{ }} nested more than {YAML_FLOW_DEPTH} deep: "
                                                "a config file holds plain values", self.get_mark())
            return super().fetch_flow_collection_start(TokenClass)

    return ConfigLoader


def _add_ray_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help=f"{what}; without ADDRESS a local cluster is started (or RAY_ADDRESS used), else "
                             "ray.init(address=ADDRESS) (needs pip install 'moduseg-engine[ray]')")
    parser.add_argument("--actors", type=int, default=None, metavar="N",
                        help="Ray actors (default: one per GPU in the cluster, else one per CPU)")


def _chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def cmd_build_bank(args) -> int:
    from .bank import FeatureBank, bank_parts, load_parts, merge_parts, save_parts
    from .data import VOCDataset
    from .errors import BankError
    from .models import create_backbone
    from .models.embedded import resolve_proposer

    config = _config(args)
    if args.data is None and not args.add_parts:
        _usage_error("build-bank", "give --data (images to featurise) and/or --add-parts (parts of earlier builds to "
                                   "merge)")
    if args.parts is not None and args.keep_parts is False:
        _usage_error("build-bank", f"--parts {args.parts} with --no-keep-parts: nothing would be written there")
    keep_parts = bool(args.keep_parts or args.parts)  # parts are about the bank's size again: only when asked
    parts_dir = Path(args.parts) if args.parts else Path(f"{args.out}.parts")
    for target in (Path(args.out), parts_dir if keep_parts else None):
        if target is not None and target.exists() and not args.overwrite:
            raise BankError(f"{target} exists; pass --overwrite to replace it")
    backbone = create_backbone(args.backbone, batch_size=config.batch_size, num_threads=config.num_threads)
    class_names, groups, provenance = None, [], {"masks": args.masks}
    for earlier in args.add_parts or []:
        parts, record = load_parts(earlier)
        if record["backbone"].get("id") != backbone.id or int(record["backbone"].get("dim", -1)) != backbone.dim:
            raise BankError(f"--add-parts {earlier}: built with backbone {record['backbone'].get('id')}, this build "
                            f"runs {backbone.id}")
        if class_names is not None and tuple(record["class_names"]) != class_names:
            raise BankError(f"--add-parts {earlier}: classes {record['class_names']} differ from {list(class_names)}")
        class_names = tuple(record["class_names"])
        groups.append(parts)
    provenance["added_parts"] = [str(Path(p).resolve()) for p in args.add_parts or []]
    start = time.perf_counter()
    if args.data is not None:
        dataset = VOCDataset(args.data, args.split)
        if class_names is not None and tuple(dataset.class_names) != class_names:
            raise BankError(f"{args.data}: classes {list(dataset.class_names)} differ from the added parts' "
                            f"{list(class_names)}")
        class_names = tuple(dataset.class_names)
        provenance.update({"data": str(Path(args.data).resolve()), "split": args.split, "images": len(dataset)})
        if args.ray is not None:
            from .distributed import build_parts_ray

            groups.append(build_parts_ray(args.data, args.split, args.masks, args.backbone, config,
                                          address=args.ray or None, actors=args.actors))
            provenance["proposer"] = "embedded" if config.region_entries else None
            provenance["ray"] = args.ray or "local"
        else:
            samples = dataset
            if args.masks == "pseudo":
                from .models.pseudo_masks import pseudo_mask_samples

                samples = pseudo_mask_samples(dataset, config, backbone=backbone)
            proposer = resolve_proposer("embedded", config) if config.region_entries else None
            provenance["proposer"] = getattr(proposer, "name", None)
            groups.append(list(bank_parts(samples, backbone, class_names, config, proposer, total=len(dataset))))
    parts = merge_parts(*groups)
    keep = None
    if args.ray is not None:
        from .distributed import reject_outliers_ray

        keep = reject_outliers_ray(parts, config, address=args.ray or None)
    if keep_parts:
        save_parts(parts, parts_dir, class_names, backbone.describe(), config, overwrite=args.overwrite)
    bank = FeatureBank.from_parts(parts, class_names, backbone.describe(), config, provenance, keep=keep)
    bank.save(args.out, overwrite=args.overwrite)
    counts = {n: int(c) for n, c in zip(bank.class_names, bank.class_counts()) if c}
    print(f"bank: {len(bank)} vectors ({bank.dim}-d, {bank.backbone['id']}) from {sum(len(p.images) for p in parts)} "
          f"images in {time.perf_counter() - start:.1f} s -> {args.out}"
          + (f" (parts: {parts_dir})" if keep_parts else ""))
    print(f"per class: {counts}")
    return 0


def cmd_verify_bank(args) -> int:
    """Every byte of a bank directory against its manifest's checksums (loads check sizes and file ends only)."""
    from .bank import FeatureBank

    start = time.perf_counter()
    manifest = FeatureBank.verify(args.bank)
    total = sum(record["bytes"] for record in manifest["files"].values())
    print(f"{args.bank}: bank format {manifest['version']}, {manifest['size']:,} x {manifest['dim']} vectors, index "
          f"{manifest['config']['index']} ({manifest['index_storage']}); {len(manifest['files'])} files, "
          f"{total / 2**20:.1f} MiB, all checksums match ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from .bank import FeatureBank
    from .data import VOCDataset, save_label_map
    from .eval import ConfusionMatrix, markdown_table
    from .models import ground_truth_proposals
    from .pipeline import Engine

    bank = FeatureBank.load(args.bank)
    config = _config(args, bank.config)
    dataset = VOCDataset(args.data, args.split)
    if tuple(dataset.class_names) != bank.class_names:
        raise ModuSegError(f"the bank's classes {list(bank.class_names)} differ from the dataset's "
                           f"{list(dataset.class_names)}")
    missing = [i for i in dataset.ids if not dataset.mask_path(i).is_file()]
    if missing:
        raise InputError(f"--data {args.data} --split {args.split}: no ground truth for {len(missing)} of "
                         f"{len(dataset)} images ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; "
                         f"expected SegmentationClass/ID.png)")
    _writable_out(args.out)
    # ground-truth proposals are passed per batch below; "auto" is the engine's embedded proposer
    engine = Engine(bank, proposer="embedded" if args.proposals == "auto" else None, config=config)
    out = _output_dir(args.out)  # made once the bank, the data and the engine are there
    if args.save_predictions:
        (out / "predictions").mkdir(exist_ok=True)
    confusion = ConfusionMatrix(bank.class_names)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with tqdm(total=len(dataset), desc=f"eval {args.split}", unit="img") as bar:
        for indices in _chunks(range(len(dataset)), config.batch_size):
            samples = [dataset[i] for i in indices]
            proposals = [ground_truth_proposals(s.mask) for s in samples] if args.proposals == "gt" else None
            for sample, result in zip(samples, engine.segment_batch([s.image for s in samples], proposals)):
                confusion.update(result.label_map, sample.mask)
                if args.save_predictions:
                    save_label_map(result.label_map, out / "predictions" / f"{sample.id}.png", dataset.palette)
            bar.update(len(samples))
    elapsed = time.perf_counter() - start
    summary = confusion.summary()
    summary.update({"bank": str(args.bank), "data": str(args.data), "split": args.split,
                    "proposals": args.proposals, "config": config.to_dict(), "seconds": round(elapsed, 2),
                    "stage_seconds": {k: round(v, 3) for k, v in engine.times.seconds.items()}})
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics.md").write_text(markdown_table(summary) + "\n")
    print(markdown_table(summary))
    print(f"mIoU {summary['miou']:.2f} over {summary['images']} images ({elapsed:.1f} s) -> {out / 'metrics.json'}")
    return 0


def cmd_segment(args) -> int:
    """Segment the inputs into --out (outputs named as engine.outputs says), resuming from records that still hold;
    a failure of one item (reading, segmenting or writing it) is recorded and the run goes on."""
    from .bank import FeatureBank
    from .outputs import OutputConflict, bank_id, find_inputs, plan_run, run_provenance, write_classes

    _check_segment_flags(args)
    config, headers = None, _headers(args.header)
    if args.url is None:
        bank = FeatureBank.load(args.bank)  # checked here, before any work, also when Ray actors load it again
        config = _config(args, bank.config)
    try:
        inputs = find_inputs(args.images, args.manifest, out=args.out)
    except OutputConflict as error:
        _usage_error("segment", str(error))
    _writable_out(args.out)
    rendering = {"output_mode": args.output_mode, "palette": args.palette, "opacity": args.opacity}
    if args.ray is not None:
        from .distributed import segment_ray

        out = _output_dir(args.out)  # the Ray cluster starts inside segment_ray
        write_classes(out, bank.class_names, args.palette)
        summary = segment_ray(inputs, out, args.bank, config, address=args.ray or None, actors=args.actors,
                              with_overlay=args.overlay, resume=args.resume, device=args.device, **rendering)
    else:
        if args.url is None:
            from .pipeline import Engine

            engine = Engine(bank, config=config, device=args.device)
            run = run_provenance(bank=bank_id(args.bank), config=config, **rendering)
        else:
            from .remote import RemoteEngine

            engine = RemoteEngine(args.url, model_name=args.model, protocol=args.protocol,
                                  concurrency=args.concurrency, headers=headers)
            run = run_provenance(server={"url": args.url, "model": args.model}, **rendering)
        out = _output_dir(args.out)  # made once the inputs, the bank and the engine (or the server) are there
        write_classes(out, engine.class_names if args.url else bank.class_names, args.palette)
        plan = plan_run(inputs, out, run, resume=args.resume, with_overlay=args.overlay)
        batch_size = config.batch_size if config is not None else engine.concurrency
        summary = _segment_here(engine, inputs, plan, out, args.overlay, batch_size)
    failures = summary["failures"]
    _record_failures(out, failures, len(inputs))
    print(f"{summary['written']} written, {summary['done_before']} already done, {len(failures)} failed, of "
          f"{len(inputs)} images: label maps + JSON records{' + overlays' if args.overlay else ''} -> {_shown(out)}"
          + (" (all done)" if not failures else ""))
    if summary["stale"]:
        print(f"{sum(summary['stale'].values())} of them redone because their record was stale: "
              + ", ".join(f"{reason} {count}" for reason, count in sorted(summary["stale"].items())))
    return 1 if failures else 0


def _check_segment_flags(args) -> None:
    """Flags of `segment` that contradict each other: a usage error (exit 2) naming them."""
    if (args.bank is None) == (args.url is None):
        _usage_error("segment", "give --bank (segment here) or --url (a Triton server's segmentation model), "
                                f"{'not both' if args.bank is not None else 'one of them'}")
    if args.url is not None and args.ray is not None:
        _usage_error("segment", "--url and --ray do not combine: scale a served model with server replicas instead")
    if args.url is not None:  # a grpc:// address read as HTTP got "HTTPParseError" and no more
        scheme = args.url.partition("://")[0].lower() if "://" in args.url else ""
        implied = {"http": "http", "https": "http", "grpc": "grpc", "grpcs": "grpc"}.get(scheme)
        if implied and args.protocol not in (None, implied):
            _usage_error("segment", f"--url {args.url} is a {implied} address: --protocol {args.protocol} "
                                    "contradicts it")
        args.protocol = args.protocol or implied or "http"
    if args.url is not None:  # the served model holds its bank's config: a flag here would be ignored
        given = [f.name for f in dataclasses.fields(Config) if getattr(args, f"config_{f.name}", None) is not None]
        given += ["--config"] if getattr(args, "config_values", None) else []
        if given:
            _usage_error("segment", f"{', '.join(given)}: the served model segments with its own bank's config; "
                                    "--url takes no config flags (set them when its repository is written)")
    try:
        _headers(args.header)
    except InputError as error:
        _usage_error("segment", str(error))


def _segment_here(engine, inputs, plan, out: Path, with_overlay: bool, batch_size: int) -> dict:
    """Segment `plan.todo` in this process (an Engine, or a RemoteEngine's server) and write each item's outputs;
    any exception while reading, segmenting or writing an item is that item's failure. Returns segment_ray's
    summary."""
    from tqdm.auto import tqdm

    from .outputs import write_outputs
    from .pipeline import Skipped

    reasons = dict(plan.failures)  # image path -> why it failed; "" when written
    with tqdm(total=len(plan.todo), desc="segment", unit="img") as bar:
        def finish(item, provenance, result) -> None:
            bar.update(1)
            if isinstance(result, Skipped):
                reasons[str(item.path)] = result.reason
                return
            try:
                write_outputs(item, result, out, provenance, with_overlay)
                reasons[str(item.path)] = ""
            except Exception as error:  # noqa: BLE001 - disk full, read-only folder, ...: this item's failure
                reasons[str(item.path)] = f"cannot write its outputs: {type(error).__name__}: {error}"

        _each_result(engine, plan.todo, batch_size, finish)
    return {"images": len(inputs), "done_before": plan.done, "stale": plan.stale,
            "written": sum(1 for item, _ in plan.todo if reasons.get(str(item.path)) == ""),
            "failures": [{"image": str(item.path), "reason": reasons[str(item.path)]} for item in inputs
                         if reasons.get(str(item.path))]}


def _each_result(engine, todo: list, batch_size: int, finish) -> None:
    """finish(item, provenance, result or Skipped) for each (item, provenance) of `todo`, in order, segmented as a
    stream. The stream's stages hand an exception on in order, so when one escapes, the results before the batch
    that raised have all arrived: that batch is redone one image at a time (the image that raises becomes a Skipped
    with the error), and the stream starts again after it."""
    from .pipeline import Skipped

    position = 0
    while position < len(todo):
        try:
            for result in engine.segment_stream([item.path for item, _ in todo[position:]], batch_size=batch_size,
                                                on_error="skip"):
                finish(*todo[position], result)
                position += 1
        except Exception:  # noqa: BLE001 - found and recorded below, image by image
            for item, provenance in todo[position:position + batch_size]:
                try:
                    result = engine.segment_batch([item.path], on_error="skip")[0]
                except Exception as error:  # noqa: BLE001 - this image's failure
                    result = Skipped(0, str(item.path), f"{type(error).__name__}: {error}")
                finish(item, provenance, result)
            position += batch_size


def _record_failures(out: Path, failures: list[dict], images: int) -> None:
    """OUT/failures.jsonl; when even that cannot be written (a full disk), the failures go to stderr instead."""
    from .outputs import FAILURES_FILE, write_failures

    try:
        write_failures(out, failures)
    except OSError as error:
        print(f"cannot write {_shown(out / FAILURES_FILE)} ({error}); the failures:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure['image']}: {failure['reason']}", file=sys.stderr)
        return
    if failures:
        print(f"{len(failures)} of {images} images failed (reasons in {_shown(out / FAILURES_FILE)})", file=sys.stderr)


def _shown(path) -> str:
    """A path as printable text: bytes of a name that is not UTF-8 as \\x escapes (stdout would refuse them)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _usage_error(command: str, message: str) -> NoReturn:
    """A usage error found after parsing (the arguments contradict each other or the files they name): argparse's
    form and exit code 2."""
    print(f"moduseg {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _headers(pairs) -> dict[str, str]:
    """--header KEY=VALUE (repeatable) -> {KEY: VALUE}."""
    headers = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--header {pair!r}: expected KEY=VALUE")
        headers[key.strip()] = value
    return headers


def _writable_out(path) -> Path:
    """--out checked before any work, without making it: an InputError if it is a file, or if no file can be made in
    it or, while it does not exist, in its nearest existing folder (a read-only file system, no permission). The
    folder itself is made by _output_dir once the inputs, the bank and the models are checked, so that a run that
    fails before its work leaves no folder behind."""
    import tempfile

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {_shown(out)} is a file; name a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--out {_shown(out)}: {_shown(existing)} is a file, so no folder can be made there")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # whether files can be made (permission bits do not say as root)
    except OSError as error:
        raise InputError(f"--out {_shown(out)}: cannot write there: {error}") from error
    return out


def _output_dir(path) -> Path:
    """--out, created if missing; an InputError if it is a file or cannot be written (as _writable_out)."""
    import tempfile

    out = _writable_out(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise InputError(f"--out {_shown(out)}: cannot write there: {error}") from error
    return out


def _opacity(text: str) -> float:
    """--opacity: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 (the image alone) to 1 (the colours alone), got "
                                         f"{text!r}")
    return value


def _gpu_ids(text: str) -> list[int]:
    """--gpus 0,1 -> [0, 1]."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus takes comma-separated GPU ids, e.g. 0,1; got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"--gpus takes GPU ids >= 0, e.g. 0,1; got {text!r}")
    return ids


def cmd_triton_repo(args) -> int:
    from .export.triton import DEFAULT_PLAN_CCS, plan_records, plan_version_problems, write_repository

    bank_backbone = None
    if args.bank is not None:
        from .bank import FeatureBank

        if args.segment_backbone not in args.variants:
            _usage_error("triton-repo", f"--segment-backbone {args.segment_backbone} is not among --variants "
                                        f"{' '.join(args.variants)}")
        bank_backbone = FeatureBank.load(args.bank).backbone_name
        if args.backbone not in (None, bank_backbone):
            _usage_error("triton-repo", f"--backbone {args.backbone} differs from the bank's backbone "
                                        f"{bank_backbone}: leave it out, or give a bank built with it")
    written = write_repository(args.out, backbone=args.backbone or bank_backbone, variants=args.variants,
                               with_models=not args.configs_only, onnx_path=args.onnx, plan_path=args.plan,
                               plan_cc=args.plan_cc, max_batch_size=args.max_batch_size, instances=args.instances,
                               num_threads=args.num_threads, queue_delay_us=args.queue_delay_us, gpus=args.gpus,
                               warmup=args.warmup, max_side=args.max_side,
                               compute_capabilities=args.compute_capabilities or DEFAULT_PLAN_CCS,
                               execution_env=args.execution_env)
    for name, path in written.items():
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        print(f"{path}: {', '.join(files)}")
        for plan, record in plan_records(path).items():
            if record is None or not record.get("tensorrt"):
                print(f"  {plan}: TensorRT version unknown (no build record): it must equal the server's")
            else:
                print(f"  {plan}: TensorRT {record['tensorrt']}, built on {record.get('gpu')} (compute capability "
                      f"{record.get('compute_capability')}); sides {record.get('min_side')}..{record.get('max_side')}, "
                      f"batch <= {record.get('max_batch')}")
    if args.bank is not None:
        from .export.triton_segment import write_segment_model
        from .registry import triton_model_name

        model_dir = write_segment_model(
            args.out, args.bank, triton_model_name(bank_backbone, args.segment_backbone),
            max_batch_size=args.max_batch_size, instances=args.segment_instances, queue_delay_us=args.queue_delay_us,
            num_threads=args.num_threads, backbone_batch_size=args.max_batch_size,
            execution_env=args.execution_env, device=args.segment_device,
            gpus=args.gpus if args.segment_device == "cuda" else None)
        print(f"{model_dir}: whole segmentation (calls {triton_model_name(bank_backbone, args.segment_backbone)}), "
              f"bank {args.bank}")
    if args.server_tensorrt:
        problems = [p for path in written.values() for p in plan_version_problems(path, args.server_tensorrt)]
        for problem in problems:
            print(f"moduseg triton-repo: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


def cmd_serve(args) -> int:
    from .serving.server import LocalServer
    from .serving.server_env import SERVER_LAUNCHER, default_env_dir, ensure_server_env

    import signal

    env = Path(args.env) if args.env else default_env_dir()
    if not (env / SERVER_LAUNCHER).is_file():
        print(f"making the Triton server environment {env} (once; a minute or two, about 600 MB)", file=sys.stderr,
              flush=True)
    ensure_server_env(env)
    # SIGTERM (kill, timeout, a service manager) must stop the server too: it runs in its own session
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    server = LocalServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                         metrics_port=args.metrics_port, models=args.models, env_dir=env, log_path=args.log,
                         extra_args=args.server_arg or (), max_request_bytes=args.max_request_bytes)
    server.start(timeout=args.start_timeout)
    try:  # a SIGTERM may arrive as soon as the addresses are out, even before print returns
        print(f"tritonserver (pid {server.process.pid}) serving {', '.join(server.models)} from {server.repo}\n"
              f"  HTTP    {server.http_url}\n  gRPC    {server.grpc_url}\n  metrics {server.metrics_url}\n"
              f"  log     {server.log_path}\n"
              f"use: create_backbone(NAME, runtime='triton', url='{server.grpc_url}', protocol='grpc'), or "
              f"RemoteEngine(url) for moduseg_segment; Ctrl-C stops", flush=True)
        server.process.wait()
        print(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def cmd_triton_env(args) -> int:
    from .serving.server_env import default_env_dir, ensure_server_env

    env = Path(args.env) if args.env else default_env_dir()
    print(f"Triton server environment {env}: checking (making it takes a minute or two the first time)", flush=True)
    launcher = ensure_server_env(env)
    print(f"ready: {launcher} (moduseg serve --env {env}, or set MODUSEG_TRITON_ENV)")
    return 0


def cmd_report(args) -> int:
    from .report import run_report

    report = run_report(args.data_root, args.out, datasets=args.datasets, quick=args.quick,
                        sheet_images=args.sheet_images)
    print((Path(args.out) / "report.md").read_text())
    print(f"-> {Path(args.out) / 'report.json'}; sheets: "
          + ", ".join(r["sheet"]["file"] for r in report["datasets"].values()))
    return 0


def cmd_info(args) -> int:
    """What a bug report needs (engine.info): versions, the compiled extension's CUDA kernels, runtimes, GPUs."""
    from .info import collect, format_text

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def _add_bank_parsers(commands) -> None:
    """build-bank and eval."""
    build = commands.add_parser("build-bank", help="build a feature bank from a VOC-layout dataset")
    build.add_argument("--data", default=None, help="dataset root (VOC layout)")
    build.add_argument("--split", default="train",
                       help="the split to featurise, listed in --data's ImageSets/Segmentation/SPLIT.txt (default "
                            "train)")
    build.add_argument("--masks", choices=("gt", "pseudo"), default="gt",
                       help="class masks: ground truth (oracle bank) or pseudo-masks from image-level labels")
    build.add_argument("--backbone", default=DEFAULT_BACKBONE,
                       help=f"the feature extractor, one of {', '.join(backbone_names())} (default {DEFAULT_BACKBONE})")
    build.add_argument("--out", required=True, help="bank directory to write")
    build.add_argument("--overwrite", action="store_true", help="replace an existing bank directory")
    build.add_argument("--parts", default=None, metavar="DIR",
                       help="keep the bank's parts (its entries before outlier rejection, about the bank's size "
                            "again) in DIR, to merge this build with others or append to it later (--add-parts); "
                            "implies --keep-parts")
    build.add_argument("--keep-parts", action=argparse.BooleanOptionalAction, default=None,
                       help="keep the parts (in --parts DIR, by default OUT.parts next to the bank); default off: "
                            "only a build to be merged or appended to needs them")
    build.add_argument("--add-parts", nargs="+", default=None, metavar="DIR",
                       help="parts directories of earlier builds (shards, or the bank appended to): the bank is "
                            "built over their entries and the new ones, outlier rejection over the union")
    _add_ray_flags(build, "featurise on a Ray cluster: actors hold the backbone and proposer")
    _add_config_flags(build)
    build.set_defaults(run=cmd_build_bank)

    verify = commands.add_parser("verify-bank", help="check every byte of a bank directory against its manifest "
                                 "(loading checks only sizes and each file's first and last MiB)")
    verify.add_argument("bank", help="bank directory")
    verify.set_defaults(run=cmd_verify_bank)

    evaluate = commands.add_parser("eval", help="segment a split and report mIoU against its ground truth")
    evaluate.add_argument("--bank", required=True, help="the feature bank (a build-bank output folder)")
    evaluate.add_argument("--data", required=True,
                          help="dataset root (VOC layout) with the split's images and ground truth; its classes must "
                               "be the bank's")
    evaluate.add_argument("--split", default="val", help="the split to segment and score (default val)")
    evaluate.add_argument("--proposals", choices=("gt", "auto"), default="auto",
                          help="ground-truth connected components (oracle proposals) or the embedded proposer")
    evaluate.add_argument("--out", required=True, help="directory for metrics.json / metrics.md")
    evaluate.add_argument("--save-predictions", action="store_true", help="also write the predicted PNGs")
    _add_config_flags(evaluate, bank="fixed")
    evaluate.set_defaults(run=cmd_eval)


def _add_segment_parser(commands) -> None:
    from .outputs import DEFAULT_RENDERING
    from .palettes import PALETTES

    segment = commands.add_parser("segment", help="segment images into palette PNG label maps, JSON records per "
                                  "image (class, score, area, box, RLE mask per segment) and overlays")
    segment.add_argument("--bank", default=None, help="the feature bank (segment in this process)")
    segment.add_argument("--url", default=None,
                         help="segment on a Triton server instead: its HTTP or gRPC address (http(s)://, grpc(s)://"
                              " or HOST:PORT with --protocol), serving the moduseg_segment model")
    segment.add_argument("--protocol", choices=("http", "grpc"), default=None,
                         help="with --url: the server's protocol (default: the --url's scheme, http(s):// or "
                              "grpc(s)://, else http; Triton serves HTTP on port 8000 and gRPC on 8001 by default)")
    segment.add_argument("--model", default="moduseg_segment", help="with --url: the segmentation model's name")
    segment.add_argument("--header", action="append", default=None, metavar="KEY=VALUE",
                         help="with --url: an HTTP header / gRPC metadata sent with every request (repeatable)")
    segment.add_argument("--concurrency", type=int, default=4, help="with --url: requests in flight (default 4)")
    segment.add_argument("images", nargs="*", help="image files, folders (searched recursively; symlinked folders "
                         "not entered) or glob patterns")
    segment.add_argument("--manifest", default=None, metavar="FILE",
                         help="a file listing image paths, one a line (relative to its folder); a missing one is "
                              "recorded as a failure")
    segment.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                         help="skip images whose JSON record (written last) exists in --out and was made from the "
                              "same bank (or server), result-changing config and input file (size, mtime) (default "
                              "on); stale and failed images are redone")
    segment.add_argument("--out", required=True,
                         help="output folder, outside every input folder (else a usage error); an input's outputs are "
                              "named by its path below the argument that found it (a folder, a glob's leading folder, "
                              "the manifest's folder; a file argument: its name), suffix kept: a/x.jpg -> "
                              "OUT/a/x.jpg.png (label map), .json (record), .overlay.png; and OUT/classes.json "
                              "(each class id's name and colour)")
    segment.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True,
                         help="also write the image blended with its label map and a legend (default on)")
    segment.add_argument("--palette", choices=PALETTES, default=DEFAULT_RENDERING["palette"],
                         help="colours of the label maps and overlays: auto (default) takes the bank's data set's "
                              "own by its class names (VOC's, CamVid's; distinct generated colours for other class "
                              "lists); voc, camvid or distinct apply that palette by class id")
    segment.add_argument("--opacity", type=_opacity, default=DEFAULT_RENDERING["opacity"], metavar="0..1",
                         help="how strongly an overlay paints the classes over the image: 0 the image alone, 1 the "
                              f"colours alone (default {DEFAULT_RENDERING['opacity']})")
    segment.add_argument("--output-mode", choices=("uncompressed_rle", "coco_rle"), default="uncompressed_rle",
                         help="each segment's mask in the JSON records: COCO's uncompressed RLE (runs as a list; "
                              "default) or its compressed RLE (a string, as pycocotools.mask.decode takes; needs "
                              "pycocotools)")
    segment.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                         help="where the backbone and the bank search run (default cpu)")
    _add_ray_flags(segment, "segment on a Ray cluster: actors each hold an Engine and write the outputs")
    _add_config_flags(segment, bank="fixed")
    segment.set_defaults(run=cmd_segment)


def _add_triton_parsers(commands) -> None:
    """triton-repo, serve and triton-env."""
    from .serving.guard import DEFAULT_MAX_REQUEST_BYTES

    repo = commands.add_parser("triton-repo", help="write a Triton model repository serving a backbone")
    repo.add_argument("--out", required=True, help="repository directory (created or refreshed)")
    repo.add_argument("--backbone", default=None, help=f"default: the --bank's backbone, else {DEFAULT_BACKBONE}")
    repo.add_argument("--bank", default=None,
                      help="also write the whole-segmentation model moduseg_segment with this bank (python backend; "
                           "calls the --segment-backbone variant of the bank's backbone through BLS)")
    repo.add_argument("--segment-backbone", choices=("python", "onnx", "tensorrt"), default="python",
                      help="with --bank: the backbone variant the segmentation model calls (default python; onnx or "
                           "tensorrt on NGC's GPU server)")
    repo.add_argument("--segment-instances", type=int, default=1,
                      help="with --bank: segmentation model instances (per GPU with --segment-device cuda; each "
                           "holds the bank in memory)")
    repo.add_argument("--segment-device", choices=("cpu", "cuda"), default="cpu",
                      help="with --bank: where the segmentation model runs the engine: cpu (KIND_CPU instances, the "
                           "default) or cuda (KIND_GPU instances on --gpus, the device pipeline on each instance's "
                           "GPU, tensors kept there: FORCE_CPU_ONLY_INPUT_TENSORS \"no\")")
    repo.add_argument("--variants", nargs="+", default=["python", "onnx", "tensorrt"],
                      choices=("python", "onnx", "tensorrt"),
                      help="python: onnxruntime on CPU in the python backend; onnx / tensorrt: GPU platforms")
    repo.add_argument("--configs-only", action="store_true", help="config.pbtxt and model.py only, no model files")
    repo.add_argument("--onnx", default=None, help="ONNX file to serve (default: the cached export)")
    repo.add_argument("--plan", action="append", default=None, metavar="PLAN",
                      help="a TensorRT plan built elsewhere, placed as model.smXY.plan with its record PLAN.json "
                           "(repeatable; default: one built here for this GPU if TensorRT and a GPU exist, else none)")
    repo.add_argument("--plan-cc", action="append", default=None, metavar="X.Y",
                      help="compute capability each --plan was built for, in order (e.g. 8.6; default: from PLAN.json)")
    repo.add_argument("--compute-capabilities", nargs="+", default=None, metavar="X.Y",
                      help="GPUs the tensorrt config maps to plan files (cc_model_filenames; default 7.5 8.0 8.6 8.9 "
                           "9.0, plus those of the plans present)")
    repo.add_argument("--max-batch-size", type=int, default=8, help="largest batch per execution (default 8)")
    repo.add_argument("--instances", type=int, default=1, help="model instances (per GPU for GPU variants)")
    repo.add_argument("--num-threads", type=int, default=0,
                      help="intra-op threads per instance (python: onnxruntime; onnx: intra_op_thread_count; 0: the "
                           "runtime's choice)")
    repo.add_argument("--queue-delay-us", type=int, default=2000,
                      help="how long the dynamic batcher may hold a request to fill a batch (default 2000)")
    repo.add_argument("--gpus", type=_gpu_ids, default=None, metavar="0,1",
                      help="GPU ids of the GPU variants' instances, and of the segmentation model's with "
                           "--segment-device cuda (default: every GPU the server sees)")
    repo.add_argument("--max-side", type=int, default=None,
                      help="largest padded image side: the TensorRT profile's (default 1024), and stated as a limit "
                           "for the python and onnx variants too when given")
    repo.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                      help="model_warmup at load: 512x512 images, batch 1 and --max-batch-size (default on)")
    repo.add_argument("--server-tensorrt", default=None, metavar="VERSION",
                      help="the TensorRT version of the server that will load the plans (NGC release notes of its "
                           "yy.mm): exit 1 naming every plan built by another version, or of unknown version")
    repo.add_argument("--execution-env", default=None, metavar="ARCHIVE",
                      help="python variant: a packed environment with onnxruntime (scripts/pack_triton_env.sh) for a "
                           "server without it (NGC's -py3 image): a local archive is placed in the model directory; "
                           "'$$TRITON_MODEL_DIRECTORY/FILE' (single quotes) or an absolute server path is written as is")
    repo.set_defaults(run=cmd_triton_repo)

    serve = commands.add_parser("serve", help="run a local tritonserver (python backend) over a model repository")
    serve.add_argument("--repo", required=True, help="the model repository (written by moduseg triton-repo)")
    serve.add_argument("--http-port", type=int, default=8000, help="the server's HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="the server's gRPC port (default 8001)")
    serve.add_argument("--metrics-port", type=int, default=8002,
                       help="the server's Prometheus metrics port (default 8002)")
    serve.add_argument("--models", nargs="+", default=None, help="models to load (default: the python-backend ones)")
    serve.add_argument("--env", default=None,
                       help="the server's venv (default: $MODUSEG_TRITON_ENV, else the checkout's .triton-venv when "
                            "the engine runs from one, else ~/.cache/moduseg/triton-venv; made when missing, as "
                            "`moduseg triton-env` does)")
    serve.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    serve.add_argument("--start-timeout", type=float, default=120.0,
                       help="seconds to wait for the server and its models to be ready (default 120)")
    serve.add_argument("--server-arg", action="append", default=None, metavar="ARG",
                       help="one more tritonserver argument, e.g. --server-arg=--log-verbose=1 or "
                            "--server-arg=--backend-config=python,shm-default-byte-size=16777216 (repeatable; "
                            "paths absolute: the server runs in a folder of its own)")
    serve.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                       help="the largest HTTP request body the server's front accepts (default 1 GiB); it also "
                            "refuses JSON tensors that declare more values than they carry, which abort "
                            "tritonserver 2.51")
    serve.set_defaults(run=cmd_serve)

    env = commands.add_parser("triton-env", help="make (or check) the local Triton server's venv")
    env.add_argument("--env", default=None,
                     help="where (default: $MODUSEG_TRITON_ENV, else the checkout's .triton-venv when the engine "
                          "runs from one, else ~/.cache/moduseg/triton-venv); PYTHON=... picks its interpreter")
    env.set_defaults(run=cmd_triton_env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moduseg", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="what to do (moduseg COMMAND --help for its flags)")

    _add_bank_parsers(commands)
    _add_segment_parser(commands)
    _add_triton_parsers(commands)

    report = commands.add_parser("report", help="the paper's table rows on VOC-layout data sets (JSON, Markdown, PNG)")
    report.add_argument("--data-root", default="../shared/data", help="folder holding the data sets")
    report.add_argument("--datasets", nargs="+", default=["voc2012-mini", "camvid"],
                        help="data sets to report on: folders under --data-root in the VOC layout, each with train "
                             "and val splits (default voc2012-mini camvid)")
    report.add_argument("--out", required=True,
                        help="folder for report.json, report.md and a sheet PNG per data set (made once the data "
                             "sets are found)")
    report.add_argument("--quick", action="store_true", help="only the system rows (defaults and paper settings)")
    report.add_argument("--sheet-images", type=int, default=4, help="val images on each PNG sheet")
    report.set_defaults(run=cmd_report)

    info = commands.add_parser("info", help="what a bug report needs: versions, the compiled extension (which CUDA "
                               "kernels, for which architectures), the runtimes found and the GPUs")
    info.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv=None) -> int:
    """Exit codes: 0 done, 1 the engine refused or failed (bad input, bank or model; or images skipped), 2 a usage
    error (argparse)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ModuSegError as error:
        print(f"moduseg {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
