from .config import ModelConfig
from .efa import EuclideanFastAttention
from .energy import (ChargedEnergyModel, EnergyModel, PeriodicChargedEnergyModel, PeriodicEnergyModel, build_model,
                     energy_and_forces, energy_forces_stress, use_fused)
from .lebedev import SAFE_B_MAX, lebedev_grid

__all__ = [
    "ChargedEnergyModel",
    "EnergyModel",
    "PeriodicChargedEnergyModel",
    "PeriodicEnergyModel",
    "EuclideanFastAttention",
    "ModelConfig",
    "SAFE_B_MAX",
    "build_model",
    "energy_and_forces",
    "energy_forces_stress",
    "lebedev_grid",
    "use_fused",
]
