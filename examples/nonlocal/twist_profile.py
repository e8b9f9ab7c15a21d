"""The twist-energy profile of C9H4, C11H4 and C13H4 (one end turned against the other, on the
rigid scaffold of make_cumulenes.py): GFN2-xTB, the local model and the EFA model in one PNG.

    python examples/nonlocal/twist_profile.py     # after run.py (uses runs/cumulene_*_s0/best.ckpt)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_cumulenes import cumulene  # noqa: E402

MODELS = {"local model": ("cumulene_local_s0", "C1--"), "EFA, scalar values": ("cumulene_efa_scalar_values_s0", "C2:"),
          "EFA, tensor values": ("cumulene_efa_s0", "C0o")}


def model_energies(checkpoint: Path, structures) -> np.ndarray:
    import torch

    from efa_deploy.graph import batch_graph
    from efa_deploy.model import energy_and_forces
    from efa_deploy.checkpoint import load_checkpoint, model_from_checkpoint

    model, config = model_from_checkpoint(load_checkpoint(checkpoint), "ema")
    graph = batch_graph(structures, config.atomic_numbers, config.cutoff, model.energy_shift.dtype)
    energy, _, _ = energy_and_forces(model, *graph.inputs())
    return energy.detach().double().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "twist_profile.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from ase import Atoms
    from tblite.ase import TBLite

    torch.set_num_threads(1)
    twists = np.linspace(0.0, 180.0, 19)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, n in zip(axes, (9, 11, 13)):
        structures = []
        for t in twists:
            numbers, positions = cumulene(n, 0.0, np.radians(t))
            structures.append(Atoms(numbers=numbers, positions=positions))
        xtb = []
        for atoms in structures:
            atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
            xtb.append(atoms.get_potential_energy())
            atoms.calc = None
        ax.plot(twists, np.array(xtb) - xtb[0], "k-", lw=2, label="GFN2-xTB")
        for label, (run, style) in MODELS.items():
            checkpoint = HERE / "runs" / run / "best.ckpt"
            if not checkpoint.exists():
                continue
            e = model_energies(checkpoint, structures)
            ax.plot(twists, e - e[0], style, ms=4, label=label)
        ax.set_title(f"C{n}H4: ends {(n - 1) * 1.28:.1f} A apart")
        ax.set_xlabel("relative twist of the CH2 ends (degrees)")
        ax.set_xticks([0, 45, 90, 135, 180])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("energy - energy at 0 degrees (eV)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
