"""Issue 18: the CUDA kernels (ops/cuda/, EFA_CUDA=1) against the reference path on the same GPU
(what a model runs on CUDA without them), forward + backward to the positions (forces), float32
and float64, at about 1e4, 1e5 and 1e6 atoms of water:
- efa::edge_message against local.edge_message_passing: one layer, 38 edges per atom (4.5 A),
  32 features, 16 radial functions;
- efa::attention_keys + attention_queries against erope.key_value_sums + query_contraction: one
  EFA block's two stages, 8 frequency channels, the 266-point Lebedev grid, 16 values.
CUDA-event timing, median of 10 after 3 warm-ups; peak memory.

    python benchmarks/cuda_kernels.py     # writes benchmarks/results/cuda_kernels.{md,json}
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

import efa_deploy.ops  # noqa: F401  (registers torch.ops.efa)
from efa_deploy.model.erope import key_value_sums, query_contraction
from efa_deploy.model.lebedev import lebedev_grid
from efa_deploy.model.local import edge_message_passing, radial_frequencies

RESULTS = Path(__file__).resolve().parent / "results"
EDGES_PER_ATOM, FEATURES, RADIAL, CUTOFF = 38, 32, 16, 4.5


def inputs(atoms: int, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    edges = atoms * EDGES_PER_ATOM
    d = torch.randn(edges, 3, generator=g, device="cuda", dtype=dtype)
    d = d / d.norm(dim=1, keepdim=True) * (0.8 + 3.9 * torch.rand(edges, 1, generator=g, device="cuda", dtype=dtype))
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dtype)  # noqa: E731
    return {"filter": rand(atoms, 3 * FEATURES), "vec": rand(atoms, 3, FEATURES), "d": d.requires_grad_(True),
            "n_pi": radial_frequencies(RADIAL, CUTOFF).to("cuda", dtype), "weight": rand(3 * FEATURES, RADIAL),
            "bias": rand(3 * FEATURES),
            "sender": torch.randint(0, atoms, (edges,), generator=g, device="cuda"),
            "receiver": torch.sort(torch.randint(0, atoms, (edges,), generator=g, device="cuda")).values,
            "cutoff": CUTOFF}


def attention_inputs(atoms: int, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dtype)  # noqa: E731
    side = (atoms / 0.1) ** (1 / 3)  # water's density
    return {"positions": (torch.rand(atoms, 3, generator=g, device="cuda", dtype=dtype) * side).requires_grad_(True),
            "keys": rand(atoms, 8, 2), "values": rand(atoms, 16), "queries": rand(atoms, 8, 2),
            "owned": torch.ones(atoms, device="cuda", dtype=dtype),
            "batch": torch.zeros(atoms, dtype=torch.long, device="cuda"),
            "omega": torch.linspace(0.0, 0.7, 8, device="cuda", dtype=dtype),
            "directions": torch.from_numpy(lebedev_grid(266)[0]).to("cuda", dtype),
            "weights": torch.rand(266, device="cuda", dtype=dtype)}


def message_step(op, x: dict):
    dx, dv = op(*x.values())
    torch.autograd.grad(dx.sum() + dv.sum(), [x["d"]])


def attention_step(ops, x: dict):
    keys, queries = ops
    kv = keys(x["positions"], x["keys"], x["values"], x["owned"], x["batch"], 1, x["omega"], x["directions"])
    kv = kv * x["weights"].reshape(1, 1, -1, 1)
    y = queries(x["positions"], x["queries"], kv, x["batch"], x["omega"], x["directions"])
    torch.autograd.grad(y.square().sum(), [x["positions"]])


def time_layer(step, x: dict) -> tuple[float, float]:
    """(ms per step, peak MB)."""
    for _ in range(3):
        step(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20


CASES = {
    "edge_message": (inputs, lambda x: message_step(torch.ops.efa.edge_message, x),
                     lambda x: message_step(edge_message_passing, x)),
    "attention": (attention_inputs,
                  lambda x: attention_step((torch.ops.efa.attention_keys, torch.ops.efa.attention_queries), x),
                  lambda x: attention_step((key_value_sums, query_contraction), x)),
}


def measure(case: str, make, kernels, reference, atoms: int, dtype: torch.dtype) -> dict:
    row = {"case": case, "dtype": str(dtype).removeprefix("torch."), "atoms": atoms}
    try:
        x = make(atoms, dtype)
    except torch.OutOfMemoryError:
        return dict(row, **{"cuda kernels": "out of memory", "reference": "out of memory"})
    for name, step in (("cuda kernels", kernels), ("reference", reference)):
        try:
            ms, mb = time_layer(step, x)
            row[name] = {"ms": ms, "us_per_atom": 1e3 * ms / atoms, "peak_MB": mb}
        except torch.OutOfMemoryError:
            row[name] = "out of memory"
        torch.cuda.empty_cache()
    return row


def main() -> None:
    rows = []
    for case, (make, kernels, reference) in CASES.items():
        for dtype in (torch.float32, torch.float64):
            for atoms in (10_000, 100_000, 1_000_000):
                rows.append(measure(case, make, kernels, reference, atoms, dtype))
                print(rows[-1], flush=True)
    name = torch.cuda.get_device_name(0)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cuda_kernels.json").write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    lines = [f"# CUDA kernels vs the reference path on {name}\n",
             "Forward + backward to the positions, median of 10 (CUDA events); `python benchmarks/cuda_kernels.py`.\n",
             "| case | dtype | atoms | kernels ms (us/atom, peak MB) | reference ms (us/atom, peak MB) |",
             "|---|---|---|---|---|"]
    cell = lambda v: v if isinstance(v, str) else f"{v['ms']:.2f} ({v['us_per_atom']:.3f}, {v['peak_MB']:.0f})"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['case']} | {r['dtype']} | {r['atoms']} | {cell(r['cuda kernels'])} | {cell(r['reference'])} |")
    (RESULTS / "cuda_kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
