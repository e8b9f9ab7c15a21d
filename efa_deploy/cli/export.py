"""efa-export: turn a training checkpoint into the TorchScript model file that LAMMPS
(pair_style efa) and efa_deploy.EFACalculator load.

    efa-export runs/x/best.ckpt -o model.pt [--check] [--force]
    efa-export --from-model old.pt -o new.pt      (a model file of an older format, rewritten)
    efa-export --from-model m.pt --dtype float64 -o m64.pt   (the same weights in another dtype)

--check reloads the written file and compares its energies and forces with the eager model
on held-out structures (the checkpoint's test split, else its validation split, or --check-data).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..model import ModelConfig, energy_and_forces
from ..modelfile import convert_model_file, load_model_file, save_model_file

# largest |difference| accepted between the TorchScript file and the eager model
CHECK_TOLERANCE = {"float64": 1e-10, "float32": 1e-4}


def eager_model(ckpt: dict, checkpoint: str | Path, weights: str) -> tuple[torch.nn.Module, object]:
    """The checkpoint's model, with one-line errors for what a model file cannot hold."""
    if ckpt["dtype"] not in CHECK_TOLERANCE:
        raise ValueError(f"{checkpoint}: dtype {ckpt['dtype']!r} cannot be exported; model files hold "
                         f"{' or '.join(CHECK_TOLERANCE)} (train with training.dtype float32 or float64)")
    try:
        return model_from_checkpoint(ckpt, weights)
    except RuntimeError as err:  # load_state_dict: the weights' shapes do not fit the configuration
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line or "Missing" in line), first[0])
        raise ValueError(f"{checkpoint}: the weights do not fit the model configuration ({detail}); the checkpoint "
                         "was edited or written by another version of efa-train") from None


def export_checkpoint(checkpoint: str | Path, output: str | Path, weights: str = "ema", force: bool = False) -> dict:
    """Write the model file of a checkpoint (EMA weights by default); returns its metadata."""
    ckpt = load_checkpoint(checkpoint)
    model, config = eager_model(ckpt, checkpoint, weights)
    data = ckpt["train_config"]["data"]
    provenance = {
        "data_digest": ckpt.get("data_digest"),
        "data_file": Path(data["path"]).name if data.get("path") else None,
        "split": {k: data.get(k) for k in ("n_train", "n_val", "n_test", "split_seed")},
        "validation": ckpt.get("val_metrics", {}),
        "step": ckpt["step"],
        "epoch": ckpt.get("epoch"),
        "weights": weights,
        "training": ckpt["train_config"].get("training", {}),
        "checkpoint": Path(checkpoint).name,
    }
    return save_model_file(model, config, output, provenance=provenance, overwrite=force)


def held_out_structures(ckpt: dict, data_path: str | Path | None = None, count: int = 32) -> list:
    """Up to `count` structures the model was not trained on: from data_path if given, else the
    checkpoint's test split (its validation split when the test split is empty)."""
    from ..training.data import load_structures
    from ..training.splits import load_splits

    if data_path is not None:
        return load_structures(data_path)[:count]

    data = ckpt["train_config"]["data"]
    for key in ("path", "validation", "test"):
        if data.get(key) and not Path(data[key]).is_file():
            raise FileNotFoundError(f"the training data {data[key]} is not here; pass --check-data FILE")
    splits = load_splits(data)
    return (splits.test or splits.validation)[:count]


