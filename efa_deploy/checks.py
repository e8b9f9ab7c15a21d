"""Structure-versus-model checks shared by every Python entry point (the ASE calculator, the
LAMMPS driver and efa-md); pair_style efa makes the same checks in C++ on what LAMMPS holds."""

from __future__ import annotations

import math

import numpy as np


def takes_cell(metadata: dict) -> bool:
    """Whether the model has the periodic form of EFA (its forward takes the input `cell`)."""
    return "cell" in metadata.get("inputs", [])


def check_structure(atoms, metadata: dict, source: str = "structure") -> None:
    """Clear errors for what the model cannot evaluate: no atoms, unknown elements, a periodic
    cell with a non-periodic (EFA) model, a periodic-EFA model without a full, sound periodic
    cell, non-finite positions."""
    from .graph import species_index

    if len(atoms) == 0:
        raise ValueError(f"{source} has no atoms")
    try:
        species_index(atoms.numbers, metadata["atomic_numbers"])
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    if np.any(atoms.pbc) and not metadata["periodic"]:
        raise ValueError(
            f"{source} is periodic (pbc={np.asarray(atoms.pbc).tolist()}) but this model's global EFA term is not: "
            "use a finite structure (pbc=False), or a model with periodic EFA (periodic_efa: true) or a local model "
            "(use_efa: false) for periodic systems"
        )
    if takes_cell(metadata):
        from .graph import check_periodic_cell

        check_periodic_cell(atoms.cell.array, atoms.pbc, float(metadata["cutoff"]), source)
    if not np.all(np.isfinite(atoms.positions)):
        raise ValueError(f"{source} has NaN or infinite positions")


# what a structure without a given total charge or spin multiplicity has (ASE/fairchem convention)
NEUTRAL = {"charge": 0.0, "spin": 1.0}
TRAINED_ON = {"charge": "total charge", "spin": "spin multiplicity"}
GIVE = {"charge": "the system's total charge in e", "spin": "the system's spin multiplicity 2S+1"}
CONFIG_FLAG = {"charge": "charge_input", "spin": "spin_input"}


def check_global_value(name: str, value) -> float:
    """A total charge (finite, in e) or a spin multiplicity (a whole number >= 1) as a float."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if name == "charge" and not math.isfinite(number):
        raise ValueError(f"charge must be a finite number of e, not {value!r}")
    if name == "spin" and not (math.isfinite(number) and number >= 1 and number == round(number)):
        raise ValueError(f"spin is the multiplicity 2S+1, a whole number >= 1, not {value!r}")
    return number


def charge_spin_input(global_inputs, charge, spin, how: dict[str, str]) -> tuple[float, float]:
    """The (total charge, spin multiplicity) to give a model whose metadata `global_inputs`
    lists the inputs it was trained on. A model trained on an input needs it given (None: not
    given); a model trained without it refuses any value but the neutral one (charge 0,
    multiplicity 1). how[name] says how the caller's user gives it (in the error)."""
    values = {"charge": charge, "spin": spin}
    out = []
    for name in ("charge", "spin"):
        value = None if values[name] is None else check_global_value(name, values[name])
        if name in global_inputs and value is None:
            raise ValueError(f"the model was trained on {TRAINED_ON[name]}: give {GIVE[name]} ({how[name]})")
        if name not in global_inputs and value is not None and value != NEUTRAL[name]:
            raise ValueError(f"the model was trained without {TRAINED_ON[name]} (neutral, fixed-{name} data) and "
                             f"cannot use a {name}: got {name} {values[name]}; give {name} {NEUTRAL[name]:g} or "
                             f"none, or use a model trained with {CONFIG_FLAG[name]}: true")
        out.append(NEUTRAL[name] if value is None else value)
    return out[0], out[1]
