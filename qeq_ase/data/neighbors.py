"""Neighbour lists: edges ``j -> i`` for all pairs closer than the cutoff.

Edges follow the PyTorch Geometric convention: ``edge_index[0]`` is the sender ``j``,
``edge_index[1]`` the receiver ``i``; the edge vector is
``positions[j] - positions[i] + shift`` with ``shift`` (Å, Cartesian) the periodic image
offset. A pair is an edge when ``|r_j - r_i + shift| < cutoff``; an atom is never its own
neighbour in the same image.

* Molecules (no periodic boundaries), single or batched: :func:`molecule_edges`, with
  ``method`` one of

  - ``"brute_force"``: dense distance matrix (:func:`brute_force_edges`), O(N^2);
  - ``"torch_cluster"``: ``torch_cluster.radius_graph`` (k-d tree per molecule);
  - ``"matscipy"``: ``matscipy.neighbours.neighbour_list`` with no periodic boundaries
    (linked cells; molecules of a batch are moved apart first);
  - ``"auto"`` (default): the dense path up to :data:`AUTO_DENSE_MAX_ATOMS` atoms,
    :data:`AUTO_LARGE_METHOD` (matscipy) above: the fastest ones on CPU in
    ``benchmarks/neighbor_lists.py`` (see ``docs/neighbor_lists.md``).

* Periodic (or partly periodic) cells: :func:`periodic_edges`, through matscipy.

Molecule edges are returned as a ``torch.long`` tensor ``[2, E]`` on the device of
``positions``; periodic edges as numpy arrays. Neighbour lists carry no gradient.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch

try:  # optional compiled dependency; the other paths are exact without it
    from torch_cluster import radius_graph as _radius_graph
except ImportError:  # pragma: no cover - depends on the environment
    _radius_graph = None

HAVE_TORCH_CLUSTER = _radius_graph is not None

#: ``method="auto"`` uses the dense path up to this many atoms (all molecules of a batch
#: together). ``benchmarks/neighbor_lists.py`` on one CPU thread: the dense path is the
#: fastest up to 105 atoms (5 aspirins) and slower from 126 on (docs/neighbor_lists.md).
AUTO_DENSE_MAX_ATOMS = 112

#: ``method="auto"`` above :data:`AUTO_DENSE_MAX_ATOMS` atoms: matscipy was the fastest
#: from 672 atoms on (1.1-2.1x faster than torch-cluster); at 126-336 atoms the two traded
#: places. matscipy is a hard dependency, so ``"auto"`` never needs torch-cluster. (Set to
#: ``"torch_cluster"``, ``"auto"`` falls back to matscipy when torch-cluster is missing.)
AUTO_LARGE_METHOD = "matscipy"

METHODS = ("auto", "brute_force", "torch_cluster", "matscipy")

# Dense path: distance rows are computed in blocks of at most this many matrix entries,
# so memory stays bounded (about 64 MiB of float32 distances) for large systems.
_DENSE_BLOCK_ENTRIES = 1 << 24

# radius_graph's per-receiver neighbour cap on GPUs (it allocates receivers x cap); doubled
# until no receiver reaches it, so no neighbour is ever dropped. On CPUs the cap is N.
_GPU_INITIAL_MAX_NEIGHBORS = 128


# --------------------------------------------------------------------------- validation


def _check_cutoff(cutoff) -> float:
    if isinstance(cutoff, bool) or not isinstance(cutoff, (Real, np.floating, np.integer)):
        raise TypeError(f"cutoff must be a real number (Å), got {type(cutoff).__name__}")
    cutoff = float(cutoff)
    if not math.isfinite(cutoff) or cutoff <= 0.0:
        raise ValueError(f"cutoff must be finite and positive (Å), got {cutoff}")
    return cutoff


def _check_positions_tensor(positions) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor [N, 3], got {type(positions).__name__}")
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {list(positions.shape)}")
    if not positions.is_floating_point():
        raise TypeError(f"positions must be a floating-point tensor, got {positions.dtype}")
    if not bool(torch.isfinite(positions).all()):
        bad = (~torch.isfinite(positions)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"positions contain NaN or infinite values (atoms {bad}...)")
    return positions.detach()


def _check_batch(batch, positions: torch.Tensor) -> torch.Tensor | None:
    if batch is None:
        return None
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch must be a torch.Tensor [N] or None, got {type(batch).__name__}")
    if batch.dim() != 1 or batch.shape[0] != positions.shape[0]:
        raise ValueError(f"batch must have shape [{positions.shape[0]}] (one entry per atom), got {list(batch.shape)}")
    if batch.dtype.is_floating_point or batch.dtype.is_complex or batch.dtype == torch.bool:
        raise TypeError(f"batch must be an integer tensor, got {batch.dtype}")
    if batch.device != positions.device:
        raise ValueError(f"batch is on {batch.device} but positions on {positions.device}")
    batch = batch.long()
    if batch.numel() and bool((batch[:1] < 0).any() | (batch[1:] < batch[:-1]).any()):  # one sync
        if int(batch.min()) < 0:
            raise ValueError("batch indices must be non-negative")
        raise ValueError("batch must be sorted: the atoms of each molecule must be contiguous")
    return batch


def _check_periodic_inputs(positions, cell, pbc) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {list(positions.shape)}")
    if not np.isfinite(positions).all():
        raise ValueError("positions contain NaN or infinite values")
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape [3, 3] (lattice vectors as rows), got {list(cell.shape)}")
    if not np.isfinite(cell).all():
        raise ValueError("cell contains NaN or infinite values")
    pbc = np.asarray(pbc)
    if pbc.dtype != bool:
        raise TypeError(f"pbc must be a bool or 3 bools, got dtype {pbc.dtype}")
    pbc = np.broadcast_to(pbc, (3,)).copy() if pbc.ndim == 0 else pbc
    if pbc.shape != (3,):
        raise ValueError(f"pbc must be a bool or 3 bools, got shape {list(pbc.shape)}")
    if pbc.any():
        from .local_frame import complete_cell

        cell = complete_cell(cell, pbc)  # a zero vector along a non-periodic direction is allowed
        volume = abs(np.linalg.det(cell))
        if volume <= 1e-9 * max(float(np.abs(cell).max()), 1.0) ** 3:
            raise ValueError("cell is singular; a periodic cell needs independent lattice vectors")
    return positions, cell, pbc


# --------------------------------------------------------------------------- molecules


def brute_force_edges(positions: torch.Tensor, cutoff: float, batch: torch.Tensor | None = None) -> torch.Tensor:
    """All pairs ``i != j`` of the same molecule with ``|r_j - r_i| < cutoff`` (dense, O(N^2)).

    The reference implementation: exact differences (no ``|a|^2 + |b|^2 - 2ab`` shortcut),
    distance rows computed in blocks so memory stays bounded. ``batch`` need not be sorted.
    Edges come sorted by receiver, then sender.
    """
    positions = _check_positions_tensor(positions)
    cutoff = _check_cutoff(cutoff)
    if batch is not None:
        if not isinstance(batch, torch.Tensor) or batch.shape != (positions.shape[0],):
            raise ValueError(f"batch must be a tensor of shape [{positions.shape[0]}]")
        batch = batch.to(positions.device)
    with torch.no_grad():
        return _dense_edges(positions, cutoff, batch)


def _dense_edges(positions: torch.Tensor, cutoff: float, batch: torch.Tensor | None) -> torch.Tensor:
    n = positions.shape[0]
    block = max(1, _DENSE_BLOCK_ENTRIES // max(n, 1))
    parts = []
    for start in range(0, n, block):
        rows = positions[start:start + block]
        mask = torch.cdist(rows, positions, compute_mode="donot_use_mm_for_euclid_dist") < cutoff
        if batch is not None:
            mask &= batch[start:start + block, None] == batch[None, :]
        mask.diagonal(offset=start).fill_(False)  # no self-loops
        edges = mask.nonzero().T.flip(0)  # rows of nonzero() are (receiver, sender)
        if start:
            edges[1] += start
        parts.append(edges)
    if not parts:
        return torch.empty(2, 0, dtype=torch.long, device=positions.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _torch_cluster_edges(positions: torch.Tensor, cutoff: float, batch: torch.Tensor | None,
                         max_num_neighbors: int | None = None) -> torch.Tensor:
    """``radius_graph`` without its silent neighbour cap (default 32): the cap starts at N on
    CPUs (free there) and is doubled on GPUs until no receiver reaches it."""
    if _radius_graph is None:
        raise ImportError("method='torch_cluster' needs torch-cluster: "
                          "pip install --no-build-isolation torch-cluster (or use method='matscipy')")
    n = positions.shape[0]
    if max_num_neighbors is None:
        max_num_neighbors = n if positions.device.type == "cpu" else min(n, _GPU_INITIAL_MAX_NEIGHBORS)
    cap = max(1, min(int(max_num_neighbors), n))
    while True:
        edge_index = _radius_graph(positions, r=cutoff, batch=batch, loop=False, max_num_neighbors=cap,
                                   num_workers=torch.get_num_threads())  # used for one CPU molecule only
        # A receiver with fewer than `cap` neighbours had all of them returned; n - 1 is the most possible.
        if cap >= n - 1 or edge_index.shape[1] == 0:
            return edge_index
        if int(torch.bincount(edge_index[1], minlength=n).max()) < cap:
            return edge_index
        cap = min(2 * cap, n)


def _matscipy_molecule_edges(positions: torch.Tensor, cutoff: float, batch: torch.Tensor | None) -> torch.Tensor:
    pos = positions.to("cpu", torch.float64).numpy().copy()
    if batch is not None and pos.shape[0]:
        # Line the molecules up along x, more than a cutoff apart, so no edge joins two of them.
        b = batch.cpu().numpy()
        n_mol = int(b[-1]) + 1
        lo = np.full(n_mol, np.inf)
        hi = np.full(n_mol, -np.inf)
        np.minimum.at(lo, b, pos[:, 0])
        np.maximum.at(hi, b, pos[:, 0])
        width = np.where(np.isfinite(lo), hi - lo, 0.0)
        lo = np.where(np.isfinite(lo), lo, 0.0)
        start = np.concatenate([[0.0], np.cumsum(width + 2.0 * cutoff + 1.0)[:-1]])
        pos[:, 0] += (start - lo)[b]
    i, j = _matscipy_open_boundaries(pos, cutoff)
    edge_index = np.stack([j, i]).astype(np.int64)
    return torch.from_numpy(edge_index).to(positions.device)


def _matscipy_open_boundaries(positions: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """matscipy's ``i, j`` with no periodic boundaries, in a bounding box that is never
    singular (matscipy's own shrink-wrapped box is, for planar or linear molecules)."""
    from matscipy.neighbours import neighbour_list

    lo, hi = positions.min(axis=0), positions.max(axis=0)
    cell = np.diag(np.maximum(hi - lo, cutoff))
    return neighbour_list("ij", positions=positions, cutoff=cutoff, cell=cell, cell_origin=lo,
                          pbc=np.zeros(3, dtype=bool))


def molecule_edges(
    positions: torch.Tensor, cutoff: float, batch: torch.Tensor | None = None, method: str = "auto"
) -> torch.Tensor:
    """Edges ``[2, E]`` (sender, receiver) of one or several non-periodic molecules.

    Args:
        positions: ``[N, 3]`` in Å (any float dtype and device; no gradient flows through).
        cutoff: Å, finite and positive.
        batch: molecule index of each atom ``[N]``, sorted (each molecule contiguous), or
            None for a single molecule. No edge joins two molecules.
        method: ``"auto"``, ``"brute_force"``, ``"torch_cluster"`` or ``"matscipy"``; all
            give the same set of edges. ``"auto"`` takes the dense path for at most
            :data:`AUTO_DENSE_MAX_ATOMS` atoms (and always on a GPU) and
            :data:`AUTO_LARGE_METHOD` above.
    """
    if method not in METHODS:
        raise ValueError(f"unknown neighbour-list method {method!r}; use one of {', '.join(map(repr, METHODS))}")
    positions = _check_positions_tensor(positions)
    cutoff = _check_cutoff(cutoff)
    batch = _check_batch(batch, positions)
    n = positions.shape[0]
    if n == 0:
        return torch.empty(2, 0, dtype=torch.long, device=positions.device)
    if method == "auto":
        # On an accelerator the dense path stays on the device (matscipy would copy to the host).
        if n <= AUTO_DENSE_MAX_ATOMS or positions.device.type != "cpu":
            method = "brute_force"
        elif AUTO_LARGE_METHOD == "torch_cluster" and not HAVE_TORCH_CLUSTER:
            method = "matscipy"
        else:
            method = AUTO_LARGE_METHOD
    with torch.no_grad():
        if method == "brute_force":
            return _dense_edges(positions, cutoff, batch)
        if method == "torch_cluster":
            return _torch_cluster_edges(positions, cutoff, batch)
        return _matscipy_molecule_edges(positions, cutoff, batch)


# --------------------------------------------------------------------------- periodic cells


def periodic_edges(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Edges and Cartesian image shifts (Å) of one periodic (or partly periodic) cell.

    Args:
        positions: ``[N, 3]`` in Å; atoms need not be wrapped into the cell.
        cell: ``[3, 3]`` lattice vectors as rows (Å). When any direction is periodic, the
            vectors must be independent; a zero vector along a non-periodic direction is
            replaced by a unit vector orthogonal to the others. Ignored when none is periodic.
        pbc: a bool or 3 bools, periodicity along each lattice vector.
        cutoff: Å, finite and positive; it may exceed the cell size (several images).

    Returns:
        ``edge_index`` ``[2, E]`` int64 (sender ``j``, receiver ``i``) and ``shift``
        ``[E, 3]`` float64 such that the edge vector is ``positions[j] - positions[i] + shift``.
        An atom's own periodic images are neighbours (``i == j``, non-zero shift).
    """
    from matscipy.neighbours import neighbour_list

    positions, cell, pbc = _check_periodic_inputs(positions, cell, pbc)
    cutoff = _check_cutoff(cutoff)
    if positions.shape[0] == 0:
        return np.empty((2, 0), dtype=np.int64), np.empty((0, 3), dtype=np.float64)
    if not pbc.any():  # the cell plays no part; a zero ASE cell is fine here
        i, j = _matscipy_open_boundaries(positions, cutoff)
        return np.stack([j, i]).astype(np.int64), np.zeros((len(i), 3), dtype=np.float64)
    i, j, shift_int = neighbour_list("ijS", positions=positions, cutoff=cutoff, cell=cell, pbc=pbc)
    edge_index = np.stack([j, i]).astype(np.int64)
    shift = shift_int.astype(np.float64) @ cell
    return edge_index, shift
