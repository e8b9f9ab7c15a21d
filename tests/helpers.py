"""Builders the tests share: models with every block active, structures, small labelled data
sets and training configs, and LAMMPS decks run under mpiexec with what they computed read back.
(pytest's own set-up, one thread per process, is in conftest.py.)"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.lj import LennardJones
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from efa_deploy.model import ModelConfig, build_model, energy_and_forces, use_fused

REPO = Path(__file__).resolve().parent.parent


# ---- models and structures

def randomised_model(config: ModelConfig, seed: int = 0, dtype=torch.float64, std: float = 0.3):
    """A model with its zero-initialised residual outputs randomised, so the local and global
    updates are not identities and every test can fail."""
    torch.manual_seed(seed)
    model = build_model(config, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp.2" in name:
                p.normal_(0.0, std)
        model.energy_shift.copy_(torch.linspace(-1.0, 1.0, len(config.atomic_numbers)))
    return model


def jittered_cluster(n: int, spacing: float = 1.6, seed: int = 0, numbers=(1, 6, 8), offset: float = 5.0) -> Atoms:
    """n atoms on a jittered cubic lattice (no close contacts), elements drawn from `numbers`."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * spacing
    positions = grid + rng.uniform(-0.25, 0.25, (n, 3)) + offset
    return Atoms(numbers=rng.choice(numbers, n), positions=positions)


# ---- labelled data and training configs (references from ASE's Lennard-Jones)

TINY_MODEL = {
    "features": 8, "num_layers": 2, "cutoff": 3.0, "num_radial": 4, "use_efa": True,
    "grid_points": 50, "r_max": 8.0, "num_frequencies": 2, "value_dim": 4,
}


