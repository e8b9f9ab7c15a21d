"""Issue 18: the CUDA kernels of efa::edge_message (ops/cuda/, EFA_CUDA=1) against the reference
path on the same GPU (efa_deploy.model.local.edge_message_passing: what a model runs on CUDA
without them): one layer's forward + backward to the edge vectors (forces), float32 and float64,
at the edge counts of about 1e4, 1e5 and 1e6 atoms of water (38 edges per atom at 4.5 A), 32
features, 16 radial functions. CUDA-event timing, median of 10 after 3 warm-ups; peak memory.

    python benchmarks/edge_message_cuda.py     # writes benchmarks/results/edge_message_cuda.{md,json}
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

import efa_deploy.ops  # noqa: F401  (registers torch.ops.efa)
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


def time_layer(op, x: dict) -> tuple[float, float]:
    """(ms per forward + backward to d, peak MB)."""
    def step():
        dx, dv = op(*x.values())
        torch.autograd.grad(dx.sum() + dv.sum(), [x["d"]])
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    rows = []
    for dtype in (torch.float32, torch.float64):
        for atoms in (10_000, 100_000, 1_000_000):
            x = inputs(atoms, dtype)
            row = {"dtype": str(dtype).removeprefix("torch."), "atoms": atoms, "edges": atoms * EDGES_PER_ATOM}
            for name, op in (("cuda kernels", torch.ops.efa.edge_message), ("reference", edge_message_passing)):
                try:
                    ms, mb = time_layer(op, x)
                    row[name] = {"ms": ms, "us_per_atom": 1e3 * ms / atoms, "peak_MB": mb}
                except torch.OutOfMemoryError:
                    row[name] = "out of memory"
                torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
    name = torch.cuda.get_device_name(0)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "edge_message_cuda.json").write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    lines = [f"# efa::edge_message on {name}: CUDA kernels vs the reference path\n",
             "One layer, forward + backward to the edge vectors, median of 10 (CUDA events).\n",
             "| dtype | atoms | edges | kernels ms (us/atom, peak MB) | reference ms (us/atom, peak MB) |",
             "|---|---|---|---|---|"]
    cell = lambda v: v if isinstance(v, str) else f"{v['ms']:.2f} ({v['us_per_atom']:.3f}, {v['peak_MB']:.0f})"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['atoms']} | {r['edges']} | {cell(r['cuda kernels'])} | {cell(r['reference'])} |")
    (RESULTS / "edge_message_cuda.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
