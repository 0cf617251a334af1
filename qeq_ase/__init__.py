"""qeq-ase: quantized SO(3)-equivariant neural network potentials for ASE.

Data path, top to bottom: :mod:`~qeq_ase.data.dataset` (rMD17 in eV/Å) -> :mod:`~qeq_ase.data.graph`
and :mod:`~qeq_ase.data.neighbors` (edges within the cutoff) -> :mod:`~qeq_ase.model.network`
(equivariant attention, :mod:`~qeq_ase.model.attention`) -> energy and autograd forces ->
:mod:`~qeq_ase.calculator` -> MD (:mod:`~qeq_ase.md.driver`). Subpackages: ``data``, ``model``,
``quant``, ``kernels``, ``md``, ``checks``, ``train``, ``io``, ``cli``, ``tools``
(``docs/architecture.md``, "Package layout").
"""

from .calculator import QEqCalculator
from .checks.conservation import ConservationResult, check_energy_conservation
from .checks.equivariance import EquivarianceResult, check_equivariance
from .data.dataset import Frames, load_rmd17, train_val_split
from .io.checkpoint import PotentialFileError, load_potential_file, save_potential
from .io.registry import list_potentials, load_model
from .md.driver import MDSummary, run_md
from .model.network import ModelConfig, QEqModel

__version__ = "0.1.0"

__all__ = [
    "ConservationResult", "EquivarianceResult", "Frames", "MDSummary", "ModelConfig", "PotentialFileError",
    "QEqCalculator", "QEqModel", "check_energy_conservation", "check_equivariance", "list_potentials",
    "load_model", "load_potential_file", "load_rmd17", "run_md", "save_potential", "train_val_split",
]
