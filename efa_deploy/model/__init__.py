from .config import ModelConfig
from .efa import EuclideanFastAttention
from .energy import ChargedEnergyModel, EnergyModel, build_model, energy_and_forces
from .lebedev import SAFE_B_MAX, lebedev_grid
from .local import use_fused

__all__ = [
    "ChargedEnergyModel",
    "EnergyModel",
    "EuclideanFastAttention",
    "ModelConfig",
    "SAFE_B_MAX",
    "build_model",
    "energy_and_forces",
    "lebedev_grid",
    "use_fused",
]
