"""qeq-ase: quantized SO(3)-equivariant neural network potentials for ASE.

Data path, top to bottom: :mod:`~qeq_ase.dataset` (rMD17 in eV/Å) -> :mod:`~qeq_ase.graph`
and :mod:`~qeq_ase.neighbors` (edges within the cutoff) -> :mod:`~qeq_ase.model` (equivariant
attention, :mod:`~qeq_ase.attention`) -> energy and autograd forces -> calculator -> MD.
"""

from .calculator import QEqCalculator
from .checkpoint import PotentialFileError, load_potential_file, save_potential
from .dataset import Frames, load_rmd17, train_val_split
from .conservation import ConservationResult, check_energy_conservation
from .equivariance import EquivarianceResult, check_equivariance
from .md import MDSummary, run_md
from .model import ModelConfig, QEqModel
from .registry import list_potentials, load_model

__version__ = "0.1.0"

__all__ = [
    "ConservationResult", "EquivarianceResult", "Frames", "MDSummary", "ModelConfig", "PotentialFileError",
    "QEqCalculator", "QEqModel", "check_energy_conservation", "check_equivariance", "list_potentials",
    "load_model", "load_potential_file", "load_rmd17", "run_md", "save_potential", "train_val_split",
]
