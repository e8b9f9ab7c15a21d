"""Loads the collective operators (torch.ops.efa.*) that every EFA model calls.

Outside LAMMPS they are identities; inside, the pair style turns them into MPI and ghost
communication (see lammps_plugin/efa_ops.h).
"""

import torch

from .paths import OPS_LIBRARY

_loaded = False


def load_ops() -> None:
    global _loaded
    if _loaded:
        return
    if not OPS_LIBRARY.exists():
        raise RuntimeError(
            f"{OPS_LIBRARY} is missing: build it with `make build` "
            "(or `python lammps_plugin/build.py`), or reinstall with `pip install --no-build-isolation .`"
        )
    torch.ops.load_library(str(OPS_LIBRARY))
    _loaded = True


load_ops()
