"""Where the peak memory of one energy + forces call goes (issue 9: <= 16 KB/atom in float32).

For one water droplet and the fused path (float32 by default; --radial reference keeps the
reference radial basis, as before efa::radial_basis), in fresh processes:
  - peak resident growth (VmHWM - VmRSS before) of: the edge geometry alone (d, r, unit, rbf,
    envelope with their autograd graph), the forward, and forward + backward; and the peak of
    live torch allocations in forward + backward (profiler memory events: no malloc free lists);
  - what autograd saves for backward, grouped by operation and by per-edge / per-atom shape
    (torch.autograd.graph.saved_tensors_hooks; each storage counted once);
  - the size of the graph inputs (built outside the measured call by benchmarks/fused_step.py).

    taskset -c 0 python benchmarks/memory_breakdown.py --atoms 3000   # prints a markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fused_step import DTYPES, _status_kb, models, water_droplet  # noqa: E402

from efa_deploy.graph import structure_graph  # noqa: E402
from efa_deploy.model import energy_and_forces  # noqa: E402

STAGES = ("geometry", "forward", "forward+backward", "live tensors")


def _graph(n_atoms: int, dtype: torch.dtype):
    return structure_graph(water_droplet(n_atoms), [1, 8], 5.0, dtype)


def _geometry(model, graph):
    positions = graph.positions.detach().requires_grad_(True)
    sender, receiver = graph.edge_index[0], graph.edge_index[1]
    return model.edge_geometry(positions, sender, receiver, graph.edge_shift)


def fused_model(use_efa: bool, dtype: torch.dtype, radial: str) -> torch.nn.Module:
    model = models(use_efa, dtype, scripted=False)
    model.radial.fused = radial == "fused"
    return model


def stage_peak(n_atoms: int, use_efa: bool, dtype_name: str, radial: str, stage: str) -> dict:
    """Peak resident growth of one stage (this process must be fresh)."""
    dtype = DTYPES[dtype_name]
    eager = fused_model(use_efa, dtype, radial)
    model = torch.jit.script(eager)
    for _ in range(2):  # libraries initialised, TorchScript profiled
        energy_and_forces(model, *_graph(30, dtype).inputs())
        _geometry(eager, _graph(30, dtype))
    graph = _graph(n_atoms, dtype)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    if stage == "live tensors":
        return {"kb_per_atom": live_tensor_peak(model, graph) / 1024 / graph.positions.shape[0], "kept_kb_per_atom": 0.0}
    if stage == "geometry":
        kept = _geometry(eager, graph)
    elif stage == "forward":
        positions = graph.positions.detach().requires_grad_(True)
        kept = model(positions, *graph.inputs()[1:])
    else:
        kept = energy_and_forces(model, *graph.inputs())
    n = graph.positions.shape[0]
    return {"kb_per_atom": (_status_kb("VmHWM") - before) / n, "kept_kb_per_atom": (_status_kb("VmRSS") - before) / n,
            "edges": graph.edge_index.shape[1], "atoms": n, "kept": len(kept)}


def live_tensor_peak(model, graph) -> float:
    """The largest sum of live torch CPU allocations (bytes) during one energy + forces call, from
    the profiler's allocation events: what the call needs, without the C library's free lists
    (a lower bound: see below)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        energy_and_forces(model, *graph.inputs())
    # frees outside any operator are "[memory]" events; the rest is each operator's own net change
    # (children excluded), counted when it ends: transients inside one operator are missed
    events = sorted((e.time_range.start, e.cpu_memory_usage) if e.name == "[memory]" else
                    (e.time_range.end, e.self_cpu_memory_usage) for e in prof.events())
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return float(peak)


def saved_for_backward(n_atoms: int, use_efa: bool, dtype_name: str, radial: str) -> dict:
    """Bytes autograd saves in the forward, by shape (eager model)."""
    dtype = DTYPES[dtype_name]
    model = fused_model(use_efa, dtype, radial)
    graph = _graph(n_atoms, dtype)
    n, e = graph.positions.shape[0], graph.edge_index.shape[1]
    seen: set[int] = set()
    groups: dict[str, float] = defaultdict(float)

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and t.numel() > 0:
            seen.add(ptr)
            kind = "per-edge" if t.dim() > 0 and t.shape[0] == e else "per-atom" if t.dim() > 0 and t.shape[0] == n else "other"
            groups[f"{kind} {tuple(t.shape[1:])} {str(t.dtype).replace('torch.', '')}"] += t.untyped_storage().nbytes()
        return t

    positions = graph.positions.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(positions, *graph.inputs()[1:])
    inputs = sum(t.untyped_storage().nbytes() for t in graph.inputs() if isinstance(t, torch.Tensor))
    return {"atoms": n, "edges": e, "saved_kb_per_atom": {k: v / 1024 / n for k, v in sorted(groups.items())},
            "inputs_kb_per_atom": inputs / 1024 / n}


PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from memory_breakdown import stage_peak, saved_for_backward
args = int(sys.argv[2]), sys.argv[3] == "EFA", sys.argv[4], sys.argv[5]
print(json.dumps(saved_for_backward(*args) if sys.argv[6] == "saved" else stage_peak(*args, sys.argv[6])))
"""


def fresh(n_atoms: int, use_efa: bool, dtype_name: str, radial: str, what: str) -> dict:
    args = [sys.executable, "-c", PROBE, str(Path(__file__).parent), str(n_atoms), "EFA" if use_efa else "local",
            dtype_name, radial, what]
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms", type=int, nargs="+", default=[3000])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--radial", default="fused", choices=["fused", "reference"])
    args = parser.parse_args()
    for n in args.atoms:
        for name in ("local", "EFA"):
            saved = fresh(n, name == "EFA", args.dtype, args.radial, "saved")
            print(f"\n## {name}, {saved['atoms']} atoms, {saved['edges']} edges "
                  f"({saved['edges'] / saved['atoms']:.1f} per atom), {args.dtype}, fused path, {args.radial} radial basis\n")
            print("| stage | peak growth KB/atom | still resident after KB/atom |\n|---|---|---|")
            for stage in STAGES:
                r = fresh(n, name == "EFA", args.dtype, args.radial, stage)
                print(f"| {stage} | {r['kb_per_atom']:.1f} | {r['kept_kb_per_atom']:.1f} |")
            print(f"\nGraph inputs (outside the measured call): {saved['inputs_kb_per_atom']:.2f} KB/atom.\n")
            print("| saved for backward (shape after dim 0, dtype) | KB/atom |\n|---|---|")
            for key, kb in sorted(saved["saved_kb_per_atom"].items(), key=lambda kv: -kv[1]):
                print(f"| {key} | {kb:.2f} |")
            print(f"| total | {sum(saved['saved_kb_per_atom'].values()):.2f} |")


if __name__ == "__main__":
    main()
