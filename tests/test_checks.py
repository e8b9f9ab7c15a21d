"""efa_deploy/checks.py: the structure-versus-model check every Python entry point shares."""

import numpy as np
import pytest
from ase import Atoms

from efa_deploy.checks import check_structure

EFA_MODEL = {"atomic_numbers": [1, 8], "elements": ["H", "O"], "periodic": False}
LOCAL_MODEL = {**EFA_MODEL, "periodic": True}


def water() -> Atoms:
    return Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])


def test_a_structure_the_model_can_evaluate_passes():
    check_structure(water(), EFA_MODEL)
    periodic = water()
    periodic.cell, periodic.pbc = [10.0, 10.0, 10.0], True
    check_structure(periodic, LOCAL_MODEL)


@pytest.mark.parametrize("case, message", [
    ("empty", "water.xyz has no atoms"),
    ("nitrogen", r"water.xyz: element\(s\) N not known to this model \(it knows H, O\)"),
    ("periodic", r"water.xyz is periodic \(pbc=\[True, True, True\]\) but this model's global EFA term is not"),
    ("nan", "water.xyz has NaN or infinite positions"),
    ("inf", "water.xyz has NaN or infinite positions"),
])
def test_each_problem_is_one_line_naming_the_source(case, message):
    atoms = water()
    if case == "empty":
        atoms = atoms[:0]
    elif case == "nitrogen":
        atoms.numbers[0] = 7
    elif case == "periodic":
        atoms.cell, atoms.pbc = [10.0, 10.0, 10.0], True
    else:
        atoms.positions[1, 0] = np.nan if case == "nan" else np.inf
    with pytest.raises(ValueError, match=message):
        check_structure(atoms, EFA_MODEL, "water.xyz")
