"""The EFA energy model: species embedding, layers of local message passing plus EFA,
per-atom energy readout with per-element shifts; forces by autograd."""

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .efa import EuclideanFastAttention
from .grid import LebedevRules, carried_rules
from .local import Message, RadialBasis, Update, mlp
from .mesh import mesh_holds, mesh_size
from .reciprocal import lattice_indices, length_scales, normalisers, reciprocal_terms


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
        self, x: Tensor, vec: Tensor, positions: Tensor, batch: Tensor, n_structures: int, owned: Tensor,
        reciprocal: Optional[Tuple[Tensor, Tensor, Tensor]],
    ) -> Tensor:
        return self.mlp(x + self.dense(self.efa(x, vec, positions, batch, n_structures, owned, reciprocal)))

    def use_grid(self, points: Tensor, weights: Tensor) -> None:
        self.efa.grid_points = points
        self.efa.grid_weights = weights

    def use_mesh(self, sizes: List[int]) -> None:
        self.efa.mesh = sizes


class NoGlobalUpdate(nn.Module):
    """The local baseline: same signature, no global term."""

    def forward(
        self, x: Tensor, vec: Tensor, positions: Tensor, batch: Tensor, n_structures: int, owned: Tensor,
        reciprocal: Optional[Tuple[Tensor, Tensor, Tensor]],
    ) -> Tensor:
        return torch.zeros_like(x)

    def use_grid(self, points: Tensor, weights: Tensor) -> None:
        pass

    def use_mesh(self, sizes: List[int]) -> None:
        pass


