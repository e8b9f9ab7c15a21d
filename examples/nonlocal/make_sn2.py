"""The SN2 set of the EFA paper (F- + CH3I -> CH3F + I-, 401 frames along the reaction coordinate
from -10 to 10 A) as data/sn2_F_I.npz, with a `segment` array for a split that keeps neighbouring
frames together: frames 0.05 A apart are near copies, so a random split would test on near copies
of training frames.

    python examples/nonlocal/make_sn2.py PATH/TO/sn2_F_I.npz   # the file the EFA authors distribute

The source holds energies only: its forces are all zero, so sn2.yaml fits energies
(forces_weight 0) and run.py scores forces along the path against the slope of the reference
energy profile instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FRAMES_PER_SEGMENT = 10  # 0.5 A of reaction coordinate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("-o", "--output", type=Path, default=HERE / "data" / "sn2_F_I.npz")
    args = p.parse_args()
    with np.load(args.source) as src:
        data = {k: src[k] for k in ("positions", "atomic_numbers", "energy", "forces", "reaction_coordinate")}
    order = np.argsort(data["reaction_coordinate"])
    data = {k: v[order] for k, v in data.items()}
    if np.any(data["forces"] != 0):
        raise SystemExit(f"{args.source} has non-zero forces: this script assumes the energy-only scan")
    data["segment"] = np.arange(len(order)) // FRAMES_PER_SEGMENT
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, **data)
    print(f"{args.output}: {len(order)} frames in {data['segment'].max() + 1} segments")


if __name__ == "__main__":
    main()
