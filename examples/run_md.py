"""The Python driver on one rank: energy and forces, a minimisation, NVT, then NVE, with the
shipped default model on the shipped 16-water cluster.

    python examples/run_md.py                 # about 30 s on one core
    python examples/run_md.py --steps 4000

Writes runs/examples/water16_nvt.extxyz (positions, velocities, energies and forces every 50
steps) and prints the thermo record.
"""

import argparse
from pathlib import Path

import numpy as np

from efa_deploy import EFACalculator
from efa_deploy.lammps import EFASimulation

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "export" / "water_efa.pt"
STRUCTURE = REPO / "export" / "water16.xyz"
OUT = REPO / "runs" / "examples"
OUT.mkdir(parents=True, exist_ok=True)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=1000, help="NVT steps, and as many NVE steps (default 1000)")
args = parser.parse_args()

with EFASimulation(STRUCTURE, MODEL) as sim:  # a file path, an ase.Atoms or a LAMMPS data file
    print(f"{sim.n_atoms} atoms, elements {sim.metadata['elements']}, r_max {sim.metadata['efa']['r_max']} A")
    print(f"energy {sim.energy():.6f} eV, largest force {np.abs(sim.forces()).max():.4f} eV/A")

    relaxed = sim.minimize(ftol=0.01)
    print(f"minimised to {relaxed['final_energy']:.6f} eV in {relaxed['iterations']} iterations")

    def show(row):  # called every thermo_every steps
        print(f"  step {row['step']:6d}  T {row['temp']:6.1f} K  Epot {row['pe']:.4f} eV  Etot {row['etotal']:.4f} eV")

    nvt = sim.run(args.steps, ensemble="nvt", temperature=300.0, timestep_fs=0.5, thermostat="langevin",
                  thermo_every=max(1, args.steps // 5), trajectory=OUT / "water16_nvt.extxyz", trajectory_every=50,
                  callback=show)
    print(f"NVT: mean temperature {nvt['temp'][len(nvt['temp']) // 2:].mean():.0f} K")

    nve = sim.run(args.steps, ensemble="nve", timestep_fs=0.5, thermo_every=10)
    drift = np.polyfit(nve["time"], nve["etotal"], 1)[0] / sim.n_atoms
    print(f"NVE: total energy drift {drift:.1e} eV/atom/ps, "
          f"fluctuation {np.std(nve['etotal']) / sim.n_atoms:.1e} eV/atom, {nve['wall'][-1]:.1f} s")

    atoms = sim.atoms()  # ase.Atoms with the current positions and velocities, in input order
    atoms.calc = EFACalculator(MODEL)  # the same model in Python: the same energy
    print(f"LAMMPS {sim.energy():.10f} eV, ASE calculator {atoms.get_potential_energy():.10f} eV")
print(f"wrote {OUT / 'water16_nvt.extxyz'}")
