"""The temperature `nose-hoover` holds with a fixed centre of mass (docs/calculator_and_md.md).

13 Lennard-Jones argon atoms (ASE's LennardJones, no model needed) with FixCom, 36 free degrees
of freedom, 30 K target, 5 fs steps, 36,000 steps after a 4,000-step warm-up; the mean of
ASE's reported temperature with its standard error over 20 blocks. Unscaled, ASE's chain would
hold all 39 degrees of freedom at 30 K and the 36 free ones at 32.5 K.

    PYTHONPATH=. python experiments/nose_hoover_temperature.py
"""

import numpy as np
from ase.calculators.lj import LennardJones
from ase.cluster import Icosahedron
from ase.constraints import FixCom
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from qeq_ase.md.integrators import INTEGRATORS

TARGET_K = 30.0

atoms = Icosahedron("Ar", 2)
atoms.calc = LennardJones(sigma=3.4, epsilon=0.0104, rc=10.0)
atoms.set_constraint(FixCom())
MaxwellBoltzmannDistribution(atoms, temperature_K=TARGET_K, rng=np.random.default_rng(0))
settings = {"timestep_fs": 5.0, "temperature_K": TARGET_K, "tdamp_fs": 500.0, "tchain": 3}
dyn = INTEGRATORS["nose-hoover"].build(atoms, settings, np.random.default_rng(0))
temperatures = []
for step in range(40_000):
    dyn.step()
    if step >= 4_000:
        temperatures.append(atoms.get_temperature())
blocks = np.array(temperatures).reshape(20, -1).mean(axis=1)
dof = atoms.get_number_of_degrees_of_freedom()
print(f"{len(atoms)} atoms, {dof} free degrees of freedom: mean T {blocks.mean():.2f} K "
      f"+- {blocks.std() / np.sqrt(len(blocks)):.2f} (target {TARGET_K:g} K; unscaled: "
      f"{TARGET_K * 3 * len(atoms) / dof:.1f} K)")
