"""Per-element reference energies, fitted by least squares on the training set.

The network predicts only what is left after ``sum_i E_ref[Z_i]``; rMD17 totals are
~ -17,600 eV for aspirin, far beyond what float32 resolves to meV.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def fit_reference_energies(numbers: Sequence[np.ndarray], energy: np.ndarray, species: Sequence[int]) -> np.ndarray:
    """Least-squares ``E_ref`` (eV per element, ordered like ``species``) with ``E ~ counts @ E_ref``.

    For a single molecule the composition matrix has rank 1 and the minimum-norm solution
    is returned: it reproduces the mean energy, which is all that matters there.
    """
    species = list(species)
    column = {z: k for k, z in enumerate(species)}
    counts = np.zeros((len(numbers), len(species)))
    for row, z in enumerate(numbers):
        for element, n in zip(*np.unique(np.asarray(z), return_counts=True)):
            if element not in column:
                raise ValueError(f"element Z={element} is not in species {species}")
            counts[row, column[element]] = n
    ref, *_ = np.linalg.lstsq(counts, np.asarray(energy, dtype=np.float64), rcond=None)
    return ref
