"""What the SN2 models read: the energy along the scan, and along the same ion positions with the
molecule frozen in its geometry at the far end of the scan (rc = -10 A for F- + CH3I, +10 A for
CH3F + I-). On the scan the molecule relaxes by about 0.001 A as the ion approaches, so a local
model can read the reaction coordinate off its own geometry; with the molecule frozen it can not,
and only a model that sees the ion can follow the ion-dipole energy.

    python examples/nonlocal/sn2_profile.py      # after run.py sn2 (uses runs/sn2_*_s0/best.ckpt)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from twist_profile import model_energies  # noqa: E402

MODELS = {"local model": ("sn2_local_s0", "C1"), "EFA": ("sn2_efa_s0", "C0")}
ION = {"F": 4, "I": 5}  # atom index in the scan's structures


def frozen_frames(positions: np.ndarray, x: np.ndarray, side: str) -> np.ndarray:
    """The scan's positions of the free ion, with every other atom where it is at the end of the
    scan on that side."""
    end = 0 if side == "F" else len(x) - 1
    frames = np.repeat(positions[end : end + 1], len(x), axis=0)
    frames[:, ION[side]] = positions[:, ION[side]]
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "results" / "sn2_profile.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from ase import Atoms

    torch.set_num_threads(1)
    with np.load(HERE / "data" / "sn2_F_I.npz") as npz:
        x, positions, numbers, energy = npz["reaction_coordinate"], npz["positions"], npz["atomic_numbers"][0], npz["energy"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, side, pick in zip(axes, ("F", "I"), (x <= -3.0, x >= 3.0)):
        ax.plot(x[pick], energy[pick] - energy[pick].mean(), "k-", lw=2, label="reference (scan)")
        frozen = frozen_frames(positions, x, side)
        for label, (run, color) in MODELS.items():
            checkpoint = HERE / "runs" / run / "best.ckpt"
            if not checkpoint.exists():
                continue
            for frames, style, what in ((positions, "-", "scan"), (frozen, "--", "molecule frozen")):
                e = model_energies(checkpoint, [Atoms(numbers=numbers, positions=p) for p in frames[pick]])
                ax.plot(x[pick], e - e.mean(), style, color=color, label=f"{label}, {what}")
        ax.set_xlabel("reaction coordinate (A)")
        ax.set_title(f"{side}- far from the molecule")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("energy - its mean over the range (eV)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    args.output.parent.mkdir(exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
