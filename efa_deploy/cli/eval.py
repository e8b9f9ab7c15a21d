"""efa-eval: test errors of a model file (or an efa-train checkpoint) on a data file.

    efa-eval model.pt test.npz [--json] [--plot parity.png] [--batch-size 16]
    efa-eval runs/x/best.ckpt config.yaml [--split test]   # a set of a training config's split

Prints the energy MAE and RMSE per structure (eV) and per atom (eV/atom), the force MAE and
RMSE per component (eV/A) and the force MAE on each element; --json prints them as JSON
instead; --plot writes a parity plot (model against reference energies and forces).
DATA is a data file in any format efa-train reads (npz, extxyz, ASE db, ...), or an efa-train
YAML config, of whose split --split picks the set (default: test; the same sets training used).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

PROG = "efa-eval"
SETS = ("train", "validation", "test")


def structures_of(data: str | Path, split: str | None) -> list:
    """The structures of a data file, or one set of the split a training config describes."""
    from ..training.data import load_structures

    if Path(data).suffix not in (".yaml", ".yml"):
        if split is not None:
            raise ValueError(f"--split {split} picks a set of a training config's split; {data} is a data file "
                             "(give a YAML config, or leave --split out)")
        return load_structures(data)
    from ..training.splits import load_splits
    from ..training.config import TrainConfig, read_yaml

    chosen = getattr(load_splits(TrainConfig.from_dict(read_yaml(data)).data), split or "test")
    if not chosen:
        raise ValueError(f"the {split or 'test'} set of {data} is empty; pick another with --split")
    return chosen


def evaluate_file(model: str | Path, data: str | Path, batch_size: int = 16, split: str | None = None,
                  device: str = "cpu"):
    """(error report, Predictions) of a model file or checkpoint on every structure of a data
    file (or on one set of a training config's split)."""
    from ..calculator import load_any
    from ..training.data import GraphDataset
    from ..training.distributed import World, resolve_device
    from ..training.metrics import error_report, predict

    device = resolve_device(device, World())
    module, metadata = load_any(model, str(device))
    structures = structures_of(data, split)
    dataset = GraphDataset.for_model(structures, metadata, source=str(data))
    predictions = predict(module, dataset, batch_size, device)
    bad = np.flatnonzero(~np.isfinite(predictions.energy))
    if len(bad):
        raise ValueError(f"the model predicts a non-finite energy for structure {bad[0]} of {data}; "
                         "check the model file (efa-export --check) and that structure")
    return error_report(predictions), predictions


def format_report(report: dict, model: str, data: str) -> str:
    lines = [f"{PROG}: {model} on {data}: {report['structures']} structures, {report['atoms']} atoms",
             f"{'':16s}{'MAE':>12s}{'RMSE':>12s}"]
    for key, label, unit in (("energy", "energy", "eV"), ("energy_per_atom", "energy/atom", "eV/atom"),
                             ("forces", "forces", "eV/A")):
        lines.append(f"{label:16s}{report[key + '_mae']:12.6f}{report[key + '_rmse']:12.6f}  {unit}")
    by_element = ", ".join(f"{z} {v:.6f}" for z, v in report["forces_mae_by_element"].items())
    lines.append(f"force MAE by element (eV/A): {by_element}")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model file written by efa-export, or an efa-train checkpoint (EMA weights)")
    p.add_argument("data", help="structures with reference energies and forces (npz, extxyz, ASE db, ...), "
                                "or an efa-train YAML config")
    p.add_argument("--split", choices=SETS, help="with a YAML config: the set to evaluate (default test)")
    p.add_argument("--json", action="store_true", help="print the errors as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a parity plot")
    p.add_argument("--batch-size", type=int, default=16, help="structures per evaluation batch (default 16)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="where the model runs (default cpu; auto: a GPU when torch sees one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.plot and not Path(args.plot).resolve().parent.is_dir():
            raise ValueError(f"--plot {args.plot}: the folder {Path(args.plot).parent} does not exist; create it first")
        report, predictions = evaluate_file(args.model, args.data, args.batch_size, args.split, args.device)
        source = Path(args.data).name
        if Path(args.data).suffix in (".yaml", ".yml"):
            source += f" ({args.split or 'test'} set)"
        if args.plot:
            from ..plots import plot_parity

            plot_parity(predictions, Path(args.plot), f"{Path(args.model).name} on {source}", report)
    except (ValueError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report, args.model, source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
