"""engine.config: one dataclass of every knob, validated on construction, the paper's settings, dict round trip."""

import dataclasses

import pytest

from engine.config import EROSIONS, PAPER_SETTINGS, POOLINGS, VOTES, Config
from engine.errors import InputError


def test_defaults_and_paper_settings():
    config = Config()
    assert (config.erosion, config.top_k, config.vote, config.pooling) == ("adaptive", 15, "softmax", "soft")
    assert config.vote_temperature == 0.07 and config.center_bank and not Config.paper().center_bank
    assert config.erosion_size == 41  # 20 x 3x3 erosions = one 41x41 square
    paper = Config.paper()
    for name, value in PAPER_SETTINGS.items():
        assert getattr(paper, name) == value
    assert (paper.top_k, paper.erosion, paper.objectness_threshold, paper.nms_iou_threshold) == (25, "fixed", 0.6, 0.4)
    assert Config.paper(top_k=1).top_k == 1 and Config.paper(top_k=1).erosion == "fixed"
    assert Config(erosion_kernel=5, erosion_iterations=3).erosion_size == 13
    assert Config(erosion_iterations=0).erosion_size == 1
    assert VOTES == ("count", "balanced", "weighted", "softmax") and POOLINGS == ("soft", "hard")
    assert EROSIONS == ("fixed", "adaptive")
    assert (config.index, config.nprobe, config.refine) == ("Flat", 16, 8)
    assert Config(refine=0).refine == 0 and Config(refine=1).refine == 1  # 0 = off; 1 = FAISS's k, rescored


@pytest.mark.parametrize("changes,message", [
    ({"erosion_kernel": 4}, "positive odd integer"),
    ({"erosion_kernel": 0}, "positive odd integer"),
    ({"erosion_iterations": -1}, "erosion_iterations must be >= 0"),
    ({"min_area": -1}, "min_area must be >= 0"),
    ({"num_threads": -2}, "num_threads must be >= 0"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"nprobe": 0}, "nprobe must be >= 1"),
    ({"refine": -1}, "refine must be >= 0"),
    ({"index_train_size": 0}, "index_train_size must be >= 1"),
    ({"outlier_ratio": 1.5}, r"outlier_ratio must be in \[0, 1\]"),
    ({"background_outlier_ratio": -0.1}, r"background_outlier_ratio must be in \[0, 1\]"),
    ({"objectness_threshold": 2.0}, r"objectness_threshold must be in \[0, 1\]"),
    ({"nms_iou_threshold": -0.01}, r"nms_iou_threshold must be in \[0, 1\]"),
    ({"vote": "majority"}, "Config.vote must be one of"),
    ({"pooling": "mean"}, "Config.pooling must be one of"),
    ({"erosion": "none"}, "Config.erosion must be one of"),
])
def test_invalid_values_are_refused_with_the_field_named(changes, message):
    with pytest.raises(InputError, match=message):
        Config(**changes)
    with pytest.raises(InputError, match=message):
        Config().replace(**changes)


@pytest.mark.parametrize("function", ["engine.ops.vote", "engine.reference.vote", "engine.retrieval.retrieve"])
def test_every_vote_defaults_to_the_configs_temperature(function):
    """A caller of the low-level vote who leaves the temperature out gets the engine's own, not a stale one."""
    import importlib
    import inspect

    module, name = function.rsplit(".", 1)
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    assert parameters["temperature"].default == Config().vote_temperature


def test_dict_round_trip_and_unknown_fields():
    config = Config(top_k=7, vote="balanced", index="IVF16,Flat")
    values = config.to_dict()
    assert set(values) == {f.name for f in dataclasses.fields(Config)}
    assert Config.from_dict(values) == config
    with pytest.raises(InputError, match=r"unknown Config fields \['colour'\]"):
        Config.from_dict({**values, "colour": 1})
    changed = config.replace(top_k=3)
    assert changed.top_k == 3 and config.top_k == 7  # replace returns a new Config


@pytest.mark.parametrize("field, value", [("top_k", "5"), ("top_k", 5.0), ("top_k", True), ("region_entries", 1),
                                          ("region_purity", "0.7"), ("vote", 3), ("objectness_threshold", None),
                                          ("refine", 2.0), ("refine", None)])
