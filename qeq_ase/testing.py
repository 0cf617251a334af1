"""What the tests build again and again, for the package's tests and for users' own (as
``e3nn.util.test``): a tiny random potential and one energy + forces evaluation of it.

>>> import numpy as np
>>> from qeq_ase.testing import predict, tiny_model
>>> model = tiny_model()                                  # float64, 3 species, 2 layers
>>> energy, forces = predict(model, np.array([8, 1, 1]), np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
>>> forces.shape
(3, 3)
"""

from __future__ import annotations

import numpy as np
import torch

from .data.graph import molecules_to_graph
from .model.network import ModelConfig, QEqModel

#: Reference energies of the tiny model (eV per H, C, O): nonzero, so that they are tested.
TINY_REFERENCE_ENERGY_EV = [-13.6, -1029.0, -2041.0]


def tiny_model(dtype: torch.dtype = torch.float64, seed: int = 0, reference_energy: bool = True,
               **overrides) -> QEqModel:
    """A small random model for H, C and O (16 features, 2 layers, 2 heads, 8 radial functions),
    in eval mode. ``overrides`` change :class:`~qeq_ase.model.network.ModelConfig` fields; the
    weights come from ``seed`` without touching torch's global RNG."""
    config = ModelConfig(**{"species": [1, 6, 8], "num_features": 16, "num_layers": 2, "num_heads": 2,
                            "num_radial": 8, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = QEqModel(config)
    model = model.to(dtype)
    if reference_energy:
        model.reference_energy = torch.tensor(TINY_REFERENCE_ENERGY_EV, dtype=torch.float64)
    return model.eval()


def predict(model: QEqModel, numbers: np.ndarray, positions: np.ndarray) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å, ``[N, 3]``) of one molecule, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    graph = molecules_to_graph([numbers], [positions], model.config.cutoff, dtype)
    out = model.energy_and_forces(graph.positions, model.species_index(graph.numbers), graph.edge_index,
                                  graph.batch, graph.num_graphs)
    return out["energy"].item(), out["forces"].detach().numpy()
