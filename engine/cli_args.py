"""The arguments of the `moduseg` command line: Config's fields as flags (each with its field's help) and --config
files, the argument types and checks the commands share (--out, --opacity, --gpus, --header), and usage errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from .config import BANK_FIELDS, EROSIONS, POOLINGS, VOTES, Config
from .errors import InputError


def add_config_flags(parser: argparse.ArgumentParser, bank: str = "build") -> None:
    """One flag per Config field (--top-k, --vote, ...) with its documented meaning, and --config FILE (JSON or YAML,
    any Config fields); unset flags keep the file's, then the bank's or the default value. A value Config refuses,
    or a --config file that cannot be read, is a usage error (exit 2).

    bank: "build" for build-bank; "fixed" for commands that use a built bank (eval, segment): its bank-building
    knobs (BANK_FIELDS) are listed apart, and a value other than the bank's is refused (see command_config)."""
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
    for f in dataclasses.fields(Config):
        kind, flag = type(f.default), f"--{f.name.replace('_', '-')}"
        text = f"{f.metadata.get('help', '')} (default {f.default})".strip().replace("%", "%%")
        where = fixed if fixed is not None and f.name in BANK_FIELDS else group
        if kind is bool:  # --region-entries / --no-region-entries
            where.add_argument(flag, dest=f"config_{f.name}", action=argparse.BooleanOptionalAction, default=None,
                               help=text)
            continue
        choices = CONFIG_CHOICES.get(f.name)  # listed by --help; a wrong value is refused by Config's own message
        where.add_argument(flag, dest=f"config_{f.name}", type=_field_type(f.name, kind), default=None,
                           choices=choices, metavar=None if choices else kind.__name__.upper(), help=text)
    parser.set_defaults(config_parser=parser)  # for the usage errors command_config finds once the bank is loaded


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


def command_config(args, base: Config | None = None) -> Config:
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


def shown(path) -> str:
    """A path as printable text: bytes of a name that is not UTF-8 as \\x escapes (stdout would refuse them)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def usage_error(command: str, message: str) -> NoReturn:
    """A usage error found after parsing (the arguments contradict each other or the files they name): argparse's
    form and exit code 2."""
    print(f"moduseg {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_segment_flags(args) -> None:
    """Flags of `segment` that contradict each other: a usage error (exit 2) naming them."""
    if (args.bank is None) == (args.url is None):
        usage_error("segment", "give --bank (segment here) or --url (a Triton server's segmentation model), "
                               f"{'not both' if args.bank is not None else 'one of them'}")
    if args.url is not None and args.ray is not None:
        usage_error("segment", "--url and --ray do not combine: scale a served model with server replicas instead")
    if args.url is not None:  # a grpc:// address read as HTTP got "HTTPParseError" and no more
        scheme = args.url.partition("://")[0].lower() if "://" in args.url else ""
        implied = {"http": "http", "https": "http", "grpc": "grpc", "grpcs": "grpc"}.get(scheme)
        if implied and args.protocol not in (None, implied):
            usage_error("segment", f"--url {args.url} is a {implied} address: --protocol {args.protocol} "
                                   "contradicts it")
        args.protocol = args.protocol or implied or "http"
    if args.url is not None:  # the served model holds its bank's config: a flag here would be ignored
        given = [f.name for f in dataclasses.fields(Config) if getattr(args, f"config_{f.name}", None) is not None]
        given += ["--config"] if getattr(args, "config_values", None) else []
        if given:
            usage_error("segment", f"{', '.join(given)}: the served model segments with its own bank's config; "
                                   "--url takes no config flags (set them when its repository is written)")
    try:
        headers(args.header)
    except InputError as error:
        usage_error("segment", str(error))


def headers(pairs) -> dict[str, str]:
    """--header KEY=VALUE (repeatable) -> {KEY: VALUE}."""
    headers = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--header {pair!r}: expected KEY=VALUE")
        headers[key.strip()] = value
    return headers


def writable_out(path) -> Path:
    """--out checked before any work, without making it: an InputError if it is a file, or if no file can be made in
    it or, while it does not exist, in its nearest existing folder (a read-only file system, no permission). The
    folder itself is made by output_dir once the inputs, the bank and the models are checked, so that a run that
    fails before its work leaves no folder behind."""
    import tempfile

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {shown(out)} is a file; name a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--out {shown(out)}: {shown(existing)} is a file, so no folder can be made there")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # whether files can be made (permission bits do not say as root)
    except OSError as error:
        raise InputError(f"--out {shown(out)}: cannot write there: {error}") from error
    return out


def output_dir(path) -> Path:
    """--out, created if missing; an InputError if it is a file or cannot be written (as writable_out)."""
    import tempfile

    out = writable_out(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise InputError(f"--out {shown(out)}: cannot write there: {error}") from error
    return out


def opacity(text: str) -> float:
    """--opacity: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 (the image alone) to 1 (the colours alone), got "
                                         f"{text!r}")
    return value


def gpu_ids(text: str) -> list[int]:
    """--gpus 0,1 -> [0, 1]."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus takes comma-separated GPU ids, e.g. 0,1; got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"--gpus takes GPU ids >= 0, e.g. 0,1; got {text!r}")
    return ids
