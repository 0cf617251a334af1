"""What the network is given: positions in a local frame, formed in float64, and no overlapping atoms.

The network computes in float32, whose spacing at 1e6 Å is 0.06 Å. Edge vectors formed
from absolute float32 positions therefore depend on where the molecule is; the energy
does not. :func:`local_positions` moves the atoms to a frame around the origin in float64
(a rigid translation, and whole lattice vectors along periodic directions), so that the
float32 cast loses only what it loses for a molecule at the origin.

The network has no short-range repulsion: two atoms at the same place give a finite energy
and undefined forces. :func:`check_no_overlap` refuses them, naming the atoms.
"""

from __future__ import annotations

import numpy as np
import torch

#: Atoms closer than this (Å) are refused: at ~1e-6 Å, the float32 spacing of positions
#: around the origin, the direction of their edge would be rounding noise.
MIN_PAIR_DISTANCE_A = 1e-4


class OverlappingAtomsError(ValueError):
    """Two atoms are (nearly) at the same place; the potential has no short-range repulsion."""


def complete_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """``cell`` with each zero vector of a non-periodic direction replaced by a unit vector
    orthogonal to the others (ASE allows e.g. a slab's third vector to be zero)."""
    from ase.geometry import complete_cell as ase_complete_cell

    cell = np.asarray(cell, dtype=np.float64)
    missing = ~np.asarray(pbc, dtype=bool) & (np.linalg.norm(cell, axis=1) == 0.0)
    if not missing.any():
        return cell
    return ase_complete_cell(cell)


def local_positions(positions: np.ndarray, cell: np.ndarray | None = None, pbc=False) -> np.ndarray:
    """``positions`` (Å) translated by their centroid and, along periodic directions of a
    non-singular ``cell``, wrapped into it by whole lattice vectors; float64 throughout.

    Edge vectors, energies and forces are those of the original positions (the model is
    translation invariant and periodic images are found from the wrapped positions).
    """
    local = np.asarray(positions, dtype=np.float64)
    if len(local) == 0:
        return local.copy()
    local = local - local.mean(axis=0)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if pbc.any():
        cell = np.asarray(cell, dtype=np.float64)
        frac = np.linalg.solve(cell.T, local.T).T
        local = local - np.floor(frac[:, pbc]) @ cell[pbc]
    return local


def local_frame(atoms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(positions, cell, pbc)`` of ``atoms`` for the network: float64 positions in the local
    frame (:func:`local_positions`), the cell with missing non-periodic vectors completed
    (:func:`complete_cell`) and pbc. ValueError for a non-finite, degenerate or singular cell."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell[:], dtype=np.float64)
    if pbc.any():
        if not np.isfinite(cell).all():
            raise ValueError("the cell contains NaN or inf")
        if np.any(np.linalg.norm(cell[pbc], axis=1) == 0.0):
            raise ValueError(f"periodic directions {pbc.tolist()} need nonzero cell vectors; "
                             f"got cell {cell.tolist()}")
        cell = complete_cell(cell, pbc)
        if abs(np.linalg.det(cell)) <= 1e-9 * max(float(np.abs(cell).max()), 1.0) ** 3:
            raise ValueError(f"the cell {cell.tolist()} is singular: its vectors must be independent")
    return local_positions(atoms.positions, cell, pbc), cell, pbc


def check_no_overlap(positions: torch.Tensor, edge_index: torch.Tensor, shift: torch.Tensor | None = None,
                     min_distance: float = MIN_PAIR_DISTANCE_A) -> None:
    """Raise :class:`OverlappingAtomsError` naming the closest pair if an edge is shorter than
    ``min_distance`` (Å). One reduction over the edges; the details are computed only on failure."""
    if edge_index.shape[1] == 0:
        return
    vec = positions[edge_index[0]] - positions[edge_index[1]]
    if shift is not None:
        vec = vec + shift
    d2 = (vec * vec).sum(dim=1)
    k = int(torch.argmin(d2))
    distance = float(d2[k].double().sqrt())
    if distance >= min_distance:
        return
    j, i = (int(a) for a in edge_index[:, k])
    where = "" if shift is None or not bool(shift[k].any()) else " (periodic images)"
    raise OverlappingAtomsError(
        f"atoms {i} and {j} are {distance:.3g} Å apart{where}, closer than {min_distance:g} Å: the potential "
        f"has no short-range repulsion and its forces are undefined there; remove duplicated atoms")
