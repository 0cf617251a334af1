"""Symmetry checks of a potential: rotations, translations, permutations.

A potential ``E(x)`` of positions ``x`` ``[N, 3]`` must satisfy, for every rotation ``R``,
translation ``t`` and permutation ``P`` of the atoms (atomic numbers permuted with them),

    E(x R^T) = E(x),  F(x R^T) = F(x) R^T,  E(x + t) = E(x),  F(P x) = P F(x).

The *local equivariance error* (LEE) is the per-atom violation of the force relation,

    LEE_i(x, R) = | F_i(x R^T) - F_i(x) R^T |   (meV/Å),

averaged (and maximised) over atoms, frames and Haar-random rotations. The network is
equivariant by construction, so the LEE only measures round-off: about ``1e-16`` relative
in float64, ``1e-7`` in float32; INT8 layers, which round features to a grid that is not
rotation invariant, are expected to show more.

Rotations are Haar-random float64 matrices, drawn as ``e3nn.o3.rand_matrix`` draws them
(Euler angles ``alpha, gamma ~ U(0, 2 pi)``, ``beta = arccos U(-1, 1)``, then
``o3.angles_to_matrix``) but from a private seeded generator, since ``rand_matrix`` uses
torch's global RNG. They must be float64: a float32 rotation matrix is orthogonal only to
~1e-7, which would be reported as an equivariance error of a float64 model. Positions are
rotated about their centroid in float64 and only then cast to the model dtype.

>>> result = check_equivariance("aspirin_fp32", numbers, positions)   # doctest: +SKIP
>>> assert result.lee_mean_meV_per_A < 1.0                           # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from e3nn import o3

from ..data.graph import molecules_to_graph


@dataclass
class EquivarianceResult:
    """Symmetry errors of a potential (all maxima over frames, rotations and atoms)."""

    lee_mean_meV_per_A: float  # mean |F(Rx) - R F(x)| per atom
    lee_max_meV_per_A: float
    rotation_energy_max_meV: float  # max |E(Rx) - E(x)|
    translation_energy_max_meV: float  # max |E(x + t) - E(x)|
    translation_forces_max_meV_per_A: float  # max |F_i(x + t) - F_i(x)|
    permutation_energy_max_meV: float  # max |E(Px) - E(x)|
    permutation_forces_max_meV_per_A: float  # max |F_i(Px) - (P F(x))_i|
    n_frames: int
    n_rotations: int
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` Haar-random rotation matrices ``[n, 3, 3]`` in float64 (see the module docstring)."""
    alpha, gamma = 2 * np.pi * rng.random((2, n))
    beta = np.arccos(2 * rng.random(n) - 1)
    angles = (torch.as_tensor(a, dtype=torch.float64) for a in (alpha, beta, gamma))
    return o3.angles_to_matrix(*angles).numpy()


def predict_batch(model, numbers: list[np.ndarray], positions: list[np.ndarray], dtype: torch.dtype,
                  device: str | torch.device = "cpu") -> tuple[np.ndarray, list[np.ndarray]]:
    """Energies (eV ``[B]``) and forces (eV/Å, one ``[n_b, 3]`` array per structure) of a batch."""
    graph = molecules_to_graph(numbers, positions, model.config.cutoff, dtype, device)
    out = model.energy_and_forces(graph.positions, model.species_index(graph.numbers), graph.edge_index,
                                  graph.batch, graph.num_graphs)
    forces = out["forces"].detach().to("cpu", torch.float64).numpy()
    split = np.cumsum([len(z) for z in numbers])[:-1]
    return out["energy"].detach().cpu().numpy(), np.split(forces, split)


def check_equivariance(model: str | os.PathLike | torch.nn.Module, numbers: np.ndarray, positions: np.ndarray, *,
                       n_rotations: int = 8, seed: int = 0, translation_A: float = 5.0,
                       dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
                       ) -> EquivarianceResult:
    """Rotation, translation and permutation errors of ``model`` on some structures.

    Args:
        model: shipped potential name, path, or built model (see
            :func:`qeq_ase.calculator.resolve_model`).
        numbers: atomic numbers ``[N]``.
        positions: Å, ``[F, N, 3]`` (or ``[N, 3]`` for one frame).
        n_rotations: Haar-random rotations per frame.
        seed: seeds the rotations, translations and permutations (a private generator).
        translation_A: translations are uniform in ``[-translation_A, translation_A]^3``.
        dtype: model dtype for names and paths (``"float32"`` or ``"float64"``).
    """
    from ..calculator import resolve_model

    model, _, dtype, _ = resolve_model(model, device, dtype)
    numbers = np.asarray(numbers)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim == 2:
        positions = positions[None]
    if positions.ndim != 3 or positions.shape[1:] != (len(numbers), 3):
        raise ValueError(f"positions must be [frames, {len(numbers)}, 3], got {positions.shape}")
    rng = np.random.default_rng(seed)
    lee, rot_e, trans_e, trans_f, perm_e, perm_f = [], [], [], [], [], []
    for x in positions:
        rotations = random_rotations(n_rotations, rng)
        x = x - x.mean(axis=0)  # in float64, as the calculator does, so that float32 keeps the precision
        shift = rng.uniform(-translation_A, translation_A, size=3)
        perm = rng.permutation(len(numbers))
        structures = [x] + [x @ r.T for r in rotations] + [x + shift, x[perm]]
        species = [numbers] * (n_rotations + 2) + [numbers[perm]]
        energy, forces = predict_batch(model, species, structures, dtype, device)
        f0 = forces[0]
        for k, r in enumerate(rotations, start=1):
            lee.append(np.linalg.norm(forces[k] - f0 @ r.T, axis=1))
        rot_e.append(np.abs(energy[1:n_rotations + 1] - energy[0]).max())
        trans_e.append(abs(energy[-2] - energy[0]))
        trans_f.append(np.linalg.norm(forces[-2] - f0, axis=1).max())
        perm_e.append(abs(energy[-1] - energy[0]))
        perm_f.append(np.linalg.norm(forces[-1] - f0[perm], axis=1).max())
    lee = 1e3 * np.concatenate(lee)
    return EquivarianceResult(
        lee_mean_meV_per_A=float(lee.mean()), lee_max_meV_per_A=float(lee.max()),
        rotation_energy_max_meV=1e3 * float(max(rot_e)), translation_energy_max_meV=1e3 * float(max(trans_e)),
        translation_forces_max_meV_per_A=1e3 * float(max(trans_f)),
        permutation_energy_max_meV=1e3 * float(max(perm_e)),
        permutation_forces_max_meV_per_A=1e3 * float(max(perm_f)),
        n_frames=len(positions), n_rotations=n_rotations, dtype=str(dtype).split(".")[-1],
    )