def lj_structures(count: int, seed: int = 0, elements=(6, 8), n_atoms=(3, 6)) -> list[Atoms]:
    """Random clusters (atoms at least 1.2 A apart, within a 4 A box) labelled by Lennard-Jones."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        n = int(rng.integers(n_atoms[0], n_atoms[1] + 1))
        pos = rng.uniform(0.0, 4.0, size=(n, 3))
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + 10 * np.eye(n)
        if d.min() < 1.2:
            continue
        atoms = Atoms(numbers=rng.choice(elements, size=n), positions=pos)
        atoms.calc = LennardJones(sigma=1.1, epsilon=1.0, rc=4.0, smooth=True)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy + 0.3 * n, forces=forces)
        out.append(atoms)
    return out


def write_npz(path, structures, pad_to: int | None = None, **overrides) -> None:
    """The npz layout efa_deploy.training.data reads, padding every structure to pad_to atoms."""
    n = pad_to or max(len(a) for a in structures)
    s = len(structures)
    arrays = {
        "positions": np.full((s, n, 3), 99.0), "atomic_numbers": np.zeros((s, n)),
        "energy": np.zeros(s), "forces": np.full((s, n, 3), 7.0), "node_mask": np.zeros((s, n), dtype=bool),
    }
    for k, a in enumerate(structures):
        m = len(a)
        arrays["positions"][k, :m] = a.positions
        arrays["atomic_numbers"][k, :m] = a.numbers
        arrays["energy"][k] = a.get_potential_energy()
        arrays["forces"][k, :m] = a.get_forces()
        arrays["node_mask"][k, :m] = True
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def tiny_config(data_path, output, **training) -> dict:
    """A complete efa-train config for a tiny model that trains in seconds."""
    settings = {"batch_size": 4, "epochs": 3, "checkpoint_every": 10, "progress": False, "plot_every": 0.0,
                "lr": 1e-2, "lr_final": 3e-3, "ema_decay": 0.9}
    settings.update(training)
    return {
        "data": {"path": str(data_path), "n_train": 24, "n_val": 8, "n_test": 8, "split_seed": 1},
        "model": copy.deepcopy(TINY_MODEL),
        "training": settings,
        "output": str(output),
    }


# ---- LAMMPS (the lmp and mpiexec of this environment)

BIN = Path(sys.executable).parent
LMP = BIN / "lmp"
MPIEXEC = BIN / "mpiexec"
NKTV2P_METAL = 1.6021765e6  # LAMMPS metal units: pressure * volume / nktv2p = energy


def write_data(atoms, path: Path, elements: list[str]) -> Path:
    """A LAMMPS data file; a structure without a cell gets a box 5 A beyond its atoms."""
    if atoms.cell.rank == 0:
        atoms = atoms.copy()
        atoms.cell = np.diag(atoms.positions.max(axis=0) + 5.0)
    write(path, atoms, format="lammps-data", specorder=elements, masses=True, units="metal")
    return path


def run_lammps(deck: str, workdir: Path, nprocs: int = 1, timeout: float = 600, env: dict | None = None) -> str:
    """Run `deck` with `mpiexec -n nprocs lmp` (extra environment variables in env); return the
    screen output, raise with it on failure."""
    (workdir / "in.deck").write_text(deck)
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [str(MPIEXEC), "-n", str(nprocs), str(LMP), "-in", "in.deck", "-log", "log.lammps"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


# a finite structure from data.lmp with pair_style efa: the start of a deck
FINITE_SETUP = """\
units           metal
boundary        s s s
atom_style      atomic
atom_modify     map array
read_data       data.lmp
pair_style      efa {pair_args}
pair_coeff      * * {model} {elements}
"""

STATIC_DECK = """\
units           metal
boundary        {boundary}
atom_style      atomic
atom_modify     map array
{processors}
read_data       data.lmp
pair_style      efa {pair_args}
pair_coeff      * * {model} {elements}
compute         pe_atom all pe/atom
compute         virial all pressure NULL virial
thermo_style    custom step pe
dump            forces all custom 1 forces.dump id fx fy fz c_pe_atom
dump_modify     forces sort id format float %.17g
run             0
print           "$(pe:%.17g) $(vol:%.17g) $(c_virial[1]:%.17g) $(c_virial[2]:%.17g) $(c_virial[3]:%.17g) $(c_virial[4]:%.17g) $(c_virial[5]:%.17g) $(c_virial[6]:%.17g)" file results.txt
"""


@dataclass
class StaticResult:
    energy: float
    forces: np.ndarray  # (N, 3), by atom id
    atomic_energies: np.ndarray  # (N,)
    virial: np.ndarray  # (6,) xx yy zz xy xz yz, eV


def static_run(workdir: Path, model: Path, elements: list[str], nprocs: int = 1, boundary: str = "f f f",
               processors: str = "", pair_args: str = "", env: dict | None = None) -> StaticResult:
    deck = STATIC_DECK.format(boundary=boundary, processors=processors, pair_args=pair_args, model=model,
                              elements=" ".join(elements))
    run_lammps(deck, workdir, nprocs, env=env)
    values = np.array((workdir / "results.txt").read_text().split(), dtype=float)
    dump = np.loadtxt(workdir / "forces.dump", skiprows=9)
    return StaticResult(energy=values[0], forces=dump[:, 1:4], atomic_energies=dump[:, 4],
                        virial=values[2:] * values[1] / NKTV2P_METAL)


# ---- fused operators against the reference path (test_fused.py, test_fused_efa.py)

RTOL = 1e-12
CONFIG = ModelConfig(atomic_numbers=[1, 8], features=16, num_layers=2, cutoff=4.0, r_max=30.0)
MESSAGE_OPS = {"efa::edge_message", "efa::edge_message_backward"}
# what files exported before efa::edge_message call (still registered, so that they load)
OLD_MESSAGE_OPS = {"efa::message", "efa::message_backward", "efa::radial_basis", "efa::radial_basis_backward"}
EFA_OPS = {"efa::attention_keys", "efa::attention_keys_backward", "efa::attention_queries",
           "efa::attention_queries_backward"}


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float = RTOL) -> None:
    """Equal to rtol relative to each tensor's largest entry."""
    for a, b in zip(actual, expected, strict=True):
        assert a.shape == b.shape
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=0, atol=rtol * max(scale, 1e-300))


def water_cluster():
    water = read(REPO / "export" / "water16.xyz")
    water.center()
    return water


def model_outputs(model, graph, fused_ops: set[str]):
    """Energies, forces and per-atom energies; checks that exactly the fused operators `fused_ops` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        energy, forces, atomic = energy_and_forces(model, *graph.inputs())
    ran = {event.name for event in profile.events()} & (MESSAGE_OPS | OLD_MESSAGE_OPS | EFA_OPS)
    assert ran == fused_ops, (ran, fused_ops)
    return [energy.detach(), forces.detach(), atomic.detach()]


def fused_and_reference(graph, config=CONFIG, script=False, model=None):
    model = (randomised_model(config) if model is None else model).eval()  # inference, as exported files
    wrap = torch.jit.script if script else (lambda m: m)
    reference = model_outputs(wrap(use_fused(model, False)), graph, set())
    fused = model_outputs(wrap(use_fused(model, True)), graph, MESSAGE_OPS | (EFA_OPS if config.use_efa else set()))
    assert reference[0].abs().max() > 0.01 or graph.positions.shape[0] == 0  # a model that does something
    return fused, reference
