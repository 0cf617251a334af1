"""Neighbour lists: edges ``j -> i`` for all pairs closer than the cutoff.

Edges follow the PyTorch Geometric convention: ``edge_index[0]`` is the sender ``j``,
``edge_index[1]`` the receiver ``i``; the edge vector is
``positions[j] - positions[i] + shift`` with ``shift`` (Å) the periodic image offset.

* Molecules (no periodic boundaries), single or batched: :func:`molecule_edges`,
  ``torch_cluster.radius_graph`` when torch-cluster is installed, else a dense
  distance matrix per molecule (:func:`brute_force_edges`).
* Periodic cells: :func:`periodic_edges`, through ``matscipy.neighbours.neighbour_list``.

``benchmarks/neighbor_lists.py`` times these paths against each other.
"""

from __future__ import annotations

import numpy as np
import torch

try:  # optional compiled dependency; the dense fallback is exact, only slower at scale
    from torch_cluster import radius_graph as _radius_graph
except ImportError:  # pragma: no cover - depends on the environment
    _radius_graph = None

HAVE_TORCH_CLUSTER = _radius_graph is not None


def brute_force_edges(positions: torch.Tensor, cutoff: float, batch: torch.Tensor | None = None) -> torch.Tensor:
    """All pairs ``i != j`` of the same molecule with ``|r_j - r_i| < cutoff`` (dense, O(N^2))."""
    n = positions.shape[0]
    if batch is None:
        batch = positions.new_zeros(n, dtype=torch.long)
    with torch.no_grad():
        dist = torch.cdist(positions, positions)
        mask = (dist < cutoff) & (batch[:, None] == batch[None, :])
        mask.fill_diagonal_(False)
        receiver, sender = mask.nonzero(as_tuple=True)
    return torch.stack([sender, receiver])


def molecule_edges(
    positions: torch.Tensor, cutoff: float, batch: torch.Tensor | None = None, method: str = "auto"
) -> torch.Tensor:
    """Edges of one or several non-periodic molecules (``batch`` assigns atoms to molecules).

    ``method`` is ``"torch_cluster"``, ``"brute_force"`` or ``"auto"`` (torch-cluster when
    installed and the system is large, the dense path otherwise; see the benchmark).
    """
    if method == "auto":
        method = "torch_cluster" if HAVE_TORCH_CLUSTER and positions.shape[0] > AUTO_DENSE_MAX_ATOMS else "brute_force"
    if method == "brute_force":
        return brute_force_edges(positions, cutoff, batch)
    if method == "torch_cluster":
        if _radius_graph is None:
            raise ImportError("torch-cluster is not installed: pip install --no-build-isolation torch-cluster")
        with torch.no_grad():
            edge_index = _radius_graph(
                positions.detach(), r=cutoff, batch=batch, loop=False,
                max_num_neighbors=positions.shape[0],
            )
        return edge_index
    raise ValueError(f"unknown neighbour-list method {method!r}; use 'auto', 'torch_cluster' or 'brute_force'")


#: Up to this many atoms the dense path is used by ``method="auto"`` (set from the benchmark).
AUTO_DENSE_MAX_ATOMS = 256


def periodic_edges(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Edges and Cartesian image shifts (Å) of one periodic (or partly periodic) cell.

    Returns ``edge_index`` ``[2, n_edges]`` (sender, receiver) and ``shift`` ``[n_edges, 3]``
    such that the edge vector is ``positions[j] - positions[i] + shift``.
    """
    from matscipy.neighbours import neighbour_list

    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    i, j, shift_int = neighbour_list("ijS", positions=positions, cutoff=float(cutoff), cell=cell, pbc=np.asarray(pbc))
    edge_index = np.stack([j, i]).astype(np.int64)
    shift = shift_int.astype(np.float64) @ cell
    return edge_index, shift
