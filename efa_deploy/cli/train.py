"""efa-train: train an energy model from a YAML config plus command-line overrides.

    efa-train config.yaml [--set training.lr=5e-4 ...] [-o runs/x] [--epochs 50] [--time-budget 900]
    efa-train --resume -o runs/x          # continue a killed run from runs/x/last.ckpt
    torchrun --nproc-per-node 2 efa-train config.yaml [--resume]   # data-parallel on 2 processes

Relative paths in the YAML file (data.path, data.validation, data.test, output) are relative to
that file; paths given on the command line are relative to the current directory. Every setting
is described in docs/training.md. A run that diverges (NaN or inf) stops with exit status 1 and
keeps its last good checkpoint; a bad config or data file gives exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from ..checkpoint import load_checkpoint
from ..training.config import DATA_FILES, TrainConfig, read_yaml
from ..training.distributed import RankFailed, world_from_env
from ..training.train import TrainingDiverged, train


def parse_set(items: list[str]) -> dict:
    """['training.lr=1e-3', 'model.use_efa=false'] -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: '{part}' was given a value by an earlier --set, not settings")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--set {item!r}: the value is not valid YAML; quote it") from None
    return out


def merge(base: dict, update: dict) -> dict:
    """update laid over base, section by section (TrainConfig.from_dict checks the result)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_config(args: argparse.Namespace) -> TrainConfig:
    if args.config is not None:
        config = read_yaml(args.config)
    elif args.resume:
        if args.output is None:
            raise ValueError("--resume without a config file needs -o/--output, the run's folder")
        config = load_checkpoint(Path(args.output) / "last.ckpt")["train_config"]
    else:
        raise ValueError("give a YAML config file (or --resume -o RUN_FOLDER)")
    cli: dict = {"data": {}, "model": {}, "training": {}}
    if args.data is not None:
        cli["data"]["path"] = str(Path(args.data).resolve())
    if args.output is not None:
        cli["output"] = str(Path(args.output).resolve())
    for key in ("epochs", "time_budget", "dtype", "seed", "batch_size", "threads", "checkpoint_every", "device",
                "workers"):
        if getattr(args, key) is not None:
            cli["training"][key] = getattr(args, key)
    if args.no_progress:
        cli["training"]["progress"] = False
    if args.efa is not None:
        cli["model"]["use_efa"] = args.efa
    cli = {key: value for key, value in cli.items() if value}
    config = TrainConfig.from_dict(merge(merge(config, cli), parse_set(args.set)))
    for key in DATA_FILES:
        if getattr(config.data, key):
            setattr(config.data, key, str(Path(getattr(config.data, key)).resolve()))
    config.output = str(Path(config.output).resolve())
    return config


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="efa-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML file with data, model, training and output sections")
    p.add_argument("-o", "--output", help="run folder (checkpoints, metrics.csv, learning_curve.png)")
    p.add_argument("--data", help="training data file (npz, extxyz, ASE db, ...)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.ckpt if it exists")
    p.add_argument("--epochs", type=int)
    p.add_argument("--time-budget", type=float, help="seconds of training before stopping")
    p.add_argument("--dtype", choices=["float64", "float32"])
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto: a GPU if torch sees one)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes per rank (default 0)")
    p.add_argument("--efa", dest="efa", action="store_true", default=None, help="EFA on every layer")
    p.add_argument("--no-efa", dest="efa", action="store_false", help="the local baseline")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any setting")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        config = build_config(args)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False))
            return 0
        summary = train(config, resume=args.resume)
    except (TrainingDiverged, RankFailed) as err:
        print(f"efa-train: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"efa-train: error: {err}", file=sys.stderr)
        return 2
    if world_from_env().main:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
