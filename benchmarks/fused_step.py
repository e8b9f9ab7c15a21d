"""Fused against reference message passing (issue 9, item 2): energy + forces of the
shipped-size model (32 features, 2 layers, cutoff 5 A, 16 radial functions; EFA with a fixed
50-point grid) on water droplets, float32 and float64, one thread.

Per droplet size, dtype and model (local, EFA), the reference and fused paths run in the same
process, interleaved, minimum of the repeats (TorchScript, as the calculator and LAMMPS run
them). Times are the process's CPU time (time.process_time, one thread): on a core shared with
other jobs, wall-clock time measures the other jobs too. Memory: the peak resident-set growth of one energy + forces call, each configuration in
a fresh process (VmHWM after the call, reset just before it, minus VmRSS before it). Message
share: 1 - (the step with every message step replaced by zeros) / (the step). MACE (32 channels, max_L = 0, 2 layers, same
cutoff) runs in the same process when mace-torch is installed (pip install -e ".[bench]").

    taskset -c 0 python benchmarks/fused_step.py        # writes benchmarks/results/fused_step.{md,json}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.io import read  # noqa: E402

from efa_deploy.graph import structure_graph  # noqa: E402
from efa_deploy.model import ModelConfig, build_model, energy_and_forces, use_fused  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SPACING = 8.0  # A between copies of water16.xyz: about 49 neighbours within 5 A, as in liquid water
DTYPES = {"float32": torch.float32, "float64": torch.float64}
PATHS = ("reference", "fused")


def config(use_efa: bool) -> ModelConfig:
    # r_max far beyond the largest droplet: the grid stays the fixed 50-point rule
    return ModelConfig(atomic_numbers=[1, 8], features=32, num_layers=2, cutoff=5.0, num_radial=16,
                       use_efa=use_efa, grid_points=50, r_max=200.0)


def water_droplet(n_atoms: int) -> Atoms:
    """The n_atoms // 3 molecules nearest the centre of a cubic tiling of export/water16.xyz."""
    unit = read(REPO / "export" / "water16.xyz")
    side = int(np.ceil((n_atoms / len(unit)) ** (1 / 3))) + 1
    offsets = SPACING * np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    positions = (unit.positions[None] + offsets).reshape(-1, 3, 3)  # (molecules, O H H, xyz)
    numbers = np.tile(unit.numbers, len(offsets)).reshape(-1, 3)
    oxygen = positions[:, 0]
    keep = np.argsort(np.linalg.norm(oxygen - oxygen.mean(0), axis=1), kind="stable")[: n_atoms // 3]
    return Atoms(numbers=numbers[keep].ravel(), positions=positions[keep].reshape(-1, 3))


def random_model(use_efa: bool, dtype: torch.dtype) -> torch.nn.Module:
    """Zero-initialised residual outputs randomised, so that every block reaches the energy."""
    torch.manual_seed(0)
    model = build_model(config(use_efa), dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp.2" in name:
                p.normal_(0.0, 0.3)
    return model


def models(use_efa: bool, dtype: torch.dtype, scripted: bool = True):
    """The same model scripted on each path, and without message steps ("none"); with
    scripted=False, the eager model on the fused path."""
    model = random_model(use_efa, dtype)
    if not scripted:
        return use_fused(model, True)
    scripted = {}
    for path in PATHS:
        use_fused(model, path == "fused")
        scripted[path] = torch.jit.script(model)
    scripted["none"] = without_messages(model)
    return scripted


def step(model, graph) -> float:
    t0 = time.process_time()
    energy_and_forces(model, *graph.inputs())
    return time.process_time() - t0


class NoMessage(torch.nn.Module):
    """Stands in for a layer's message step to time the step without it (the 0 * d term keeps the
    positions in the graph of a local model)."""

    def forward(self, x: torch.Tensor, vec: torch.Tensor, sender: torch.Tensor, receiver: torch.Tensor,
                d: torch.Tensor, rbf: torch.Tensor, envelope: torch.Tensor, unit: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(x) + 0.0 * d.sum(), torch.zeros_like(vec)


def without_messages(model: torch.nn.Module) -> torch.jit.ScriptModule:
    model = copy.deepcopy(model)
    for layer in model.layers:
        layer.message = NoMessage()
    return torch.jit.script(model)


def max_relative_difference(fused, reference, graph) -> float:
    a = [t.detach() for t in energy_and_forces(fused, *graph.inputs())]
    b = [t.detach() for t in energy_and_forces(reference, *graph.inputs())]
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, b))


def mace_model(dtype: torch.dtype):
    """MACE of the same width: 32 scalar channels (max_L = 0), 2 layers, cutoff 5 A; None without mace-torch."""
    # e3nn 0.4 loads its own constants.pt with torch.load's old default; it holds slice objects
    torch.serialization.add_safe_globals([slice])
    try:
        from e3nn import o3
        from mace import modules
    except ImportError:
        return None
    torch.manual_seed(0)
    model = modules.MACE(
        r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2, num_elements=2, hidden_irreps=o3.Irreps("32x0e"), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(2), avg_num_neighbors=49.0, atomic_numbers=[1, 8], correlation=3,
        gate=torch.nn.functional.silu,
    )
    return model.to(dtype).eval()


def mace_inputs(graph, dtype: torch.dtype) -> dict:
    n = graph.positions.shape[0]
    one_hot = torch.nn.functional.one_hot(graph.species, 2).to(dtype)
    return {
        "positions": graph.positions.to(dtype), "node_attrs": one_hot, "edge_index": graph.edge_index,
        "shifts": graph.edge_shift.to(dtype), "unit_shifts": graph.edge_shift.to(dtype), "batch": graph.batch,
        "ptr": torch.tensor([0, n]), "cell": torch.zeros(3, 3, dtype=dtype), "head": torch.zeros(1, dtype=torch.long),
        "weight": torch.ones(1, dtype=dtype), "energy_weight": torch.ones(1, dtype=dtype),
    }


def mace_step(model, inputs: dict) -> float:
    data = dict(inputs, positions=inputs["positions"].clone())
    t0 = time.process_time()
    model(data, compute_force=True, training=False)
    return time.process_time() - t0


def timings(n_atoms: int, use_efa: bool, dtype_name: str, repeats: int, with_mace: bool) -> dict:
    dtype = DTYPES[dtype_name]
    graph = structure_graph(water_droplet(n_atoms), [1, 8], 5.0, dtype)
    scripted = models(use_efa, dtype)
    mace = mace_model(dtype) if with_mace else None
    inputs = mace_inputs(graph, dtype) if mace is not None else None
    for model in scripted.values():  # warm-up: TorchScript profiles, then optimises, in its first calls
        for _ in range(3):
            step(model, graph)
    if mace is not None:
        mace_step(mace, inputs)
    best = {p: np.inf for p in scripted} | {"mace": np.inf}
    for _ in range(repeats):
        for path, model in scripted.items():
            best[path] = min(best[path], step(model, graph))
        if mace is not None:
            best["mace"] = min(best["mace"], mace_step(mace, inputs))
    n, e = graph.positions.shape[0], graph.edge_index.shape[1]
    row = {"atoms": n, "edges": e, "model": "EFA" if use_efa else "local", "dtype": dtype_name,
           "max_rel_diff": max_relative_difference(scripted["fused"], scripted["reference"], graph)}
    for path in PATHS:
        row[f"us_per_atom_{path}"] = 1e6 * best[path] / n
        row[f"message_share_{path}"] = 1.0 - best["none"] / best[path]
    row["speedup"] = best["reference"] / best["fused"]
    row["us_per_atom_mace"] = 1e6 * best["mace"] / n if mace is not None else None
    return row


PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from fused_step import memory_probe
print(json.dumps(memory_probe(int(sys.argv[2]), sys.argv[3] == "EFA", sys.argv[4], sys.argv[5])))
"""


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_probe(n_atoms: int, use_efa: bool, dtype_name: str, path: str) -> dict:
    """Peak resident growth of one energy + forces call (in this process, which must be fresh)."""
    dtype = DTYPES[dtype_name]
    model = models(use_efa, dtype)[path]  # the others are freed before the baseline
    step(model, structure_graph(water_droplet(30), [1, 8], 5.0, dtype))  # libraries initialised, profiled
    step(model, structure_graph(water_droplet(30), [1, 8], 5.0, dtype))
    graph = structure_graph(water_droplet(n_atoms), [1, 8], 5.0, dtype)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kb("VmRSS")
    step(model, graph)
    return {"kb_per_atom": (_status_kb("VmHWM") - before) / graph.positions.shape[0]}


def memory(n_atoms: int, use_efa: bool, dtype_name: str, path: str) -> float:
    args = [sys.executable, "-c", PROBE, str(Path(__file__).parent), str(n_atoms), "EFA" if use_efa else "local",
            dtype_name, path]
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.splitlines()[-1])["kb_per_atom"]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores ({platform.node()}), torch {torch.__version__}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Fused local message passing: energy + forces (benchmarks/fused_step.py)", "",
        f"Machine: {meta['machine']}. {meta['note']}", "",
        f"Model: 32 features, 2 layers, cutoff 5 A, 16 radial functions; EFA with a fixed 50-point grid. "
        f"Water droplets tiled from export/water16.xyz ({SPACING} A spacing). One thread (`taskset -c 0`, "
        f"OMP_NUM_THREADS=1), CPU time of the process, TorchScript, reference and fused interleaved in one process, minimum of "
        f"{meta['repeats'] or 'the'} repeats. Memory: peak resident growth of one call, fresh process per configuration. "
        "Message share: 1 - (step with the message steps replaced by zeros) / (step), same process.", "",
        "| atoms | edges | model | dtype | us/atom ref | us/atom fused | speed-up | KB/atom ref | KB/atom fused "
        "| memory ratio | message share ref | message share fused | us/atom MACE | MACE / fused | max rel diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mace = r["us_per_atom_mace"]
        mace_cells = "- | -" if mace is None else f"{mace:.1f} | {mace / r['us_per_atom_fused']:.2f}x"
        lines.append(
            f"| {r['atoms']} | {r['edges']} | {r['model']} | {r['dtype']} | {r['us_per_atom_reference']:.1f} | "
            f"{r['us_per_atom_fused']:.1f} | {r['speedup']:.2f}x | {r['kb_per_atom_reference']:.1f} | "
            f"{r['kb_per_atom_fused']:.1f} | {r['memory_ratio']:.2f}x | {100 * r['message_share_reference']:.0f}% | "
            f"{100 * r['message_share_fused']:.0f}% | {mace_cells} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 3000, 10000])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--models", nargs="+", default=["local", "EFA"], choices=["local", "EFA"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-mace", action="store_true", help="skip MACE even when mace-torch is installed")
    parser.add_argument("--mace-max-atoms", type=int, default=3000, help="largest droplet MACE runs on (it is slow)")
    parser.add_argument("--note", default="2-core development VM shared with other jobs: timings are noisy; "
                                           "ratios are from one run, same process.")
    parser.add_argument("--out", type=Path, default=RESULTS / "fused_step")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="LOG",
                        help="measure nothing: write the tables from the rows earlier runs printed to these logs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with_mace = not args.no_mace and mace_model(torch.float64) is not None
    rows = [json.loads(line) for log in args.merge or [] for line in log.read_text().splitlines()
            if line.startswith("{")]
    for n in [] if args.merge else args.sizes:
        for dtype_name in args.dtypes:
            for name in args.models:
                mace = with_mace and name == "EFA" and n <= args.mace_max_atoms
                row = timings(n, name == "EFA", dtype_name, args.repeats, mace)
                for path in PATHS:
                    row[f"kb_per_atom_{path}"] = memory(n, name == "EFA", dtype_name, path)
                row["memory_ratio"] = row["kb_per_atom_reference"] / row["kb_per_atom_fused"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    rows.sort(key=lambda r: (r["atoms"], r["dtype"], r["model"] != "local"))
    meta = {"machine": machine(), "note": args.note, "repeats": None if args.merge else args.repeats, "mace": with_mace,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