def test_wrong_types_are_refused_with_the_field_named(field, value):
    with pytest.raises(InputError, match=f"Config.{field} must be a"):
        Config(**{field: value})
    assert Config(region_purity=1).region_purity == 1  # an int where a float is expected is fine


@pytest.mark.parametrize("field, value, message", [
    ("smfa_eps", float("inf"), r"smfa_eps must be a finite number in \(0, 1\]"),
    ("smfa_eps", float("nan"), r"smfa_eps must be a finite number in \(0, 1\]"),
    ("smfa_eps", -1, r"smfa_eps must be a finite number in \(0, 1\]"),
    ("smfa_eps", 0.0, r"smfa_eps must be a finite number in \(0, 1\]"),
    ("smfa_eps", 2.0, r"smfa_eps must be a finite number in \(0, 1\]"),
    ("vote_temperature", 0.0, "vote_temperature must be a finite number > 0"),
    ("vote_temperature", -0.03, "vote_temperature must be a finite number > 0"),
    ("vote_temperature", float("inf"), "vote_temperature must be a finite number > 0"),
    ("vote_temperature", float("nan"), "vote_temperature must be a finite number > 0"),
    ("min_vector_norm", float("inf"), "min_vector_norm must be a finite number >= 0"),
    ("min_vector_norm", float("nan"), "min_vector_norm must be a finite number >= 0"),
    ("min_vector_norm", -1e-6, "min_vector_norm must be a finite number >= 0"),
    ("outlier_ratio", float("nan"), r"outlier_ratio must be in \[0, 1\]"),
    ("region_purity", float("inf"), r"region_purity must be in \[0, 1\]"),
    ("objectness_threshold", float("-inf"), r"objectness_threshold must be in \[0, 1\]"),
    ("index", "", "Config.index must be a FAISS index factory string"),
])
def test_non_finite_and_out_of_range_values_are_refused(field, value, message):
    # smfa_eps=inf once passed and made every query vector zero: every image all background
    with pytest.raises(InputError, match=message):
        Config(**{field: value})
    with pytest.raises(InputError, match=message):
        Config.from_dict({**Config().to_dict(), field: value})
    assert Config(smfa_eps=1.0).smfa_eps == 1.0 and Config(min_vector_norm=0.0).min_vector_norm == 0.0


def test_bank_fields_are_config_fields_that_only_bank_building_reads():
    from engine.config import BANK_FIELDS

    names = {f.name for f in dataclasses.fields(Config)}
    assert set(BANK_FIELDS) <= names
    # inference reads these (query SMFA, the candidate filter, the search): never bank-only
    assert not {"pooling", "smfa_eps", "min_area", "top_k", "vote", "index", "nprobe"} & set(BANK_FIELDS)


def test_a_wrong_nested_value_is_named_in_a_short_message():
    # a YAML alias bomb's shared subtrees once printed whole in this message: 29 s and 4 GB for a 413-byte file
    import time

    value = ["lol"] * 9
    for _ in range(9):
        value = [value] * 9  # 9**10 leaves if printed whole
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"Config.top_k must be a int, got list \[\[\.\.\.\], ") as error:
        Config(top_k=value)
    assert len(str(error.value)) < 200 and time.perf_counter() - start < 1


def test_every_field_says_what_it_means_next_to_it_in_the_docstring_and_in_the_flags_help():
    """Was: the flags' --help was scraped from Config's docstring by indentation, so a field documented out of
    place, or a new field, silently had no help."""
    import argparse

    from engine.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    flags = {a.dest: a.help for command in ("build-bank", "eval") for a in commands[command]._actions}
    doc = " ".join(Config.__doc__.split())
    for f in dataclasses.fields(Config):
        meaning = f.metadata.get("help", "")
        assert len(meaning) > 20, f"Config.{f.name} has no help"
        assert f"{f.name}: {' '.join(meaning.split())}" in doc
        assert flags[f"config_{f.name}"] == f"{meaning} (default {f.default})".replace("%", "%%")
    assert "Bank building" in Config.__doc__ and "Inference:" in Config.__doc__
