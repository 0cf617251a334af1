"""The qeq-ase potential: an attention-based SO(3)-equivariant network, energy and forces.

Data path: species and positions -> edges (``neighbors``) -> radial basis and envelope
(``radial``) -> ``num_layers`` equivariant attention layers (``attention``) -> per-atom
energies -> total energy (plus per-element reference energies, kept in float64) ->
forces ``-dE/dpositions`` by autograd.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..kernels.edge_kernel import check_edge_backend, default_edge_backend, plan_fused_edges, resolve_edge_backend
from .attention import EquivariantAttention, scatter_sum
from .layers import LayerFactory
from .radial import RADIAL_BASES, cosine_cutoff
from .stress import apply_strain


@dataclass
class ModelConfig:
    """Architecture hyperparameters (stored in every saved potential).

    Attributes:
        species: atomic numbers the model knows, in the order of its embedding rows.
        cutoff: neighbour cutoff in Å.
        num_features: channels ``F`` of both the scalar and the vector features.
        num_layers: interaction (attention) layers.
        num_heads: attention heads (``F`` must be divisible by it).
        num_radial: radial basis functions.
        radial_basis: ``"bessel"`` (``sin(n pi r / r_c) / r``) or ``"expnorm"`` (exponential-normal
            functions, as in TorchMD-Net); see ``radial``.
        attention_normalization: cosine attention with a learned temperature (True) or
            plain scaled dot-product logits (False, for ablations).
        temperature: initial attention temperature (normalised attention only).
        attention_activation: ``"softmax"`` (sink softmax over neighbours) or ``"silu"``
            (an un-normalised gate per edge, as in TorchMD-Net); see ``attention``.
        neighbor_embedding: start the scalar features from the element embedding plus a
            radially filtered sum of the neighbours' element embeddings (TorchMD-Net's
            neighbour embedding) instead of the element embedding alone.
    """

    species: list[int] = field(default_factory=lambda: [1, 6, 7, 8])
    cutoff: float = 5.0
    num_features: int = 128
    num_layers: int = 4
    num_heads: int = 8
    num_radial: int = 32
    radial_basis: str = "bessel"
    attention_normalization: bool = True
    temperature: float = 0.2
    attention_activation: str = "softmax"
    neighbor_embedding: bool = False
    feed_forward: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


class NeighborEmbedding(nn.Module):
    """``s_i = W [e(z_i), sum_j C(r_ij) R(r_ij) * e'(z_j)]``: who the neighbours are, before any layer.

    ``R`` is linear in the radial basis ``b``: ``R(r) = A b(r) + c``. So the sum over
    neighbours is taken first, per receiver and neighbour element, over the ``K + 1`` numbers
    ``C [b, 1]`` of each edge, and ``A``, ``c`` and ``e'`` are applied once per node and
    element: the same sum, with ``[E, K + 1]`` rather than ``[E, F]`` tensors on the edges.
    """

    def __init__(self, num_species: int, num_features: int, num_radial: int, factory: LayerFactory):
        super().__init__()
        self.embedding = nn.Embedding(num_species, num_features)
        self.radial = nn.Linear(num_radial, num_features)  # K = num_radial: kept in float, like radial_embedding
        self.combine_in = factory.observer("scalar", 2 * num_features)
        self.combine = factory.scalar_linear(2 * num_features, num_features)

    def forward(self, s: torch.Tensor, species: torch.Tensor, edge_index: torch.Tensor,
                basis: torch.Tensor, envelope: torch.Tensor) -> torch.Tensor:
        sender, receiver = edge_index
        num_nodes, num_species = s.shape[0], self.embedding.num_embeddings
        terms = torch.cat([basis, torch.ones_like(basis[:, :1])], dim=-1) * envelope[:, None]   # [E, K + 1]
        slot = receiver * num_species + torch.index_select(species, 0, sender)  # (receiver, sender's element)
        sums = scatter_sum(terms, slot, num_nodes * num_species).view(num_nodes, num_species, -1)
        radial = torch.cat([self.radial.weight.t(), self.radial.bias[None]], dim=0)          # [K + 1, F]
        neighbors = (torch.matmul(sums, radial) * self.embedding.weight).sum(dim=1)        # [N, F]
        return self.combine(self.combine_in(torch.cat([s, neighbors], dim=-1)))


class QEqModel(nn.Module):
    """Equivariant transformer potential.

    ``forward`` returns the interaction energy per atom in eV (``[N]``, model dtype);
    :meth:`energy_and_forces` adds the per-element reference energies in float64 and
    differentiates. Total rMD17 energies are ~ -17,600 eV for aspirin: float32 resolves
    them only to ~1 meV, so the large constant part never enters float32 arithmetic.
    """

    #: Its name in potential files (:data:`qeq_ase.io.checkpoint.ARCHITECTURES`).
    architecture = "qeq-transformer"

    def __init__(self, config: ModelConfig, factory: LayerFactory | None = None):
        super().__init__()
        self.config = config
        self._edge_backend_choice, self._edge_backend = default_edge_backend(), None  # see set_edge_backend
        factory = factory or LayerFactory()
        F = config.num_features
        z_to_index = torch.full((119,), -1, dtype=torch.long)
        z_to_index[torch.tensor(config.species)] = torch.arange(len(config.species))
        self.register_buffer("z_to_index", z_to_index, persistent=False)
        self.embedding = nn.Embedding(len(config.species), F)
        if config.radial_basis not in RADIAL_BASES:
            raise ValueError(f"radial_basis must be one of {sorted(RADIAL_BASES)}, not {config.radial_basis!r}")
        self.radial_basis = RADIAL_BASES[config.radial_basis](config.cutoff, config.num_radial)
        self.radial_embedding = nn.Linear(config.num_radial, F)  # K = num_radial: kept in float
        self.neighbor_embedding = (NeighborEmbedding(len(config.species), F, config.num_radial, factory)
                                   if config.neighbor_embedding else None)
        self.layers = nn.ModuleList(
            EquivariantAttention(F, config.num_heads, config.attention_normalization, config.temperature, factory,
                                 config.attention_activation, config.feed_forward)
            for _ in range(config.num_layers)
        )
        self.readout_norm = nn.LayerNorm(F)
        self.readout_in = factory.observer("scalar", F)
        self.readout_hidden = factory.scalar_linear(F, F // 2)
        self.readout_out = factory.scalar_linear(F // 2, 1)
        # Per-atom energy = scale * network output + reference[species]. Set by the trainer.
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("reference_energy", torch.zeros(len(config.species), dtype=torch.float64))

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.float()/.half() must not round the reference energies: keep them float64.
        reference = self.reference_energy
        super()._apply(fn, recurse)
        self.reference_energy = reference.to(device=self.energy_scale.device, dtype=torch.float64)
        return self

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Map atomic numbers to embedding rows; raise on an element the model does not know."""
        if numbers.numel() and (numbers.min() < 0 or numbers.max() > 118):
            raise ValueError(f"atomic numbers must lie in 1..118, got {numbers.unique().tolist()}")
        index = self.z_to_index[numbers]
        if (index < 0).any():
            unknown = sorted(set(numbers[index < 0].tolist()))
            raise ValueError(f"element(s) Z={unknown} not in this potential's species {self.config.species}")
        return index

    def forward(self, positions: torch.Tensor, species: torch.Tensor, edge_index: torch.Tensor,
                edge_shift: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
        """Per-atom interaction energies in eV ``[N]`` (no reference energies).

        ``fused=True`` runs the layers' per-edge work in the fused C++ kernel
        (:mod:`qeq_ase.kernels.edge_kernel`: CPU, first-order gradients only).
        """
        blocks = pairs = None
        if fused:
            row_bytes = 4 * self.config.num_features * positions.element_size()  # one edge's filters
            edge_index, edge_shift, blocks, pairs = plan_fused_edges(edge_index, edge_shift, positions.shape[0],
                                                                     row_bytes)
        sender, receiver = edge_index
        vec = torch.index_select(positions, 0, sender) - torch.index_select(positions, 0, receiver)
        if edge_shift is not None:
            vec = vec + edge_shift
        r = vec.norm(dim=-1)
        unit = vec / r[:, None]
        envelope = cosine_cutoff(r, self.config.cutoff)
        basis = self.radial_basis(r)
        # an edge and its reverse share r: with pairs (fused path) the filters' input has one row per pair
        filter_basis = basis if pairs is None else basis.index_select(0, pairs.first)
        edge_features = nn.functional.silu(self.radial_embedding(filter_basis))

        s = self.embedding(species)
        if self.neighbor_embedding is not None:
            s = self.neighbor_embedding(s, species, edge_index, basis, envelope)
        v = s.new_zeros(s.shape[0], 3, s.shape[1])
        for layer in self.layers:
            s, v = layer(s, v, edge_index, edge_features, envelope, unit, blocks, pairs)
        h = self.readout_in(self.readout_norm(s))
        out = self.readout_out(nn.functional.silu(self.readout_hidden(h))).squeeze(-1)
        return out * self.energy_scale

    def energy_and_forces(self, positions: torch.Tensor, species: torch.Tensor, edge_index: torch.Tensor,
                          batch: torch.Tensor, num_graphs: int, edge_shift: torch.Tensor | None = None,
                          training: bool = False, virial: bool = False) -> dict[str, torch.Tensor]:
        """Energies (eV, float64 ``[num_graphs]``), forces (eV/Å ``[N, 3]``), per-atom energies.

        ``training=True`` keeps the graph of the force computation so a loss on forces can
        be back-propagated (double backward) and runs the eager layers; otherwise, on the
        CPU, the per-edge work runs in the fused kernel (:mod:`qeq_ase.kernels.edge_kernel`).
        ``virial=True`` also returns ``virial`` (eV, ``[num_graphs, 3, 3]``, model dtype):
        ``-dE/deps`` under a symmetric strain of positions and edge shifts (:mod:`qeq_ase.model.stress`).
        """
        if not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        fused = not training and positions.device.type == "cpu" and self.edge_backend() == "cpp"
        with torch.enable_grad():
            if virial:
                strained, shift, strain = apply_strain(positions, edge_shift, edge_index, batch, num_graphs)
                atomic = self.forward(strained, species, edge_index, shift, fused=fused)
                grad, strain_grad = torch.autograd.grad(atomic.sum(), (positions, strain), create_graph=training)
            else:
                atomic = self.forward(positions, species, edge_index, edge_shift, fused=fused)
                grad, = torch.autograd.grad(atomic.sum(), positions, create_graph=training)
        atomic64 = atomic.to(torch.float64) + self.reference_energy[species]
        energy = scatter_sum(atomic64, batch, num_graphs)
        out = {"energy": energy, "forces": -grad, "energies": atomic64,
               "interaction_energy": scatter_sum(atomic, batch, num_graphs)}
        if virial:
            out["virial"] = -strain_grad
        return out

    def set_edge_backend(self, choice: str) -> "QEqModel":
        """What runs the per-edge work at inference: ``"auto"`` (the fused C++ kernel where it
        builds), ``"cpp"`` (the kernel, or an error) or ``"eager"`` (torch ops); returns the model."""
        self._edge_backend_choice = check_edge_backend(choice)
        self._edge_backend = None
        return self

    def edge_backend(self) -> str:
        """What runs the layers' per-edge work at inference: ``"cpp"`` (fused) or ``"eager"``
        (resolved on first use, :func:`~qeq_ase.kernels.edge_kernel.resolve_edge_backend`)."""
        if self._edge_backend is None:
            softmax = any(layer.activation == "softmax" for layer in self.layers)  # the kernel's attention
            self._edge_backend = resolve_edge_backend(self._edge_backend_choice) if softmax else "eager"
        return self._edge_backend

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
