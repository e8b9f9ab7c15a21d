"""Cost of one training step, EFA vs the local model (issue 17: at most 1.3x at batch 16).

What is timed: one optimiser step as efa-train takes it (train.Run.train_step, with its malloc
policy): energies and forces with create_graph, the weighted energy + force loss, backward to
the parameters (a double backward through the forces), Adam. float32, one thread, batch 16 of
random molecules of 10-20 atoms (liquid-like density, so each atom has ~15 neighbours within the
5 A cutoff), backbone 32 features, 2 layers.
The variants run interleaved (one round = a few steps of each), so a load change on the machine
hits them all; each variant's time is the minimum over rounds of the mean step time in a round, its
ratio the median over rounds of its time over the local model's time in the same round.

Usage:  taskset -c 1 python benchmarks/train_step.py          (about 1 minute)
        python benchmarks/train_step.py --label before --output /tmp/before.json
        python benchmarks/train_step.py --device cuda --batch 64 --largest-batch   (a GPU: the step
            time there, then the largest batch of these molecules one step fits in, by doubling)
Writes benchmarks/results/train_step.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = dict(features=32, num_layers=2, cutoff=5.0, r_max=15.0)
EFA_VARIANTS = {
    "scalar": dict(),
    "l=1 q/k (4 pairs)": dict(num_vector_frequencies=4),
    "tensor values (4)": dict(value_tensors=4),
    "l=1 q/k (2) + vector values (4)": dict(num_vector_frequencies=2, value_vectors=4),
    "l=1 q/k (2) + vector (4) + tensor (4) values": dict(num_vector_frequencies=2, value_vectors=4, value_tensors=4),
}
# each EFA variant on the Lebedev grid and in the pairwise training form (train_pairwise_max_atoms)
VARIANTS = {"local": dict(use_efa=False)}
for _name, _options in EFA_VARIANTS.items():
    VARIANTS[f"efa {_name}, grid"] = _options
    VARIANTS[f"efa {_name}, pairwise"] = {**_options, "train_pairwise_max_atoms": 64}


def random_molecule(rng: np.random.Generator, n: int):
    from ase import Atoms

    radius = 1.35 * n ** (1.0 / 3.0)  # about 0.1 atoms / A^3
    positions: list[np.ndarray] = []
    while len(positions) < n:
        p = rng.uniform(-radius, radius, 3)
        if np.linalg.norm(p) <= radius and all(np.linalg.norm(p - q) > 1.0 for q in positions):
            positions.append(p)
    return Atoms(numbers=rng.choice([1, 6, 8], n), positions=np.array(positions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per variant and round")
    parser.add_argument("--variants", nargs="*", help="names of VARIANTS to run (default: all that this version knows)")
    parser.add_argument("--label", default="")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--largest-batch", action="store_true",
                        help="then double the batch until a step no longer fits in the GPU's memory")
    parser.add_argument("--output", type=Path, help="default: results/train_step[_cuda].json")
    args = parser.parse_args()
    if args.output is None:
        args.output = RESULTS / ("train_step.json" if args.device == "cpu" else f"train_step_{args.device}.json")
    if args.largest_batch and args.device != "cuda":
        parser.error("--largest-batch searches a GPU's memory: use it with --device cuda")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    from efa_deploy.graph import batch_graph
    from efa_deploy.model import ModelConfig, build_model, energy_and_forces
    from efa_deploy.ops import set_malloc_policy
    from efa_deploy.training.train import TRAINING_MALLOC_POLICY

    torch.set_num_threads(args.threads)
    set_malloc_policy(TRAINING_MALLOC_POLICY)  # as efa-train
    rng = np.random.default_rng(0)
    pool = [random_molecule(rng, int(rng.integers(10, 21))) for _ in range(64)]

    def make_batch(size: int, offset: int):
        structures = [pool[(offset + i) % len(pool)] for i in range(size)]
        graph = batch_graph(structures, [1, 6, 8], BACKBONE["cutoff"], torch.float32).to(device)
        n = graph.positions.shape[0]
        return graph, torch.randn(size, device=device), torch.randn(n, 3, device=device)

    batches = [make_batch(args.batch, 17 * b) for b in range(4)]
    known = set(ModelConfig.__dataclass_fields__)
    names = args.variants or [k for k, v in VARIANTS.items() if set(v) <= known]

    runners = {}
    for name in names:
        torch.manual_seed(0)
        model = build_model(ModelConfig(atomic_numbers=[1, 6, 8], **BACKBONE, **VARIANTS[name]), torch.float32)
        model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer, counter=[0], batch=None):
            graph, energy_ref, forces_ref = batch or batches[counter[0] % len(batches)]
            counter[0] += 1
            energy, forces, _ = energy_and_forces(model, *graph.inputs(), create_graph=True)
            loss = 0.01 * (energy - energy_ref).square().mean() + 0.99 * (forces - forces_ref).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=list(model.parameters()))  # as efa-train
            optimizer.step()

        for _ in range(3):  # warm-up
            step()
        runners[name] = step

    times = {name: [] for name in names}  # mean step time of every round
    for _ in range(args.rounds):
        for name in names:
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                runners[name]()
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)
    # the ratio to the local step of the same round: a load change on a shared machine hits both
    rows = [{"variant": k, "step_ms": 1e3 * min(v),
             "ratio_to_local": float(np.median(np.array(v) / np.array(times["local"]))) if "local" in times else None}
            for k, v in times.items()]
    largest = {}
    if args.largest_batch:
        for name in names:  # the largest batch one step fits in, and that step's time
            size, fits = args.batch, None
            while size <= 2 ** 20:
                try:
                    batch = make_batch(size, 0)
                    runners[name](batch=batch)
                    sync()
                    start = time.perf_counter()
                    runners[name](batch=batch)
                    sync()
                    fits = {"structures": size, "atoms": int(batch[0].positions.shape[0]),
                            "step_ms": 1e3 * (time.perf_counter() - start)}
                except torch.cuda.OutOfMemoryError:
                    break
                finally:
                    batch = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                size *= 2
            largest[name] = fits
            print(f"{name}: largest batch {fits}")
    atoms = [int(g.positions.shape[0]) for g, _, _ in batches]
    machine = platform.processor() or platform.machine()
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    report = {"label": args.label, "batch": args.batch, "atoms_per_batch": atoms, "backbone": BACKBONE,
              "dtype": "float32", "device": args.device, "threads": args.threads, "rounds": args.rounds,
              "steps_per_round": args.steps, "machine": machine, "torch": torch.__version__, "rows": rows,
              "largest_batch": largest}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    lines = [f"# Training step, EFA vs local {args.label}", "", f"{machine}, device {args.device}", "",
             f"batch {args.batch} molecules of 10-20 atoms ({min(atoms)}-{max(atoms)} atoms per batch), "
             f"{BACKBONE}, float32, {args.threads} thread(s); {args.rounds} interleaved rounds of {args.steps} steps: "
             "the fastest round, and the median over rounds of the ratio to the local step in the same round",
             "", "| variant | step (ms) | / local |", "|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio_to_local']:.2f}x" if r["ratio_to_local"] else "-"
        lines.append(f"| {r['variant']} | {r['step_ms']:.1f} | {ratio} |")
    if largest:
        lines += ["", "| variant | largest batch (structures) | atoms | step (ms) |", "|---|---|---|---|"]
        for name, fits in largest.items():
            if fits:
                lines.append(f"| {name} | {fits['structures']} | {fits['atoms']} | {fits['step_ms']:.1f} |")
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
