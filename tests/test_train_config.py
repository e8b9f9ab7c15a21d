"""The typed training config: conversion by field type, checks naming the key, the documented reference."""

from pathlib import Path

import pytest
import yaml

from efa_deploy.training.config import DOCS_END, DOCS_START, DataConfig, TrainConfig, TrainingConfig, reference_markdown

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_complete_and_round_trip():
    config = TrainConfig.from_dict({})
    assert config.training == TrainingConfig() and config.data == DataConfig() and config.model == {}
    again = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert again == config


def test_numbers_written_as_strings_load_by_field_type():
    # YAML 1.1 reads 1e-3 (no dot) as a string
    raw = yaml.safe_load("training: {lr: 1e-3, epochs: 3e1, time_budget: 900}\n"
                         "data: {n_train: '0.5', n_val: '12', split_by: '2024'}\nmodel: {r_max: 2e1, features: '16'}")
    assert raw["training"]["lr"] == "1e-3"
    config = TrainConfig.from_dict(raw)
    assert config.training.lr == 1e-3 and isinstance(config.training.lr, float)
    assert config.training.epochs == 30 and isinstance(config.training.epochs, int)
    assert config.training.time_budget == 900.0 and isinstance(config.training.time_budget, float)
    assert config.data.n_train == 0.5 and config.data.n_val == 12 and isinstance(config.data.n_val, int)
    assert config.data.split_by == "2024"  # a string field keeps its string (coerce_numbers made it 2024.0)
    assert config.model == {"r_max": 20.0, "features": 16}
    assert isinstance(config.model["features"], int)


@pytest.mark.parametrize("raw, message", [
    ({"training": {"learning_rate": 1}}, r"unknown setting 'training.learning_rate'; did you mean 'training.lr'\?"),
    ({"trainig": {}}, r"unknown setting 'trainig'; did you mean 'training'\?"),
    ({"model": {"featurs": 8}}, r"unknown setting 'model.featurs'; did you mean 'model.features'\?"),
    ({"training": {"lr": "fast"}}, r"setting 'training.lr' must be a finite number, got 'fast'"),
    ({"training": {"lr": "nan"}}, r"setting 'training.lr' must be a finite number"),
    ({"training": {"epochs": 2.5}}, r"setting 'training.epochs' must be a whole number, got 2.5"),
    ({"training": {"progress": "no way"}}, r"setting 'training.progress' must be true or false"),
    ({"training": {"batch_size": 0}}, r"setting 'training.batch_size' must be >= 1, got 0"),
    ({"training": {"dtype": "float16"}}, r"setting 'training.dtype' must be one of float64, float32"),
    ({"training": {"time_budget": -5}}, r"setting 'training.time_budget' must be > 0"),
    ({"training": {"ema_decay": 1.0}}, r"setting 'training.ema_decay' must be in \[0, 1\)"),
    ({"training": {"schedule": "time"}}, r"'time' needs training.time_budget"),
    ({"training": {"energy_weight": 0, "forces_weight": 0}}, r"both 0"),
    ({"training": 5}, r"training must be a mapping"),
    ({"data": {"n_train": 1.5}}, r"setting 'data.n_train' must be a count >= 0 or a fraction"),
    ({"data": {"split_by": 3}}, r"setting 'data.split_by' must be a string or null"),
    ({"model": {"atomic_numbers": [1, "x"]}}, r"setting 'model.atomic_numbers\[1\]' must be a whole number"),
    ({"output": 3}, r"setting 'output' must be a string"),
])
def test_bad_settings_name_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(raw)


def test_docs_carry_the_current_config_reference():
    """docs/training.md embeds reference_markdown(); regenerate it with the command below when fields change."""
    text = (REPO / "docs" / "training.md").read_text()
    assert DOCS_START in text and DOCS_END in text
    embedded = text.split(DOCS_START)[1].split(DOCS_END)[0]
    assert embedded.strip() == reference_markdown().strip(), (
        "docs/training.md is out of date: run `python -m efa_deploy.training.config --write-docs docs/training.md`")
