"""The typed configuration of efa-train: data, model, training and output settings.

`TrainConfig.from_dict(mapping)` is the one place a configuration is checked: unknown keys,
values of the wrong type and values out of range are errors naming the key and the fix.
Values are converted by the field's type, so `lr: 1e-3` (a string to YAML 1.1) is a float
and `epochs: "30"` an integer, while a string in a string field stays a string.

    python -m efa_deploy.training.config                                # prints the config reference
    python -m efa_deploy.training.config --write-docs docs/training.md  # refreshes it in the docs
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..model import ModelConfig

DEFAULT_OUTPUT = "runs/efa"
DATA_FILES = ("path", "validation", "test")  # the data settings that name files


def setting(default, help: str, check=None, choices: tuple | None = None):
    """A config field: its default, one line of help, and optionally (predicate, rule) or choices."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices})


POSITIVE = (lambda v: v > 0, "> 0")
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
SIZE = (lambda v: v >= 0 and (isinstance(v, int) or 0 < v < 1), "a count >= 0 or a fraction in (0, 1)")


@dataclass
class DataConfig:
    path: str | None = setting(None, "training data file (npz, extxyz, ASE db, ...); split into training, "
                                     "validation and test sets unless `validation` names a file")
    validation: str | None = setting(None, "validation data file, used as given; then all of `path` is training "
                                           "data and the split settings below must stay unset")
    test: str | None = setting(None, "test data file, used as given; without `validation`, `path` is split into "
                                     "validation (`n_val`) and training (the rest)")
    n_train: int | float | None = setting(0.8, "training set size: a count, a fraction of the data, or null for all "
                                               "that remain; with `split_by` it counts groups", SIZE)
    n_val: int | float | None = setting(0.1, "validation set size, as `n_train`", SIZE)
    n_test: int | float | None = setting(None, "test set size, as `n_train`", SIZE)
    split_seed: int = setting(0, "seed of the random split")
    split_by: str | None = setting(None, "group key: a per-structure array in the npz file or an extxyz/ASE db "
                                         "info key (e.g. trajectory); the structures of a group never straddle "
                                         "the split")


