"""Structure-versus-model checks shared by every Python entry point (the ASE calculator, the
LAMMPS driver and efa-md); pair_style efa makes the same checks in C++ on what LAMMPS holds."""

from __future__ import annotations

import numpy as np


def check_structure(atoms, metadata: dict, source: str = "structure") -> None:
    """Clear errors for what the model cannot evaluate: no atoms, unknown elements, a periodic
    cell with a non-periodic (EFA) model, non-finite positions."""
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
            "use a finite structure (pbc=False), or a local model (trained with use_efa: false) for periodic systems"
        )
    if not np.all(np.isfinite(atoms.positions)):
        raise ValueError(f"{source} has NaN or infinite positions")