class InteractionLayer(nn.Module):
    """x <- x + MLP_local(x + MP(x)) + MLP_global(x + Dense(EFA(x)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        f = config.features
        self.message = Message(f, config.num_radial, float(config.cutoff))
        self.update = Update(f)
        self.local_mlp = mlp(f, f, f, zero_last=True)
        self.global_update = GlobalUpdate(config) if config.use_efa else NoGlobalUpdate()

    def forward(
        self, x: Tensor, vec: Tensor, positions: Tensor, batch: Tensor, n_structures: int, owned: Tensor,
        sender: Tensor, receiver: Tensor, d: Tensor, rbf: Tensor, envelope: Tensor, unit: Tensor,
        reciprocal: Optional[Tuple[Tensor, Tensor, Tensor]],
    ) -> tuple[Tensor, Tensor]:
        dx, dv = self.message(x, vec, sender, receiver, d, rbf, envelope, unit)
        x_local = x + dx
        vec = vec + dv
        du, dvu = self.update(x_local, vec)
        vec = vec + dvu
        x_global = self.global_update(x, vec, positions, batch, n_structures, owned, reciprocal)
        return x + self.local_mlp(x_local + du) + x_global, vec


class EnergyModel(nn.Module):
    mesh: List[int]

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
        # the periodic form needs no Lebedev rule: it carries its training grid only (metadata)
        rules = ([config.grid_points] if config.periodic_efa else carried_rules(config.grid_points)) if blocks else []
        self.grid = LebedevRules(rules, omega_max, config.grid_points)
        # the periodic form's kernel (reciprocal.py): a real-space width per channel, as the
        # finite form's frequencies: scalar channels, then 3 components of each vector channel
        self.k_max = float(config.k_max)
        scalar = length_scales(config.num_frequencies, config.k_max, config.r_max)
        vector = length_scales(config.num_vector_frequencies, config.k_max, config.r_max) \
            if config.num_vector_frequencies else []
        lengths = scalar + vector * 3
        self.register_buffer("kernel_lengths", torch.tensor(lengths, dtype=torch.float64), persistent=False)
        self.register_buffer("kernel_norms", torch.tensor(normalisers(lengths, config.k_max), dtype=torch.float64),
                             persistent=False)
        self.periodic = bool(config.periodic_efa and blocks)
        self.k_zero = bool(config.k_zero)
        self.mesh_min_kvectors = 1500  # kspace auto: where the mesh becomes the cheaper path (set_kspace)
        self.mesh = []  # the k-space mesh in use ([]: the direct sum over k), set_kspace

    # ---- the periodic form's k-space path: direct sum over k or mesh (mesh.py), set_kspace ----

    @torch.jit.export
    def set_kspace(self, mode: str, cell: Tensor) -> List[int]:
        """Install the k-space path of the periodic form for cells (B, 3, 3) and return the mesh
        sizes ([]: the direct sum). mode 'direct'; 'mesh': keep the installed mesh while it
        carries every k-vector of `cell` (so energies stay continuous as the cell breathes), else
        choose one for `cell` (oversampling 2, order 6: about 1e-3 relative error of the sums);
        'auto': the mesh from mesh_min_kvectors k-vectors on, where it is the cheaper path
        (benchmarks/periodic_mesh.py), else the direct sum. A caller resolves 'auto' once and then
        passes 'mesh' or 'direct'. Every MPI rank holds the same cell, so all choose alike."""
        if mode not in ["direct", "mesh", "auto"]:
            raise RuntimeError("kspace must be direct, mesh or auto, not '" + mode + "'")
        sizes: List[int] = []
        if self.periodic and mode != "direct":
            n = lattice_indices(cell, self.k_max)
            if mode == "mesh" or n.shape[0] >= self.mesh_min_kvectors:
                if mesh_holds(self.mesh, n):
                    sizes = self.mesh
                else:
                    largest = n.abs().max(dim=0).values if n.shape[0] > 0 else torch.zeros(3, dtype=n.dtype)
                    sizes = mesh_size([int(largest[0]), int(largest[1]), int(largest[2])])
        self.mesh = sizes
        for layer in self.layers:
            layer.global_update.use_mesh(sizes)
        return sizes

    @torch.jit.export
    def kspace_mesh(self) -> List[int]:
        return self.mesh

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
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Edge vectors (E, 3), radial basis (E, R), envelope (E, 1) and unit vectors (E, 3) of the
        edges; on the fused CPU path, where efa::edge_message makes the last three from the edge
        vectors per chunk of edges, the basis's frequencies (R,) and two empty tensors (local.py)."""
        d = positions[sender] - positions[receiver] + edge_shift
        rbf, envelope, unit = self.radial.geometry(d)
        return d, rbf, envelope, unit

    def atomic_energies(
        self, positions: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor,
        batch: Tensor, n_structures: int, owned: Tensor, charge_spin: Optional[Tensor],
        cell: Optional[Tensor] = None,
    ) -> Tensor:
        reciprocal: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        if cell is not None:
            reciprocal = reciprocal_terms(positions, cell.to(positions.dtype), batch, self.kernel_lengths,
                                          self.kernel_norms, self.k_max, self.k_zero)
        sender, receiver = edge_index[0], edge_index[1]
        d, rbf, envelope, unit = self.edge_geometry(positions, sender, receiver, edge_shift)
        n = positions.shape[0]
        x = self.initial_features(species, batch, charge_spin)
        vec = torch.zeros(n, 3, self.features, dtype=x.dtype, device=x.device)
        last = len(self.layers) - 1
        for t, layer in enumerate(self.layers):
            x, vec = layer(x, vec, positions, batch, n_structures, owned, sender, receiver, d, rbf, envelope, unit,
                           reciprocal)
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


class PeriodicEnergyModel(EnergyModel):
    """EnergyModel with the periodic form of EFA (reciprocal.py): an eighth input, `cell`
    (n_structures, 3, 3), each structure's lattice vectors as rows (A)."""

    def forward(
        self, positions: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor,
        batch: Tensor, n_structures: int, owned: Tensor, cell: Tensor,
    ) -> Tensor:
        """Per-atom energies (N,) as EnergyModel.forward, in the periodic cells `cell`."""
        return self.atomic_energies(positions, species, edge_index, edge_shift, batch, n_structures, owned, None,
                                    cell)


