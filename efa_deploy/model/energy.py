"""The EFA energy model: species embedding, layers of local message passing plus EFA,
per-atom energy readout with per-element shifts; forces by autograd."""

import math
from typing import List, Optional

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .efa import EuclideanFastAttention
from .grid import LebedevRules, carried_rules
from .local import Message, RadialBasis, Update, mlp


class GlobalUpdate(nn.Module):
    """MLP_global(x + Dense(EFA(x)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        f = config.features
        self.efa = EuclideanFastAttention(
            f,
            num_frequencies=config.num_frequencies,
            value_dim=config.value_dim,
            grid_points=config.grid_points,
            r_max=config.r_max,
            b_max=float(config.b_max),
            num_vector_frequencies=config.num_vector_frequencies,
            qk_activation=config.qk_activation,
            value_vectors=config.value_vectors,
            value_tensors=config.value_tensors,
            train_pairwise_max_atoms=config.train_pairwise_max_atoms,
        )
        self.dense = nn.Linear(self.efa.output_dim, f)
        self.mlp = mlp(f, f, f, zero_last=True)

    def forward(
        self, x: Tensor, vec: Tensor, positions: Tensor, batch: Tensor, n_structures: int, owned: Tensor
    ) -> Tensor:
        return self.mlp(x + self.dense(self.efa(x, vec, positions, batch, n_structures, owned)))

    def use_grid(self, points: Tensor, weights: Tensor) -> None:
        self.efa.grid_points = points
        self.efa.grid_weights = weights


class NoGlobalUpdate(nn.Module):
    """The local baseline: same signature, no global term."""

    def forward(
        self, x: Tensor, vec: Tensor, positions: Tensor, batch: Tensor, n_structures: int, owned: Tensor
    ) -> Tensor:
        return torch.zeros_like(x)

    def use_grid(self, points: Tensor, weights: Tensor) -> None:
        pass


class InteractionLayer(nn.Module):
    """x <- x + MLP_local(x + MP(x)) + MLP_global(x + Dense(EFA(x)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        f = config.features
        self.message = Message(f, config.num_radial)
        self.update = Update(f)
        self.local_mlp = mlp(f, f, f, zero_last=True)
        self.global_update = GlobalUpdate(config) if config.use_efa else NoGlobalUpdate()

    def forward(
        self, x: Tensor, vec: Tensor, positions: Tensor, batch: Tensor, n_structures: int, owned: Tensor,
        sender: Tensor, receiver: Tensor, rbf: Tensor, envelope: Tensor, unit: Tensor,
    ) -> tuple[Tensor, Tensor]:
        dx, dv = self.message(x, vec, sender, receiver, rbf, envelope, unit)
        x_local = x + dx
        vec = vec + dv
        du, dvu = self.update(x_local, vec)
        vec = vec + dvu
        x_global = self.global_update(x, vec, positions, batch, n_structures, owned)
        return x + self.local_mlp(x_local + du) + x_global, vec


class EnergyModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.features = config.features
        self.cutoff = float(config.cutoff)
        self.embedding = nn.Embedding(len(config.atomic_numbers), config.features)
        self.radial = RadialBasis(config.num_radial, config.cutoff)
        self.layers = nn.ModuleList([InteractionLayer(config) for _ in range(config.num_layers)])
        self.readout = mlp(config.features, config.features, 1)
        self.register_buffer("energy_shift", torch.zeros(len(config.atomic_numbers), dtype=torch.float64))
        blocks = [layer.global_update.efa for layer in self.layers if config.use_efa]
        omega_max = max((float(b.omega.max()) for b in blocks), default=0.0)
        self.grid = LebedevRules(carried_rules(config.grid_points) if blocks else [], omega_max, config.grid_points)

    # ---- the Lebedev grid (grid.py): chosen at run time, the same in Python and in LAMMPS ----

    @torch.jit.export
    def select_grid(self, extent: float) -> int:
        """Install the grid for a system of this extent (A; at most an atom pair's largest
        distance): the smallest carried rule exact there, changed with hysteresis. Returns its
        number of points (0 without EFA)."""
        n = self.grid.choose(extent)
        if n != self.grid.size:
            self.set_grid_size(n)
        return n

    @torch.jit.export
    def set_grid_size(self, n: int) -> int:
        """Install the carried n-point rule in every EFA block."""
        points, weights = self.grid.rule(n)
        for layer in self.layers:
            layer.global_update.use_grid(points, weights)
        self.grid.size = n
        return n

    @torch.jit.export
    def grid_size(self) -> int:
        return self.grid.size

    @torch.jit.export
    def grid_sizes(self) -> List[int]:
        return self.grid.sizes

    @torch.jit.export
    def exact_extent(self, n: int) -> float:
        """The largest extent (A) the carried n-point rule keeps exact (inf without EFA)."""
        return self.grid.exact_extent(n) if len(self.grid.sizes) > 0 else math.inf

    def forward(
        self, positions: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor,
        batch: Tensor, n_structures: int, owned: Tensor,
    ) -> Tensor:
        """Per-atom energies (N,), zero for atoms that are not owned (ghosts, padding).

        edge_index[0] sends to edge_index[1]; the edge vector is
        positions[sender] - positions[receiver] + edge_shift.
        """
        return self.atomic_energies(positions, species, edge_index, edge_shift, batch, n_structures, owned, None)

    def initial_features(self, species: Tensor, batch: Tensor, charge_spin: Optional[Tensor]) -> Tensor:
        return self.embedding(species)

    def edge_geometry(self, positions: Tensor, sender: Tensor, receiver: Tensor, edge_shift: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """Radial basis (E, R), envelope (E, 1) and unit vectors (E, 3) of the edges."""
        d = positions[sender] - positions[receiver] + edge_shift
        r = torch.sqrt(torch.sum(d * d, dim=1))
        unit = d / r.unsqueeze(1)
        rbf, envelope = self.radial(r)
        return rbf, envelope, unit

    def atomic_energies(
        self, positions: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor,
        batch: Tensor, n_structures: int, owned: Tensor, charge_spin: Optional[Tensor],
    ) -> Tensor:
        sender, receiver = edge_index[0], edge_index[1]
        rbf, envelope, unit = self.edge_geometry(positions, sender, receiver, edge_shift)
        n = positions.shape[0]
        x = self.initial_features(species, batch, charge_spin)
        vec = torch.zeros(n, 3, self.features, dtype=x.dtype, device=x.device)
        last = len(self.layers) - 1
        for t, layer in enumerate(self.layers):
            x, vec = layer(x, vec, positions, batch, n_structures, owned, sender, receiver, rbf, envelope, unit)
            if t < last:  # ghosts take their owners' features (identity outside LAMMPS)
                synced = torch.ops.efa.forward_ghosts(torch.cat([x, vec.reshape(n, 3 * self.features)], dim=1))
                x = synced[:, : self.features]
                vec = synced[:, self.features :].reshape(n, 3, self.features)
        energy = self.readout(x).squeeze(1) + self.energy_shift.to(x.dtype)[species]
        return energy * owned


class ChargedEnergyModel(EnergyModel):
    """EnergyModel with an eighth input, `charge_spin` (n_structures, 2): each structure's total
    charge (e) and spin multiplicity 2S+1. A learned linear embedding of (Q, M - 1) is added to
    the initial features of every atom of the structure, so the local layers and EFA both see
    it; the column of an input the config does not ask for is ignored."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.global_embedding = nn.Linear(2, config.features, bias=False)
        self.charge_weight = 1.0 if config.charge_input else 0.0
        self.spin_weight = 1.0 if config.spin_input else 0.0

    def forward(
        self, positions: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor,
        batch: Tensor, n_structures: int, owned: Tensor, charge_spin: Tensor,
    ) -> Tensor:
        """Per-atom energies (N,) as EnergyModel.forward, for the total charge and multiplicity
        of each structure in charge_spin (n_structures, 2)."""
        return self.atomic_energies(positions, species, edge_index, edge_shift, batch, n_structures, owned,
                                    charge_spin)

    def initial_features(self, species: Tensor, batch: Tensor, charge_spin: Optional[Tensor]) -> Tensor:
        x = self.embedding(species)
        if charge_spin is None:
            raise RuntimeError("this model takes charge_spin (n_structures, 2): total charge and spin multiplicity")
        values = torch.stack([charge_spin[:, 0] * self.charge_weight, (charge_spin[:, 1] - 1.0) * self.spin_weight], 1)
        return x + self.global_embedding(values.to(x.dtype))[batch]


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float64) -> EnergyModel:
    """The model a config describes: ChargedEnergyModel when it takes a total charge or spin."""
    return (ChargedEnergyModel if config.global_inputs else EnergyModel)(config).to(dtype)


def use_fused(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch the radial basis, every message layer and EFA block of `model` to the fused operators (inference:
    exported files, calculator, LAMMPS) or back to the reference (training with force losses);
    returns model."""
    for module in model.modules():
        if isinstance(module, (Message, RadialBasis, EuclideanFastAttention)):
            module.fused = enabled
    return model


def energy_and_forces(
    model: nn.Module, positions: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor,
    batch: Tensor, n_structures: int, owned: Tensor, charge_spin: Tensor | None = None, create_graph: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Energy per structure (B,), forces (N, 3) and per-atom energies (N,); charge_spin only
    for models that take it (Graph.inputs() holds it when the graph carries it)."""
    if not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
    inputs = (positions, species, edge_index, edge_shift, batch, n_structures, owned)
    atomic = model(*inputs) if charge_spin is None else model(*inputs, charge_spin)
    energy = torch.zeros(n_structures, dtype=atomic.dtype, device=atomic.device).index_add(0, batch, atomic)
    (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph)
    return energy, -grad, atomic
