"""What a potential is to the rest of the package, and the registry of architectures.

The calculator, the checks, MD, the trainer, QAT and the INT8 converter use a model only
through :class:`Potential`, and build one only through :func:`build_potential` (by the
architecture name a potential file records). A new architecture is a config class and a
model class that follow these protocols, made known with :func:`register_architecture`.
It is quantizable when it builds every linear layer and feature observer from the
:class:`~qeq_ase.model.layers.LayerFactory` it is given: QAT passes a factory of
fake-quantized twins, and the INT8 converter swaps those for int8 layers.

>>> from qeq_ase.model.network import ModelConfig
>>> model = build_potential("qeq-transformer", ModelConfig(species=[1, 8], num_features=16, num_layers=1,
...                                                        num_heads=2, num_radial=8))
>>> isinstance(model, Potential)
True
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch

from .layers import LayerFactory
from .network import ModelConfig, QEqModel


class PotentialConfig(Protocol):
    """A model's hyper-parameters, saved in potential files."""

    species: list[int]  # atomic numbers, in embedding order
    cutoff: float       # Å

    def to_dict(self) -> dict: ...

    @classmethod
    def from_dict(cls, values: dict) -> "PotentialConfig": ...


@runtime_checkable
class Potential(Protocol):
    """A model as the package uses it (:class:`~qeq_ase.model.network.QEqModel` is one).

    ``model_class(config, factory=None)`` builds it; ``energy_and_forces`` returns float64
    ``energy [num_graphs]`` and ``energies [N]`` (eV, reference energies included),
    ``forces [N, 3]`` (eV/Å), ``interaction_energy [num_graphs]`` (model dtype) and, with
    ``virial=True``, ``virial [num_graphs, 3, 3]`` (eV). The trainer sets
    ``reference_energy`` (float64 eV per species) and ``energy_scale``.
    """

    architecture: ClassVar[str]
    config: PotentialConfig
    reference_energy: torch.Tensor
    energy_scale: torch.Tensor

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor: ...

    def energy_and_forces(self, positions: torch.Tensor, species: torch.Tensor, edge_index: torch.Tensor,
                          batch: torch.Tensor, num_graphs: int, edge_shift: torch.Tensor | None = None,
                          training: bool = False, virial: bool = False) -> dict[str, torch.Tensor]: ...

    def set_edge_backend(self, choice: str) -> "Potential": ...


#: Architectures by the name potential files record: ``name -> (config class, model class)``.
ARCHITECTURES: dict[str, tuple[type, type]] = {QEqModel.architecture: (ModelConfig, QEqModel)}


def register_architecture(config_class: type, model_class: type) -> None:
    """Make ``model_class.architecture`` buildable and loadable (float, QAT and INT8 files)."""
    ARCHITECTURES[model_class.architecture] = (config_class, model_class)


def architecture_classes(name: str) -> tuple[type, type]:
    """``(config class, model class)`` of a registered architecture; ValueError naming the known ones."""
    if name not in ARCHITECTURES:
        raise ValueError(f"this qeq-ase knows {sorted(ARCHITECTURES)}, not {name!r}")
    return ARCHITECTURES[name]


def build_potential(architecture: str, config, factory: LayerFactory | None = None) -> Potential:
    """A new model of ``architecture`` with random weights, its layers made by ``factory``.

    ``config`` is the architecture's config object or a dict for its ``from_dict``. The
    weights come from torch's RNG inside a fork, so the caller's RNG state is left as it was.
    """
    config_class, model_class = architecture_classes(architecture)
    if isinstance(config, dict):
        config = config_class.from_dict(config)
    with torch.random.fork_rng(devices=[]):
        return model_class(config, factory=factory)
