"""Hyperparameters of the energy model, serialisable to checkpoints and model files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .lebedev import safe_b_max


@dataclass
class ModelConfig:
    atomic_numbers: list[int]  # elements the model knows, in model order
    features: int = 64
    num_layers: int = 2
    cutoff: float = 5.0  # local message-passing cutoff, Angstrom
    num_radial: int = 16
    use_efa: bool = True  # EFA on every layer; False gives the local baseline
    grid_points: int = 50
    r_max: float = 15.0  # largest extent EFA resolves, Angstrom
    b_max: float | None = None  # None: the grid's safe value (SAFE_B_MAX)
    num_frequencies: int = 8  # K scalar query/key channel pairs (D = 2K)
    num_vector_frequencies: int = 0  # channel pairs of l = 1 queries/keys
    value_dim: int = 16  # Dv
    qk_activation: str = "identity"  # "identity" or "silu"
    # equivariant EFA values, contracted at the receiving atom with its own vector features:
    # l = 1 vector channels and symmetric rank-2 tensor channels (0: scalar values only)
    value_vectors: int = 0
    value_tensors: int = 0
    # training only: batches whose structures have at most this many atoms evaluate EFA in its
    # exact pairwise form (the same kernel within r_max, checked; O(n^2) per structure but much
    # cheaper than the grid for molecules); 0: always the grid. Evaluation, export and MD use the grid.
    train_pairwise_max_atoms: int = 0
    # global inputs per structure (forward input `charge_spin`): the total charge in e and the
    # spin multiplicity 2S+1, embedded into every atom's initial features
    charge_input: bool = False
    spin_input: bool = False
    # the periodic form of EFA (model/reciprocal.py): reciprocal-lattice vectors |k| < k_max
    # (1/A) of each structure's cell replace the Lebedev grid; the model takes an input `cell`
    # and evaluates periodic structures only (finite ones: a large vacuum-padded cell)
    periodic_efa: bool = False
    k_max: float = 1.5
    # the k = 0 term of the periodic form: each channel's cell mean sum_j k_j v_j g_m(0) / V, a
    # mean field that outweighs the k != 0 terms 10-1000x; off (Ewald's tin-foil convention)
    # since it stalled learning on the ionic benchmark (docs/design.md)
    k_zero: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.atomic_numbers:
            raise ValueError("ModelConfig.atomic_numbers is empty: a model needs at least one element")
        if len(set(self.atomic_numbers)) != len(self.atomic_numbers):
            raise ValueError(f"ModelConfig.atomic_numbers has duplicates: {self.atomic_numbers}")
        if self.qk_activation not in ("identity", "silu"):
            raise ValueError(f"qk_activation must be 'identity' or 'silu', not {self.qk_activation!r}")
        for name in ("value_vectors", "value_tensors", "num_vector_frequencies", "train_pairwise_max_atoms"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if self.periodic_efa and not self.use_efa:
            raise ValueError("periodic_efa: true needs use_efa: true (a local model is periodic as it is)")
        if not (self.k_max > 0):
            raise ValueError(f"k_max must be > 0 (1/A), not {self.k_max}")
        if self.b_max is None and self.use_efa:
            self.b_max = safe_b_max(self.grid_points)

    @property
    def global_inputs(self) -> list[str]:
        """The global inputs the model takes: a subset of ["charge", "spin"], in that order."""
        return [name for name, on in (("charge", self.charge_input), ("spin", self.spin_input)) if on]

    @property
    def periodic(self) -> bool:
        """Whether the model evaluates periodic cells: local models, and EFA in its periodic form."""
        return not self.use_efa or self.periodic_efa

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model settings: {sorted(unknown)}")
        return cls(**data)