def compare(scripted: torch.nn.Module, eager: torch.nn.Module, structures: list, config: ModelConfig,
            dtype: torch.dtype, batch_size: int = 16, device: str = "cpu") -> dict:
    """Largest |difference| of energies, forces and per-atom energies between two models of
    `config` on `structures` (with the inputs the models take: charges and spins from the
    structures' info, cells); NaN when either model gives NaN or inf."""
    from ..training.data import GraphDataset

    worst = {"energy": 0.0, "forces": 0.0, "energies": 0.0}
    for batch in GraphDataset.for_model(structures, config, dtype, "the check data").batches(batch_size):
        graph = batch.graph.to(device)
        a = energy_and_forces(scripted, *graph.inputs())
        b = energy_and_forces(eager, *graph.inputs())
        for key, x, y in zip(("energy", "forces", "energies"), a, b):
            x, y = x.detach(), y.detach()
            finite = bool(torch.isfinite(x).all() and torch.isfinite(y).all())
            diff = float((x - y).abs().max()) if finite else math.nan
            if not math.isnan(worst[key]) and not diff <= worst[key]:  # a NaN, once in, stays
                worst[key] = diff
    return worst


def check_model_file(model_file: str | Path, checkpoint: str | Path, weights: str = "ema",
                     data_path: str | Path | None = None, count: int = 32, device: str = "cpu") -> dict:
    """Reload model_file (on `device`: auto, cpu or cuda) and compare it with the checkpoint's
    eager model on held-out data."""
    from ..training.distributed import World, resolve_device

    device = str(resolve_device(device, World()))
    scripted, metadata = load_model_file(model_file, device)
    ckpt = load_checkpoint(checkpoint)
    eager, config = eager_model(ckpt, checkpoint, weights)
    eager = eager.to(device)
    structures = held_out_structures(ckpt, data_path, count)
    dtype = next(eager.parameters()).dtype
    worst = compare(scripted, eager, structures, config, dtype, device=device)
    tol = CHECK_TOLERANCE[metadata["dtype"]]
    finite = all(math.isfinite(v) for v in worst.values())
    return {"structures": len(structures), "max_abs_diff": {k: v if math.isfinite(v) else None for k, v in worst.items()},
            "finite": finite, "tolerance": tol, "passed": finite and all(v <= tol for v in worst.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efa-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="checkpoint written by efa-train (best.ckpt or last.ckpt)")
    p.add_argument("--from-model", metavar="OLD.pt",
                   help="instead of a checkpoint: a model file of any format version, rewritten as a current one")
    p.add_argument("-o", "--output", required=True, help="model file to write (TorchScript)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--dtype", choices=["float32", "float64"],
                   help="with --from-model: cast the weights to this dtype (default: the file's)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA weights (default) or the raw ones")
    p.add_argument("--check", action="store_true", help="reload the file and compare it with the eager model")
    p.add_argument("--check-data", help="structures for --check (default: the checkpoint's held-out split)")
    p.add_argument("--check-count", type=int, default=32, help="number of structures for --check")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="where --check runs the model file and the eager model (the file itself is device independent)")
    args = p.parse_args(argv)
    weights = "model" if args.weights == "raw" else "ema"
    if (args.checkpoint is None) == (args.from_model is None):
        p.error("give a checkpoint or --from-model OLD.pt (one of them)")
    if args.dtype and not args.from_model:
        p.error("--dtype goes with --from-model (a checkpoint is exported in its training dtype)")
    try:
        if args.from_model:
            metadata = convert_model_file(args.from_model, args.output, args.force, args.dtype)
            print(f"wrote {args.output} (format version {metadata['format_version']}, {metadata['dtype']}) "
                  f"from {args.from_model}")
            return 0
        metadata = export_checkpoint(args.checkpoint, args.output, weights, args.force)
        print(f"wrote {args.output}: elements {' '.join(metadata['elements'])}, cutoff {metadata['cutoff']} A, "
              f"EFA {'on' if metadata['efa']['enabled'] else 'off'}, {metadata['dtype']}")
        if args.check:
            result = check_model_file(args.output, args.checkpoint, weights, args.check_data, args.check_count,
                                      args.device)
            print(json.dumps(result, indent=1, allow_nan=False))
            if not result["passed"]:
                reason = (f"differences above {result['tolerance']}" if result["finite"]
                          else "the model gives NaN or inf energies or forces")
                print(f"efa-export: check FAILED: {reason}", file=sys.stderr)
                return 1
    except (ValueError, OSError) as err:
        print(f"efa-export: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
