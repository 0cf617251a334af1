"""Stress of periodic cells: strain finite differences, INT8, gas phase, NPT MD, i-PI virial."""

import sys

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.geometry import cellpar_to_cell

from qeq_ase.calculator import QEqCalculator
from ipi_harness import IPI_SCRIPT, needs_ipi, start, wait_for

#: A general triclinic cell (rows, Å), lower-triangular like i-PI's and ASE's cellpar cells.
TRICLINIC_CELLPAR = [8.2, 8.8, 9.1, 78.0, 97.0, 105.0]
VOIGT_PAIRS = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]


def ethanol_box(n: int, cell, seed: int = 0, pbc=True) -> Atoms:
    """``n`` randomly rotated ethanol molecules in ``cell``, some atoms outside it (unwrapped)."""
    rng = np.random.default_rng(seed)
    cell = np.asarray(cell, dtype=float)
    atoms = Atoms(cell=cell, pbc=pbc)
    centers = [[0.05, 0.1, 0.1], [0.5, 0.55, 0.35], [0.3, 0.85, 0.7], [0.8, 0.3, 0.8]]
    for k in range(n):
        ethanol = molecule("CH3CH2OH")
        ethanol.rotate(rng.uniform(0, 360), rng.normal(size=3), center="COM")
        ethanol.translate(np.array(centers[k]) @ cell - ethanol.get_center_of_mass())
        atoms += ethanol
    atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
    return atoms


def strained(atoms: Atoms, a: int, b: int, h: float) -> Atoms:
    """``atoms`` (cell and positions) under the symmetric strain ``eps_ab = eps_ba = h / 2``."""
    eps = np.zeros((3, 3))
    eps[a, b] += 0.5 * h
    eps[b, a] += 0.5 * h
    out = atoms.copy()
    out.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
    return out


def finite_difference_stress(atoms: Atoms, calc, h: float) -> np.ndarray:
    """``(1/V) dE/deps`` by central differences, ASE's Voigt order (eV/Å³)."""
    out = np.zeros(6)
    for k, (a, b) in enumerate(VOIGT_PAIRS):
        energies = []
        for sign in (1, -1):
            moved = strained(atoms, a, b, sign * h)
            moved.calc = calc
            energies.append(moved.get_potential_energy())
        out[k] = (energies[0] - energies[1]) / (2 * h) / atoms.get_volume()
    return out