class PeriodicChargedEnergyModel(ChargedEnergyModel):
    """ChargedEnergyModel with the periodic form of EFA: inputs charge_spin, then cell."""

    def forward(
        self, positions: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor,
        batch: Tensor, n_structures: int, owned: Tensor, charge_spin: Tensor, cell: Tensor,
    ) -> Tensor:
        return self.atomic_energies(positions, species, edge_index, edge_shift, batch, n_structures, owned,
                                    charge_spin, cell)


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float64) -> EnergyModel:
    """The model a config describes: with an input charge_spin when it takes a total charge or
    spin, and an input cell when its EFA term has the periodic form."""
    if config.periodic_efa:
        cls = PeriodicChargedEnergyModel if config.global_inputs else PeriodicEnergyModel
    else:
        cls = ChargedEnergyModel if config.global_inputs else EnergyModel
    return cls(config).to(dtype)


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
    batch: Tensor, n_structures: int, owned: Tensor, *extra: Tensor, create_graph: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Energy per structure (B,), forces (N, 3) and per-atom energies (N,). `extra`: the model's
    further inputs, charge_spin and/or cell, as Graph.inputs() gives them."""
    energy, forces, atomic, _ = _evaluate(model, (positions, species, edge_index, edge_shift, batch, n_structures,
                                                   owned, *extra), create_graph, False)
    return energy, forces, atomic


def energy_forces_stress(model: nn.Module, *inputs, cell: Optional[Tensor] = None, create_graph: bool = False
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """energy_and_forces and the stress of each structure (B, 3, 3), (1/V) dE/d(strain) in eV/A^3
    (ASE's sign: positive under tension), with cell (B, 3, 3) the last of `inputs` when the
    model takes it and the keyword `cell` otherwise. Positions, periodic edge shifts and the cell deform
    together as r (I + e) with a symmetric strain e per structure."""
    return _evaluate(model, inputs, create_graph, True, cell)


def _evaluate(model: nn.Module, inputs: tuple, create_graph: bool, stress: bool, cell: Optional[Tensor] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    positions, edge_index, edge_shift, batch, n_structures = inputs[0], inputs[2], inputs[3], inputs[4], inputs[5]
    positions = positions.detach().requires_grad_(True)
    inputs = (positions, *inputs[1:])
    takes_cell = len(inputs) > 7 and inputs[-1].dim() == 3
    if stress:
        cells = inputs[-1] if takes_cell else cell
        if cells is None:
            raise ValueError("stress needs each structure's cell")
        strain = torch.zeros(n_structures, 3, 3, dtype=positions.dtype, device=positions.device, requires_grad=True)
        deform = torch.eye(3, dtype=positions.dtype, device=positions.device) + 0.5 * (strain + strain.transpose(1, 2))
        strained = list(inputs)
        strained[0] = torch.bmm(positions.unsqueeze(1), deform[batch]).squeeze(1)
        strained[3] = torch.bmm(edge_shift.unsqueeze(1), deform[batch[edge_index[1]]]).squeeze(1)
        if takes_cell:
            strained[-1] = torch.bmm(cells.to(positions.dtype), deform)
        atomic = model(*strained)
        wrt = [positions, strain]
    else:
        atomic = model(*inputs)
        wrt = [positions]
    energy = torch.zeros(n_structures, dtype=atomic.dtype, device=atomic.device).index_add(0, batch, atomic)
    grads = torch.autograd.grad(energy.sum(), wrt, create_graph=create_graph)
    if not stress:
        return energy, -grads[0], atomic, positions.new_zeros(0)
    volume = torch.abs(torch.linalg.det(cells.to(positions.dtype)))
    return energy, -grads[0], atomic, grads[1] / volume.reshape(-1, 1, 1)
