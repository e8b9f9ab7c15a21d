"""efa-md: molecular dynamics with an exported EFA model in LAMMPS (pair_style efa).

    efa-md STRUCTURE --model model.pt --ensemble nvt --temperature 300 --timestep 0.5 \\
           --steps 10000 --output traj.extxyz
    mpiexec -n 2 efa-md ...          # LAMMPS splits the domain over the ranks

STRUCTURE is any file ase.io reads (extxyz, xyz, ...; the last frame) or a LAMMPS data file
(*.data, *.lmp, data.*). Writes the trajectory (--output; .extxyz, or a LAMMPS dump for any
other suffix), OUTPUT-stem.thermo.csv, OUTPUT-stem.png (energy and temperature) and
OUTPUT-stem.summary.json, prints live progress (steps/s, ETA, temperature, energy) and a final
summary (ns/day, energy drift).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

PROG = "efa-md"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str):
        if _rank() == 0:
            sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.exit(2)


def _rank() -> int:
    if "mpi4py.MPI" in sys.modules:
        return sys.modules["mpi4py.MPI"].COMM_WORLD.Get_rank()
    for key in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("structure", help="structure file (extxyz, xyz, ..., or a LAMMPS data file)")
    p.add_argument("-m", "--model", required=True, help="model file written by efa-export")
    p.add_argument("-e", "--ensemble", default="nvt", help="nve, nvt or npt (default nvt)")
    p.add_argument("--thermostat", default="langevin", help="for nvt: langevin (default) or nose-hoover")
    p.add_argument("-T", "--temperature", type=float, default=300.0,
                   help="K: thermostat target, and the initial velocities (default 300)")
    p.add_argument("--pressure", type=float, default=1.0, help="bar, for npt (default 1)")
    p.add_argument("--damping", type=float, default=100.0, help="thermostat damping time in fs (default 100)")
    p.add_argument("-t", "--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("-n", "--steps", type=int, default=10000, help="number of MD steps (default 10000)")
    p.add_argument("-o", "--output", default="md.extxyz",
                   help="trajectory file: .extxyz/.xyz, else a LAMMPS dump (default md.extxyz)")
    p.add_argument("--output-every", type=int, default=100, help="steps between trajectory frames (default 100)")
    p.add_argument("--thermo-every", type=int, default=0,
                   help="steps between thermo records (default: about 200 records per run)")
    p.add_argument("--minimize", action="store_true", help="relax the structure before the MD")
    p.add_argument("--fmax", type=float, default=0.01, help="eV/A: force tolerance of --minimize (default 0.01)")
    p.add_argument("--seed", type=int, default=4928459, help="seed of the velocities and the Langevin noise")
    p.add_argument("--elements", nargs="+", metavar="EL", help="element of each atom type (LAMMPS data files)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--grid", default="auto",
                   help="Lebedev grid: auto (default: follows the structure's extent, EFA stays exact) or a number of points")
    p.add_argument("--extent", default=None,
                   help="structure beyond the grid's exact range: warn, error or off (default: error with --grid auto, "
                        "else warn)")
    p.add_argument("--kspace", default="auto", choices=["direct", "mesh", "auto"],
                   help="periodic EFA: direct sum over k, particle mesh (O(N log N)) or auto (default)")
    p.add_argument("--charge", type=float, default=None,
                   help="total charge in e, for models trained on it (default: the structure's info 'charge')")
    p.add_argument("--spin", type=float, default=None,
                   help="spin multiplicity 2S+1, for models trained on it (default: the structure's info 'spin')")
    p.add_argument("--plot", help="energy/temperature plot (default: OUTPUT-stem.png)")
    p.add_argument("--log", help="LAMMPS log file (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no live progress")
    return p


CHOICES = {"device": ("cpu", "cuda"), "extent": (None, "warn", "error", "off")}


def check_arguments(args) -> tuple[dict, object]:
    """Every check that needs no LAMMPS; returns the model metadata and the structure.
    Raises ValueError / FileNotFoundError with one line each."""
    from ..checks import check_structure
    from ..lammps import check_run_options, load_structure, model_metadata, require_positive, structure_charge_spin

    for name, allowed in CHOICES.items():
        value = getattr(args, name)
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(a for a in allowed if a)}")
    if args.grid != "auto":
        if not args.grid.isdigit():
            raise ValueError(f"--grid must be auto or a number of Lebedev points, not {args.grid!r}")
        args.grid = int(args.grid)
    if args.output_every <= 0 or args.thermo_every < 0:
        raise ValueError("--output-every must be > 0 and --thermo-every >= 0")
    if args.minimize:
        require_positive("--fmax", args.fmax, "eV/A")
    model = Path(args.model)
    if not model.is_file():
        raise FileNotFoundError(f"model file {model} does not exist")
    structure = Path(args.structure)
    if not structure.is_file():
        raise FileNotFoundError(f"structure file {structure} does not exist")
    metadata = model_metadata(model)
    rules = metadata["efa"].get("grid_rules", [])
    if args.grid != "auto" and args.grid not in rules:
        raise ValueError(f"--grid {args.grid}: the model carries no such Lebedev rule; it carries "
                         f"{' '.join(map(str, rules)) or 'none (no EFA)'} (or use --grid auto)")
    atoms = load_structure(structure, metadata, args.elements)
    check_structure(atoms, metadata, str(structure))
    structure_charge_spin(atoms, metadata, args.charge, args.spin, {"charge": "--charge Q", "spin": "--spin M"})
    check_run_options(args.steps, args.ensemble, args.temperature, args.timestep, args.thermostat, args.damping,
                      args.pressure, args.seed, metadata["periodic"], bool(np.all(atoms.pbc)), flag="--")
    out_dir = Path(args.output).resolve().parent
    if not out_dir.is_dir():
        raise FileNotFoundError(f"output folder {out_dir} does not exist")
    return metadata, atoms


# ---- progress and summary -------------------------------------------------------------------


class Progress:
    """Live progress on rank 0: a tqdm bar on a terminal, else a line every ~10%."""

    def __init__(self, total: int, n_atoms: int, timestep_fs: float, enabled: bool):
        self.total, self.n_atoms, self.timestep_fs = total, n_atoms, timestep_fs
        self.enabled = enabled
        self.tty = enabled and sys.stdout.isatty()
        self.bar = None
        self.start = time.perf_counter()
        self.first_step = None
        self.next_line = 0
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.5, file=sys.stdout)

    def __call__(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step = row["step"]
            self.start = time.perf_counter()
        done = row["step"] - self.first_step
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(f"T {row['temp']:.0f} K  E {row['etotal']:.4f} eV  Epot {row['pe']:.4f} eV",
                                     refresh=False)
            return
        if done < self.next_line and done < self.total:
            return
        self.next_line = done + max(1, self.total // 10)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        print(f"step {row['step']:>8d}  {100 * done / max(self.total, 1):5.1f}%  T {row['temp']:7.1f} K  "
              f"Etot {row['etotal']:14.6f} eV  Epot {row['pe']:14.6f} eV  "
              f"{rate:7.1f} steps/s  ETA {format_seconds(eta)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "--"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def summarise(thermo: dict, n_atoms: int, timestep_fs: float, steps: int, wall_s: float, ranks: int,
              ensemble: str, extra: dict) -> dict:
    """ns/day, steps/s, temperature statistics and the drift of the conserved energy
    (etotal for NVE; etotal plus the thermostat's tally otherwise), in eV/atom/ps from a
    least-squares line through it."""
    t = thermo["time"] - thermo["time"][0]
    econs = thermo["econserve"]
    # None (null in the JSON) when the run is too short to fit a slope
    drift = float(np.polyfit(t, econs, 1)[0] / n_atoms) if len(t) >= 2 and t[-1] > 0 else None
    half = len(thermo["temp"]) // 2
    return {
        "atoms": n_atoms, "ranks": ranks, "ensemble": ensemble, "steps": steps, "timestep_fs": timestep_fs,
        "simulated_ps": steps * timestep_fs * 1e-3, "wall_s": wall_s,
        "steps_per_s": steps / wall_s if wall_s > 0 else 0.0,
        "ns_per_day": steps * timestep_fs * 1e-6 / wall_s * 86400 if wall_s > 0 else 0.0,
        "temperature_mean_K": float(np.mean(thermo["temp"][half:])) if len(thermo["temp"]) else float("nan"),
        "temperature_std_K": float(np.std(thermo["temp"][half:])) if len(thermo["temp"]) else float("nan"),
        "potential_energy_first_eV": float(thermo["pe"][0]), "potential_energy_last_eV": float(thermo["pe"][-1]),
        "conserved_energy_drift_eV_per_atom_per_ps": drift,
        "conserved_energy_max_deviation_eV_per_atom": float(np.abs(econs - econs[0]).max() / n_atoms),
        **extra,
    }


def print_summary(s: dict) -> None:
    print(f"{PROG}: {s['steps']} steps of {s['ensemble'].upper()} ({s['simulated_ps']:.3f} ps) for {s['atoms']} atoms "
          f"on {s['ranks']} rank(s) in {s['wall_s']:.1f} s: {s['steps_per_s']:.1f} steps/s, {s['ns_per_day']:.3f} ns/day")
    print(f"{PROG}: temperature {s['temperature_mean_K']:.1f} +- {s['temperature_std_K']:.1f} K (second half); "
          f"potential energy {s['potential_energy_first_eV']:.4f} -> {s['potential_energy_last_eV']:.4f} eV")
    label = "total energy" if s["ensemble"] == "nve" else "conserved energy (total + thermostat)"
    drift = s["conserved_energy_drift_eV_per_atom_per_ps"]
    drift = f"{drift:.2e} eV/atom/ps" if drift is not None else "n/a (the run is too short to fit a slope)"
    print(f"{PROG}: {label} drift {drift}, largest deviation {s['conserved_energy_max_deviation_eV_per_atom']:.2e} eV/atom")


def write_thermo_csv(thermo: dict, path: Path) -> None:
    keys = list(thermo)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for row in zip(*(thermo[k] for k in keys)):
            w.writerow([int(v) if k == "step" else f"{v:.10g}" for k, v in zip(keys, row)])


# ---- main -----------------------------------------------------------------------------------


def run(args) -> int:
    from mpi4py import MPI

    from ..lammps import EFASimulation
    from ..plots import plot_thermo

    comm = MPI.COMM_WORLD
    rank, ranks = comm.Get_rank(), comm.Get_size()
    output = Path(args.output)
    stem = output.with_suffix("")
    plot = Path(args.plot) if args.plot else stem.with_suffix(".png")
    thermo_every = args.thermo_every or max(10, args.steps // 200)
    structure = args.structure
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    t0 = time.perf_counter()
    sim = EFASimulation(structure, args.model, elements=args.elements, device=args.device, extent=args.extent,
                        comm=comm, log=args.log, grid=args.grid, charge=args.charge, spin=args.spin,
                        kspace=args.kspace)
    meta = sim.metadata
    efa = meta["efa"]
    say(f"{PROG}: {sim.n_atoms} atoms from {structure}, model {args.model} "
        f"({' '.join(meta['elements'])}; cutoff {meta['cutoff']} A"
        + (f", EFA r_max {efa['r_max']} A" if efa.get("enabled") else ", local") + f"), {ranks} MPI rank(s)")
    extra: dict = {"structure": str(structure), "model": str(args.model)}
    if args.minimize:
        result = sim.minimize(ftol=args.fmax, max_iterations=2000)
        say(f"{PROG}: minimised {result['initial_energy']:.6f} -> {result['final_energy']:.6f} eV in "
            f"{result['iterations']} iterations (max force {result['max_force']:.4f} eV/A)")
        extra["minimization"] = result
    ensemble = args.ensemble
    label = ensemble.upper() + (f" ({args.thermostat})" if ensemble == "nvt" else "")
    say(f"{PROG}: {label}, {args.steps} steps of {args.timestep} fs"
        + (f" at {args.temperature} K" if ensemble != "nve" or args.temperature > 0 else "")
        + f", trajectory {output} every {args.output_every} steps")
    progress = Progress(args.steps, sim.n_atoms, args.timestep, enabled=rank == 0 and not args.no_progress)
    start = time.perf_counter()
    thermo = sim.run(
        args.steps, ensemble=ensemble, temperature=args.temperature if args.temperature > 0 else None,
        timestep_fs=args.timestep, thermostat=args.thermostat, damping_fs=args.damping, pressure_bar=args.pressure,
        seed=args.seed, thermo_every=thermo_every, trajectory=output, trajectory_every=args.output_every,
        callback=progress,
    )
    wall = time.perf_counter() - start
    progress.close()
    sim.close()
    if rank == 0:
        extra["setup_s"] = start - t0
        summary = summarise(thermo, sim.n_atoms, args.timestep, args.steps, wall, ranks, ensemble, extra)
        write_thermo_csv(thermo, stem.with_suffix(".thermo.csv"))
        plot_thermo(thermo, sim.n_atoms, plot, f"{Path(structure).name}, {label}, {args.timestep} fs, {ranks} rank(s)")
        stem.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
        print_summary(summary)
        print(f"{PROG}: wrote {output}, {stem.with_suffix('.thermo.csv')}, {plot}, {stem.with_suffix('.summary.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        check_arguments(args)
        return run(args)
    except (ValueError, OSError) as err:  # raised alike on every rank (EFASimulation shares rank 0's)
        if _rank() == 0:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if type(err) is Exception:  # LAMMPS's error->all (lost atoms, extent error, ...): on every rank
            if _rank() == 0:
                print(f"{PROG}: error: {first}", file=sys.stderr)
            return 1
        # an error on this rank alone (LAMMPS's MPIAbortException, or anything unforeseen): the
        # other ranks may wait for it in a collective, so end the whole job
        print(f"{PROG}: error on rank {_rank()}: {first}", file=sys.stderr, flush=True)
        abort_job(1)
        return 1


def abort_job(code: int) -> None:
    """MPI_Abort when other ranks exist; nothing on one rank."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.COMM_WORLD.Get_size() > 1:
        mpi.COMM_WORLD.Abort(code)


if __name__ == "__main__":
    sys.exit(main())