def relative_error(stress: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(stress - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_stress_is_the_strain_derivative_of_the_energy(tiny_potential_path, backend):
    """float64, triclinic cell with images, all six components: central differences, h = 1e-5.
    Measured: 1.2e-8 relative to the largest component (the energy's float64 rounding over 2h),
    the same for the fused and the eager edge path."""
    calc = QEqCalculator(tiny_potential_path, dtype="float64", edge_backend=backend)
    atoms = ethanol_box(3, cellpar_to_cell(TRICLINIC_CELLPAR))
    assert np.any(atoms.get_scaled_positions(wrap=False) < 0)  # unwrapped atoms are part of the test
    atoms.calc = calc
    stress = atoms.get_stress()
    assert stress.shape == (6,) and np.abs(stress[3:]).min() > 1e-3 * np.abs(stress).max()  # a general tensor
    assert relative_error(stress, finite_difference_stress(atoms, calc, 1e-5)) < 1e-7


def test_shipped_potential_stress_in_float64():
    """ethanol_fp32 in float64, four molecules, triclinic cell. Measured 1.1e-8 with h = 1e-5."""
    calc = QEqCalculator("ethanol_fp32", dtype="float64")
    atoms = ethanol_box(4, cellpar_to_cell(TRICLINIC_CELLPAR), seed=1)
    atoms.calc = calc
    assert relative_error(atoms.get_stress(), finite_difference_stress(atoms, calc, 1e-5)) < 1e-6


def test_finite_differences_follow_ase_convention():
    """The finite difference the tests compare with gives ASE's EMT stress (sign, Voigt order,
    1/V), so a stress that matches it follows ASE's convention (positive = tensile)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    copper = bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 1, 1)
    copper.rattle(0.05, seed=1)
    copper.set_cell(copper.cell[:] @ (np.eye(3) + [[0, 0.02, 0], [0.02, 0, 0.01], [0, 0.01, 0]]), scale_atoms=True)
    calc = EMT()
    copper.calc = calc
    stress = copper.get_stress()
    assert np.abs(stress[3:]).min() > 1e-3 * np.abs(stress).max()
    assert relative_error(stress, finite_difference_stress(copper, calc, 1e-5)) < 1e-7


def test_partly_periodic_stress(tiny_potential_path):
    """pbc [T, T, F] with a vacuum cell vector: the same strain derivative, divided by the
    volume of the whole cell (as ASE's calculators do); a zero vector there: no stress."""
    calc = QEqCalculator(tiny_potential_path, dtype="float64")
    cell = cellpar_to_cell([8.0, 8.5, 20.0, 90.0, 90.0, 110.0])
    slab = ethanol_box(2, cell, pbc=[True, True, False])
    slab.calc = calc
    assert relative_error(slab.get_stress(), finite_difference_stress(slab, calc, 1e-5)) < 1e-7
    flat = slab.copy()
    flat.cell[2] = 0.0
    flat.calc = calc
    flat.get_forces()  # energy and forces are defined
    with pytest.raises(PropertyNotImplementedError, match="volume"):
        flat.get_stress()


def test_gas_phase_has_no_stress(tiny_potential_path, aspirin):
    calc = QEqCalculator(tiny_potential_path)
    for cell in (None, [30.0, 30.0, 30.0]):  # a cell without periodic directions does not count
        atoms = aspirin.copy()
        if cell is not None:
            atoms.cell = cell
        atoms.calc = calc
        with pytest.raises(PropertyNotImplementedError, match="gas phase"):
            atoms.get_stress()
        assert np.isfinite(atoms.get_forces()).all()  # the calculator still works
    empty = Atoms(cell=[5.0, 5.0, 5.0], pbc=True)
    empty.calc = calc
    assert np.array_equal(empty.get_stress(), np.zeros(6))


def test_stress_only_when_asked(tiny_potential_path):
    """Energy and forces do not compute it, and asking for it changes neither."""
    calc = QEqCalculator(tiny_potential_path)
    atoms = ethanol_box(2, cellpar_to_cell(TRICLINIC_CELLPAR))
    atoms.calc = calc
    forces = atoms.get_forces()
    energy = atoms.get_potential_energy()
    assert "stress" not in calc.results
    other = atoms.copy()
    other.calc = QEqCalculator(tiny_potential_path)
    stress = other.get_stress()
    assert np.isfinite(stress).all()
    assert set(other.calc.results) >= {"energy", "forces", "stress"}
    np.testing.assert_array_equal(other.calc.results["forces"], forces)
    assert other.calc.results["energy"] == energy


@pytest.fixture(scope="module")
def ethanol_calculators():
    return {name: QEqCalculator(name) for name in ("ethanol_fp32", "ethanol_int8")}


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_stress(ethanol_calculators, seed):
    """ethanol_int8 (float32, two-limb activations) on three ethanols in a triclinic cell.
    Measured, relative to the largest component, on six such boxes (seeds 0-5): 0.15-0.4% from
    ethanol_fp32's stress, 0.3-1.0% from its own finite differences with h = 1e-2 (ethanol_fp32:
    0.3-0.5%, the step's truncation error; smaller steps see the quantization), 0.6-2.2e-5 between
    the fused and the eager edge path."""
    atoms = ethanol_box(3, cellpar_to_cell(TRICLINIC_CELLPAR), seed=seed)
    stress = {}
    for name, calc in ethanol_calculators.items():
        copy = atoms.copy()
        copy.calc = calc
        stress[name] = copy.get_stress()
    int8 = stress["ethanol_int8"]
    assert relative_error(int8, stress["ethanol_fp32"]) < 0.02
    assert relative_error(int8, finite_difference_stress(atoms, ethanol_calculators["ethanol_int8"], 1e-2)) < 0.04
    eager = atoms.copy()
    eager.calc = QEqCalculator("ethanol_int8", edge_backend="eager")
    assert relative_error(eager.get_stress(), int8) < 2e-4


def test_npt_md_of_an_ethanol_box(ethanol_calculators):
    """ASE's isotropic MTK barostat (ase.md.nose_hoover_chain.IsotropicMTKNPT) with ethanol_int8,
    two ethanols in a 7.5 Å box, 250 steps of 0.5 fs: the box starts under pressure and expands,
    and the integrator's conserved energy stays put only if the stress is the volume derivative
    of the energy. Measured: volume 422 -> 527 Å³, conserved energy within 3.7 meV (with the
    stress's sign flipped: 680 Å³ and 573 meV). 7-12 s on the shared 2-core machine."""
    from ase.md.nose_hoover_chain import IsotropicMTKNPT
    from ase.md.velocitydistribution import thermalize_momenta

    atoms = ethanol_box(2, np.diag([7.5, 7.5, 7.5]))
    atoms.calc = ethanol_calculators["ethanol_int8"]
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = IsotropicMTKNPT(atoms, timestep=0.5 * units.fs, temperature_K=300, pressure_au=1.0 * units.bar,
                          tdamp=50 * units.fs, pdamp=250 * units.fs)
    volume0, conserved0 = atoms.get_volume(), dyn.get_conserved_energy()
    records = []
    for _ in range(5):
        dyn.run(50)
        records.append((atoms.get_volume(), atoms.get_potential_energy(), dyn.get_conserved_energy(),
                        atoms.get_temperature()))
    assert np.isfinite(records).all()
    volume, _, conserved, temperature = np.array(records).T
    assert volume[-1] / volume0 > 1.1
    assert np.abs(conserved - conserved0).max() < 0.02
    assert temperature.max() < 1000


#: i-PI input: one bead of a periodic cell, one step; potential and virial (atomic units).
PERIODIC_INPUT_XML = """<simulation verbosity="low" floatformat="%.17e" sockets_prefix="{prefix}">
  <output prefix="run">
    <properties stride="1" filename="out"> [ step, potential, virial_md ] </properties>
  </output>
  <total_steps> 1 </total_steps>
  <prng> <seed> 12345 </seed> </prng>
  <ffsocket name="qeq" mode="unix" pbc="true"> <address> qeq </address> </ffsocket>
  <system>
    <initialize nbeads="1">
      <file mode="xyz"> start.xyz </file>
      <velocities mode="thermal" units="kelvin"> 300 </velocities>
    </initialize>
    <forces> <force forcefield="qeq"> </force> </forces>
    <motion mode="dynamics"> <dynamics mode="nve"> <timestep units="femtosecond"> 0.5 </timestep> </dynamics> </motion>
  </system>
</simulation>
"""


@needs_ipi
def test_ipi_gets_the_virial_of_a_periodic_cell(tmp_path, tiny_potential_path, processes):  # noqa: F811
    """qeq-ipi serves a periodic structure with ``virial = -volume * stress``: i-PI's recorded
    ``virial_md`` (virial / volume, [xx, yy, zz, xy, xz, yz]) is our ``-stress``."""
    atoms = ethanol_box(2, cellpar_to_cell(TRICLINIC_CELLPAR))
    atoms.wrap()
    cellpar = " ".join(f"{x:.17g}" for x in atoms.cell.cellpar())
    lines = [str(len(atoms)), f"# CELL(abcABC): {cellpar} cell{{angstrom}} positions{{angstrom}}"]
    lines += [f"{s} {x:.17g} {y:.17g} {z:.17g}" for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions)]
    (tmp_path / "start.xyz").write_text("\n".join(lines) + "\n")
    atoms.write(tmp_path / "client.extxyz")  # the client's atoms carry the cell and pbc
    (tmp_path / "input.xml").write_text(PERIODIC_INPUT_XML.format(prefix=f"{tmp_path}/"))
    server = start(processes, [sys.executable, IPI_SCRIPT, "input.xml"], tmp_path / "ipi.log", tmp_path)
    client = start(processes, [sys.executable, "-m", "qeq_ase.md.ipi", "client.extxyz", "--model", str(tiny_potential_path),
                               "--unix", str(tmp_path / "qeq"), "--connect-timeout", "30"], tmp_path / "client.log", tmp_path)
    logs = [tmp_path / "ipi.log", tmp_path / "client.log"]
    wait_for(server, [client], logs, timeout_s=60)
    assert server.returncode == 0, logs[0].read_text()[-2000:]
    client.wait(timeout=10)
    assert client.returncode == 0 and "the virial sent to i-PI is -volume * stress" in logs[1].read_text()
    rows = [line.split() for line in (tmp_path / "run.out").read_text().splitlines() if not line.startswith("#")]
    step0 = np.array(rows[0], dtype=np.float64)
    atoms.calc = QEqCalculator(tiny_potential_path)
    assert abs(step0[1] * units.Ha - atoms.get_potential_energy()) < 1e-5
    virial_md = step0[2:8] * units.Ha / units.Bohr**3  # eV/Å³
    ours = -atoms.get_stress()[[0, 1, 2, 5, 4, 3]]  # i-PI's order: xx yy zz xy xz yz
    assert np.abs(ours).max() > 1e-4
    assert relative_error(virial_md, ours) < 1e-5
