"""efa-train: train an energy model from a YAML config plus command-line overrides.

    efa-train config.yaml [--set training.lr=5e-4 ...] [-o runs/x] [--epochs 50] [--time-budget 900]
    efa-train --resume -o runs/x          # continue a killed run from runs/x/last.ckpt

Relative paths in the YAML file (data.path, output) are relative to that file; paths given on
the command line are relative to the current directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from ..train import DEFAULTS, load_checkpoint, merge_config


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
        node[parts[-1]] = yaml.safe_load(value)
    return out


def read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as err:
        raise ValueError(f"cannot read config {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings")
    base = path.resolve().parent
    if data.get("data", {}).get("path"):
        data["data"]["path"] = str(base / data["data"]["path"])
    if data.get("output"):
        data["output"] = str(base / data["output"])
    return data


def build_config(args: argparse.Namespace) -> dict:
    config = DEFAULTS
    if args.config is not None:
        config = merge_config(config, read_yaml(Path(args.config)))
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
    for flag, key in (("epochs", "epochs"), ("time_budget", "time_budget"), ("dtype", "dtype"), ("seed", "seed"),
                      ("batch_size", "batch_size"), ("threads", "threads"), ("checkpoint_every", "checkpoint_every")):
        if getattr(args, flag) is not None:
            cli["training"][key] = getattr(args, flag)
    if args.no_progress:
        cli["training"]["progress"] = False
    if args.efa is not None:
        cli["model"]["use_efa"] = args.efa
    config = merge_config(config, cli)
    config = merge_config(config, parse_set(args.set))
    if config["data"]["path"]:
        config["data"]["path"] = str(Path(config["data"]["path"]).resolve())
    config["output"] = str(Path(config["output"]).resolve())
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
            print(yaml.safe_dump(config, sort_keys=False))
            return 0
        from ..train import train

        summary = train(config, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"efa-train: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
