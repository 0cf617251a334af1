"""Batched evaluation (qeq_ase.md.batch): many structures in one call equal one-at-a-time calls."""

import numpy as np
import pytest
from ase import Atoms

from qeq_ase.md.batch import evaluate_batch
from qeq_ase.calculator import QEqCalculator
from qeq_ase.data.dataset import load_rmd17
from qeq_ase.data.local_frame import OverlappingAtomsError
from qeq_ase.testing import TOLERANCES, precision_of



def rmd17_structures(rmd17_dir, molecule: str, frames: list[int]) -> list[Atoms]:
    data = load_rmd17(rmd17_dir / f"rmd17_{molecule}_test_01.npz")
    return [Atoms(numbers=data.numbers, positions=data.positions[k]) for k in frames]


def one_at_a_time(calc: QEqCalculator, structures: list[Atoms]) -> list[tuple[float, np.ndarray]]:
    return [(calc.get_potential_energy(a), calc.get_forces(a)) for a in structures]


def assert_same(batched, reference, precision: str) -> None:
    """Batched and one-at-a-time calls agree to ``TOLERANCES[precision].energy`` and ``.forces``."""
    tolerance = TOLERANCES[precision]
    assert len(batched) == len(reference)
    for (e, f), (e_ref, f_ref) in zip(batched, reference):
        assert isinstance(e, float) and f.dtype == np.float64 and f.shape == f_ref.shape
        assert abs(e - e_ref) <= tolerance.energy
        np.testing.assert_allclose(f, f_ref, rtol=0, atol=tolerance.forces)


@pytest.mark.parametrize("name", ["aspirin_fp32", "aspirin_int8"])
def test_mixed_molecules_and_sizes_match_single_calls(rmd17_dir, name):
    # aspirin (21 atoms), ethanol (9) and malonaldehyde (9) are all H, C, O; a lone atom has no edge
    structures = (rmd17_structures(rmd17_dir, "aspirin", [0, 1, 2]) + rmd17_structures(rmd17_dir, "ethanol", [0, 1])
                  + rmd17_structures(rmd17_dir, "malonaldehyde", [0]) + [Atoms("O", positions=[[1.0, 2.0, 3.0]])])
    calc = QEqCalculator(name)
    batched = calc.calculate_batch(structures)
    reference = one_at_a_time(calc, structures)
    assert_same(batched, reference, precision_of(calc))
    # different structures give different results (the batch is not one structure repeated)
    assert len({round(e, 3) for e, _ in batched}) == len(structures)
    # a batch of one is the calculator's computation exactly
    for atoms, (energy, forces) in zip(structures[:2], reference):
        (e, f), = calc.calculate_batch([atoms])
        assert e == energy and np.array_equal(f, forces)


def test_other_potential_and_chunked_calls(rmd17_dir):
    structures = rmd17_structures(rmd17_dir, "ethanol", list(range(6)))
    calc = QEqCalculator("ethanol_fp32")
    reference = one_at_a_time(calc, structures)
    assert_same(evaluate_batch(calc, structures), reference, precision_of(calc))
    chunked = evaluate_batch("ethanol_fp32", structures, max_atoms=20)  # 3 calls of 2 structures
    assert_same(chunked, reference, precision_of(calc))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_periodic_and_gas_phase_together(tiny_potential_path, aspirin_frames, dtype):
    numbers, positions = aspirin_frames.numbers, aspirin_frames.positions
    crowded = Atoms(numbers=numbers, positions=positions[1], cell=[7.0, 7.5, 8.0], pbc=True)  # sees its images
    slab = Atoms(numbers=numbers, positions=positions[2], cell=[6.5, 30.0, 30.0], pbc=[True, False, False])
    structures = [Atoms(numbers=numbers, positions=positions[0]), crowded, slab,
                  Atoms(numbers=numbers[:9], positions=positions[3][:9])]
    calc = QEqCalculator(tiny_potential_path, dtype=dtype)
    reference = one_at_a_time(calc, structures)
    assert_same(evaluate_batch(calc, structures), reference, precision_of(calc))
    # the images matter: the same crowded cell without periodic boundaries differs
    assert abs(reference[1][0] - calc.get_potential_energy(Atoms(numbers=numbers, positions=positions[1]))) > 1e-3


def test_calculator_state_and_inputs_are_untouched(tiny_potential_path, aspirin):
    calc = QEqCalculator(tiny_potential_path)
    aspirin.calc = calc
    energy = aspirin.get_potential_energy()
    results = {k: np.copy(v) for k, v in calc.results.items()}
    other = aspirin.copy()
    other.positions[0] += 0.1
    before = other.positions.copy()
    batched = calc.calculate_batch([other, aspirin])
    assert calc.atoms == aspirin and calc.results.keys() == results.keys()
    for key, value in results.items():
        np.testing.assert_array_equal(calc.results[key], value)
    np.testing.assert_array_equal(other.positions, before)
    assert other.calc is None and abs(batched[1][0] - energy) < 1e-4 and batched[0][0] != batched[1][0]


def test_errors_name_the_structure(tiny_potential_path, aspirin):
    calc = QEqCalculator(tiny_potential_path)
    nitrogen = Atoms("N2", positions=[[0, 0, 0], [0, 0, 1.1]])
    with pytest.raises(ValueError, match=r"structure 1: .*N \(Z=7\)"):
        calc.calculate_batch([aspirin, nitrogen])
    broken = aspirin.copy()
    broken.positions[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"structure 0: non-finite .*\[3\]"):
        calc.calculate_batch([broken])
    doubled = aspirin + aspirin[5:6]  # atom 21 sits on atom 5
    with pytest.raises(OverlappingAtomsError, match=r"structure 1: atoms (5 and 21|21 and 5) are 0 Å apart"):
        calc.calculate_batch([aspirin, doubled])
    with pytest.raises(TypeError, match="sequence of ase.Atoms"):
        calc.calculate_batch(aspirin)
    assert calc.calculate_batch([]) == []
    empty = calc.calculate_batch([Atoms()])
    assert empty[0][0] == 0.0 and empty[0][1].shape == (0, 3)
