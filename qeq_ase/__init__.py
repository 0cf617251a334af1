"""qeq-ase: quantized SO(3)-equivariant neural network potentials for ASE.

Data path, top to bottom: :mod:`~qeq_ase.dataset` (rMD17 in eV/Å) -> :mod:`~qeq_ase.graph`
and :mod:`~qeq_ase.neighbors` (edges within the cutoff) -> :mod:`~qeq_ase.model` (equivariant
attention, :mod:`~qeq_ase.attention`) -> energy and autograd forces -> calculator -> MD.
"""

from .checkpoint import PotentialFileError, load_potential_file, save_potential
from .dataset import Frames, load_rmd17, train_val_split
from .model import ModelConfig, QEqModel
from .registry import list_potentials, load_model

__version__ = "0.1.0"

__all__ = [
    "Frames", "ModelConfig", "PotentialFileError", "QEqModel", "list_potentials", "load_model",
    "load_potential_file", "load_rmd17", "save_potential", "train_val_split",
]
