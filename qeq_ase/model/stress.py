"""Stress of periodic cells: the strain derivative of the energy, by autograd.

A homogeneous deformation ``x -> x (1 + eps)`` (row vectors, ``eps`` a symmetric 3x3 strain,
one per structure, evaluated at zero) moves every atom and every lattice vector, so it moves
every image shift of the neighbour list the same way: :func:`apply_strain` applies it to the
positions and to the edge shifts, and the energy's gradient with respect to ``eps`` is
``dE/deps``. The virial is ``W = -dE/deps`` and the stress, in ASE's convention,
``sigma = (1/V) dE/deps = -W/V`` in eV/Å³: positive components are tensile (the cell would
shrink if allowed), as for :mod:`ase.calculators.emt`; the pressure is ``-trace(sigma)/3``.
Voigt order is ASE's: xx, yy, zz, yz, xz, xy.

Along a non-periodic direction of a partly periodic cell (a slab, a wire) the strain still
moves the atoms but no image; ``V`` is then the volume of the whole cell, vacuum included, as
ASE's own calculators divide by it. A cell without a volume (a zero vector along a
non-periodic direction) has no stress, nor has a gas-phase structure:
:func:`stress_volume` raises ASE's ``PropertyNotImplementedError`` for both.
"""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import PropertyNotImplementedError
from ase.stress import full_3x3_to_voigt_6_stress


def apply_strain(positions: torch.Tensor, edge_shift: torch.Tensor | None, edge_index: torch.Tensor,
                 batch: torch.Tensor, num_graphs: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(positions (1 + eps), edge_shift (1 + eps), eps)`` with ``eps`` ``[num_graphs, 3, 3]`` zero.

    The gradient of an energy with respect to the returned ``eps`` is ``dE/deps`` (symmetric:
    only the symmetric part of ``eps`` acts). Each edge is strained with its receiver's structure.
    """
    strain = positions.new_zeros(num_graphs, 3, 3, requires_grad=True)
    symmetric = 0.5 * (strain + strain.transpose(1, 2))
    positions = positions + torch.bmm(positions.unsqueeze(1), symmetric[batch]).squeeze(1)
    if edge_shift is not None:
        edge_strain = symmetric[batch[edge_index[1]]]
        edge_shift = edge_shift + torch.bmm(edge_shift.unsqueeze(1), edge_strain).squeeze(1)
    return positions, edge_shift, strain


def stress_volume(atoms) -> float:
    """The volume (Å³) of ``atoms``' cell that divides ``dE/deps``.

    Raises ``PropertyNotImplementedError`` for a structure with no periodic direction and for a
    partly periodic one whose cell has no volume.
    """
    if not np.any(atoms.pbc):
        raise PropertyNotImplementedError("stress is defined for periodic cells only; these atoms have "
                                          "pbc=False (gas phase): there is no stress")
    volume = abs(float(np.linalg.det(np.asarray(atoms.cell[:], dtype=np.float64))))
    if not volume > 0.0:
        raise PropertyNotImplementedError(
            f"stress needs a cell with a volume; cell {np.asarray(atoms.cell[:]).tolist()} with pbc="
            f"{np.asarray(atoms.pbc).tolist()} has none: give the non-periodic directions nonzero cell vectors")
    return volume


def voigt_stress(virial: torch.Tensor, volume: float) -> np.ndarray:
    """Stress ``-virial / volume`` (eV/Å³) of one structure in ASE's Voigt order ``[6]`` (float64).

    Raises ``ValueError`` if it is not finite."""
    stress = full_3x3_to_voigt_6_stress(-virial.detach().to("cpu", torch.float64).numpy() / volume)
    if not np.isfinite(stress).all():
        raise ValueError(f"non-finite stress {stress.tolist()}")
    return stress
