"""Write a water droplet of about N atoms as a LAMMPS data file: copies of export/water16.xyz
on a simple cubic lattice 11 A apart, the sites nearest the centre.

    python make_droplet.py 10000            # writes droplet.data (9,984 atoms)
"""

import argparse
from pathlib import Path

from ase.io import read, write

from efa_deploy.graph import system_extent
from efa_deploy.structures import tile_cluster

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("atoms", type=int, help="about this many atoms (whole 48-atom clusters)")
    p.add_argument("-o", "--output", default="droplet.data")
    p.add_argument("--spacing", type=float, default=11.0, help="A between cluster centres (default 11)")
    args = p.parse_args()
    cluster = read(REPO / "export" / "water16.xyz")
    droplet = tile_cluster(cluster, max(1, round(args.atoms / len(cluster))), args.spacing)
    droplet.positions += 20.0 - droplet.positions.min(axis=0)
    droplet.cell = droplet.positions.max(axis=0) + 20.0
    write(args.output, droplet, format="lammps-data", specorder=["H", "O"], masses=True, units="metal")
    print(f"wrote {args.output}: {len(droplet)} atoms, extent {system_extent(droplet.positions):.1f} A")


if __name__ == "__main__":
    main()