@dataclass
class TrainingConfig:
    dtype: str = setting("float64", "floating-point type of training", choices=("float64", "float32"))
    seed: int = setting(0, "seed of the weights and of the batch order")
    batch_size: int = setting(16, "structures per training step", AT_LEAST_1)
    epochs: int = setting(100, "passes over the training set (the most; `time_budget` may stop earlier)",
                          AT_LEAST_1)
    time_budget: float | None = setting(None, "seconds of training, summed over resumed runs; null: no limit",
                                        POSITIVE)
    lr: float = setting(1.0e-3, "initial learning rate (Adam)", POSITIVE)
    lr_final: float = setting(1.0e-5, "learning rate reached at the end (exponential decay)", POSITIVE)
    schedule: str = setting("steps", "decay the learning rate over epochs x steps per epoch (exactly "
                                     "resumable) or over the `time_budget`", choices=("steps", "time"))
    energy_weight: float = setting(0.01, "weight of the squared energy error in the loss", NON_NEGATIVE)
    forces_weight: float = setting(0.99, "weight of the squared force error in the loss", NON_NEGATIVE)
    stress_weight: float = setting(0.0, "weight of the squared stress error (eV/A^3 components) in the loss; "
                                        "structures without a stress add nothing", NON_NEGATIVE)
    ema_decay: float = setting(0.999, "decay of the exponential moving average of the weights",
                               (lambda v: 0 <= v < 1, "in [0, 1)"))
    clip_grad_norm: float | None = setting(None, "largest gradient norm (null: no clipping)", POSITIVE)
    checkpoint_every: int = setting(500, "steps between checkpoints (last.ckpt)", AT_LEAST_1)
    val_batch_size: int = setting(8, "structures per validation batch", AT_LEAST_1)
    threads: int = setting(1, "torch threads (per process)", AT_LEAST_1)
    device: str = setting("auto", "where training runs: auto takes a GPU when torch sees one (under torchrun, "
                                  "the GPU of the local rank)", choices=("auto", "cpu", "cuda"))
    workers: int = setting(0, "DataLoader worker processes that read structures and build neighbour lists "
                              "(per rank; 0: in the training process)", NON_NEGATIVE)
    progress: bool = setting(True, "show a progress bar")
    plot_every: float = setting(30.0, "seconds between learning-curve redraws (always drawn at the end)",
                                NON_NEGATIVE)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    # ModelConfig fields; atomic_numbers default to the elements in the training data
    model: dict = field(default_factory=dict)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: str = DEFAULT_OUTPUT

    @classmethod
    def from_dict(cls, raw: Any) -> "TrainConfig":
        raw = _mapping(raw, "the config")
        _refuse_unknown(raw, {"data", "model", "training", "output"}, "")
        config = cls(
            data=_section(DataConfig, raw.get("data", {}), "data"),
            model=_model_section(raw.get("model", {})),
            training=_section(TrainingConfig, raw.get("training", {}), "training"),
            output=convert(raw.get("output", DEFAULT_OUTPUT), str, "output"),
        )
        _check_together(config)
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_yaml(path: str | os.PathLike) -> dict:
    """The settings of a YAML config file, its relative paths made relative to the file."""
    path = Path(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as err:
        raise ValueError(f"cannot read config {path}: {err.strerror}; check the path") from None
    except yaml.YAMLError as err:
        first = str(err).replace("\n", " ")
        raise ValueError(f"{path} is not valid YAML ({first}); fix its syntax") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings (data:, model:, training:, output:)")
    base = path.resolve().parent
    if isinstance(data.get("data"), dict):
        for key in DATA_FILES:
            if isinstance(data["data"].get(key), str):
                data["data"][key] = str(base / data["data"][key])
    if isinstance(data.get("output"), str):
        data["output"] = str(base / data["output"])
    return data


# settings a resumed run may change; everything else must match the checkpoint
RESUMABLE = ("training.epochs", "training.time_budget", "training.checkpoint_every", "training.threads",
             "training.progress", "training.plot_every", "training.device", "training.workers",
             "data.path")  # the sha256 of the data is checked instead
SPLIT_SETTINGS = ("n_train", "n_val", "n_test", "split_seed", "split_by")


def _check_together(config: TrainConfig) -> None:
    tc, dc = config.training, config.data
    if tc.schedule == "time" and tc.time_budget is None:
        raise ValueError("training.schedule 'time' needs training.time_budget (seconds): set it or use schedule 'steps'")
    if tc.energy_weight == 0 and tc.forces_weight == 0:
        raise ValueError("training.energy_weight and training.forces_weight are both 0: nothing to fit; make one positive")
    if dc.validation is not None:
        unused = SPLIT_SETTINGS
        why = "data.validation names a file (all of data.path is training data)"
    elif dc.test is not None:
        unused = ("n_train", "n_test")
        why = "data.test names a file (data.path is split into n_val validation structures and training data)"
    else:
        return
    for key in unused:
        if getattr(dc, key) != _default(DataConfig, key):
            raise ValueError(f"data.{key} has no effect when {why}; remove data.{key}")


# ---- conversion by field type ------------------------------------------------------------------

def convert(value, kind, name: str):
    """value as the type `kind` (int, float, str, bool, list[int], dict, X | None, int | float)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        options = [k for k in options if k is not type(None)]
        exact = [k for k in options if type(value) is k]
        for k in exact + [k for k in options if k not in exact]:
            try:
                return convert(value, k, name)
            except ValueError:
                pass
        raise ValueError(f"setting '{name}' must be {_describe(kind)}, got {value!r}; fix it in the config or with --set")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"setting '{name}' must be a list, got {value!r}; write it as [a, b, ...]")
        (item,) = typing.get_args(kind)
        return [convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    converter = _CONVERTERS.get(kind)
    if converter is None:  # a type this module does not know: the model checks it
        return value
    out = converter(value)
    if out is None:
        raise ValueError(f"setting '{name}' must be {_describe(kind)}, got {value!r}; fix it in the config or with --set")
    return out


def _to_float(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            return None
    else:
        return None
    return out if math.isfinite(out) else None


def _to_int(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    number = _to_float(value)
    return int(number) if number is not None and number.is_integer() else None


_CONVERTERS = {
    float: _to_float,
    int: _to_int,
    bool: lambda v: v if isinstance(v, bool) else None,
    str: lambda v: v if isinstance(v, str) else None,
    dict: lambda v: v if isinstance(v, dict) else None,
}


def _describe(kind) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        names = [_describe(k) for k in typing.get_args(kind) if k is not type(None)]
        text = " or ".join(names)
        return text + " or null" if type(None) in typing.get_args(kind) else text
    if origin is list:
        return f"a list of {_describe(typing.get_args(kind)[0]).removeprefix('a ')}s"
    return {float: "a finite number", int: "a whole number", bool: "true or false", str: "a string",
            dict: "a mapping"}.get(kind, getattr(kind, "__name__", str(kind)))


def _type_name(kind) -> str:
    """The short type of a field in the reference tables."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if k is type(None) else _type_name(k) for k in typing.get_args(kind))
    if origin is list:
        return f"list of {_type_name(typing.get_args(kind)[0])}s"
    return {float: "number", int: "integer", bool: "bool", str: "string", dict: "mapping"}.get(
        kind, getattr(kind, "__name__", str(kind)))


# ---- sections ----------------------------------------------------------------------------------

def _mapping(raw, name: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{name} must be a mapping of settings (key: value), got {raw!r}")
    return raw


# names other training codes use for settings that exist here under another name
ALIASES = {"learning_rate": "lr", "lr_min": "lr_final", "final_lr": "lr_final", "max_epochs": "epochs",
           "num_epochs": "epochs", "n_epochs": "epochs", "train_file": "path", "file": "path",
           "val_file": "validation", "valid_file": "validation", "test_file": "test", "group_by": "split_by",
           "seed_split": "split_seed", "ema": "ema_decay", "num_threads": "threads", "batch": "batch_size"}


def _refuse_unknown(raw: dict, known, prefix: str) -> None:
    for key in raw:
        if key not in known:
            near = [ALIASES[key]] if ALIASES.get(key) in known else difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{prefix}{near[0]}'? " if near else ""
            raise ValueError(f"unknown setting '{prefix}{key}'; {hint}known here: {', '.join(sorted(known))}")


def _default(cls, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _section(cls, raw, prefix: str):
    raw = _mapping(raw, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _refuse_unknown(raw, fields, f"{prefix}.")
    values = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}"
        value = convert(value, hints[key], name)
        meta = fields[key].metadata
        if value is not None and meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"setting '{name}' must be one of {', '.join(meta['choices'])}, got {value!r}")
        if value is not None and meta.get("check") and not meta["check"][0](value):
            raise ValueError(f"setting '{name}' must be {meta['check'][1]}, got {value!r}")
        values[key] = value
    return cls(**values)


def _model_section(raw) -> dict:
    """The model settings as given (ModelConfig fills in the rest), converted by ModelConfig's types."""
    raw = _mapping(raw, "model")
    hints = typing.get_type_hints(ModelConfig)
    _refuse_unknown(raw, hints, "model.")
    return {key: convert(value, hints[key], f"model.{key}") for key, value in raw.items()}


# ---- the reference in docs/training.md ---------------------------------------------------------

def reference_markdown() -> str:
    """Tables of every setting with its type, default and meaning (docs/training.md embeds this)."""
    lines = []
    for section, cls in (("data", DataConfig), ("training", TrainingConfig)):
        hints = typing.get_type_hints(cls)
        lines += [f"### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            rule = f.metadata["check"][1] if f.metadata.get("check") else None
            rule = f"one of {', '.join(f.metadata['choices'])}" if f.metadata.get("choices") else rule
            meaning = f.metadata["help"] + (f" ({rule})" if rule else "")
            lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{_yaml(f.default)}` | {meaning} |")
        lines.append("")
    hints = typing.get_type_hints(ModelConfig)
    lines += ["### `model`", "", "The fields of `ModelConfig` (efa_deploy/model/config.py); `atomic_numbers` "
              "defaults to the elements in the training data.", "", "| key | type | default |", "|---|---|---|"]
    for f in dataclasses.fields(ModelConfig):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "from the data")
        lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{_yaml(default)}` |")
    lines += ["", "### `output`", "", f"The run folder (default `{DEFAULT_OUTPUT}`): checkpoints, metrics.csv, "
              "learning_curve.png. Relative paths in a YAML file are relative to that file.", ""]
    return "\n".join(lines)


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


DOCS_START, DOCS_END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def write_docs(path: str) -> None:
    """Replace the reference between the markers in a Markdown file."""
    with open(path) as f:
        text = f.read()
    if DOCS_START not in text or DOCS_END not in text:
        raise SystemExit(f"{path} lacks the markers {DOCS_START.strip()} and {DOCS_END}")
    head, rest = text.split(DOCS_START, 1)
    tail = rest.split(DOCS_END, 1)[1]
    with open(path, "w") as f:
        f.write(head + DOCS_START + reference_markdown() + "\n" + DOCS_END + tail)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write-docs"] and len(sys.argv) == 3:
        write_docs(sys.argv[2])
    else:
        print(reference_markdown())
