"""A batch of molecules as one disconnected graph: the model's input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .local_frame import local_positions
from .neighbors import molecule_edges


@dataclass
class AtomicGraph:
    """Atoms of ``num_graphs`` structures, concatenated.

    Attributes:
        positions: Å ``[N, 3]``.
        numbers: atomic numbers ``[N]``.
        batch: structure index of each atom ``[N]``.
        edge_index: ``[2, E]`` (sender ``j``, receiver ``i``).
        edge_shift: periodic image offsets in Å ``[E, 3]``, or None for molecules.
        num_graphs: number of structures.
    """

    positions: torch.Tensor
    numbers: torch.Tensor
    batch: torch.Tensor
    edge_index: torch.Tensor
    num_graphs: int
    edge_shift: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> "AtomicGraph":
        shift = None if self.edge_shift is None else self.edge_shift.to(device=device, dtype=dtype)
        return AtomicGraph(
            self.positions.to(device=device, dtype=dtype), self.numbers.to(device), self.batch.to(device),
            self.edge_index.to(device), self.num_graphs, shift,
        )


def molecules_to_graph(numbers: list[np.ndarray] | np.ndarray, positions: list[np.ndarray] | np.ndarray,
                       cutoff: float, dtype: torch.dtype = torch.float32, device="cpu",
                       method: str = "auto", centre: bool = False) -> AtomicGraph:
    """Batch non-periodic molecules (lists of ``[n_i]`` numbers and ``[n_i, 3]`` positions in Å).

    ``centre=True`` moves each molecule to its centroid in float64 before the cast to ``dtype``
    (:func:`~qeq_ase.data.local_frame.local_positions`), as the calculator does: rMD17's benzene
    frames lie 199 Å from the origin, where float32 positions are 1.5e-5 Å apart."""
    numbers = [np.asarray(z) for z in numbers]
    positions = [local_positions(p) if centre else np.asarray(p) for p in positions]
    counts = [len(z) for z in numbers]
    pos = torch.as_tensor(np.concatenate(positions), dtype=dtype, device=device)
    z = torch.as_tensor(np.concatenate(numbers), dtype=torch.long, device=device)
    batch = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.as_tensor(counts, device=device))
    edge_index = molecule_edges(pos, cutoff, batch, method=method)
    return AtomicGraph(pos, z, batch, edge_index, len(counts))
