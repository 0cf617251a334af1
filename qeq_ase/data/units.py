"""Unit conventions: qeq-ase works in ASE units, eV and Å, everywhere.

rMD17 stores energies in kcal/mol and forces in kcal/mol/Å; they are converted on load:

>>> from qeq_ase.data.units import KCAL_PER_MOL_IN_EV
>>> round(1.0 * KCAL_PER_MOL_IN_EV, 5)   # 1 kcal/mol in eV
0.04336
"""

from ase import units

#: 1 kcal/mol expressed in eV (ASE's CODATA constants: 0.0433641... eV).
KCAL_PER_MOL_IN_EV: float = units.kcal / units.mol

#: Energies inside qeq-ase: eV; forces: eV/Å; lengths: Å; MD time: fs.
ENERGY_UNIT = "eV"
FORCE_UNIT = "eV/Å"
LENGTH_UNIT = "Å"
