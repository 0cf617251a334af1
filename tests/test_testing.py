"""The test kit (qeq_ase.testing): its assertions pass on correct potentials and fail on broken ones."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from qeq_ase.calculator import QEqCalculator
from qeq_ase.testing import (TOLERANCES, assert_equivariant, assert_forces_match_finite_differences, precision_of,
                             tiny_model)

ETHANOL = molecule("CH3CH2OH")


def harmonic(numbers, positions, weights=None, field=np.zeros(3), force_offset=np.zeros(3)):
    """``E = sum_i w_i |x_i - c|^2 + field . sum_i (x_i - c)_z^2`` about the centroid ``c``,
    and its exact forces plus ``force_offset``. With the defaults: a symmetric potential."""
    weights = np.ones(len(numbers)) if weights is None else weights
    d = positions - positions.mean(axis=0)
    energy = float((weights * (d ** 2).sum(axis=1)).sum() + field @ (d ** 2).sum(axis=0))
    gradient = 2 * weights[:, None] * d + 2 * field * d
    gradient -= (2 * weights[:, None] * d).sum(axis=0) / len(numbers)  # through the centroid
    return energy, -gradient + force_offset


def test_tolerance_table_covers_the_precisions():
    assert set(TOLERANCES) == {"float64", "float32", "int8"}
    assert TOLERANCES["float64"].fd_forces < TOLERANCES["float32"].fd_forces
    assert TOLERANCES["int8"].fd_step is None  # the int8 energy is piecewise constant


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kit_passes_on_the_tiny_model_and_its_calculator(dtype):
    model = tiny_model(dtype, neighbor_embedding=True)
    structure = (ETHANOL.numbers, ETHANOL.positions)
    name = str(dtype).removeprefix("torch.")
    for potential in (model, QEqCalculator(model)):
        assert precision_of(potential) == name
        assert set(assert_equivariant(potential, structure)) == {"energy", "forces"}
        assert 0 < assert_forces_match_finite_differences(potential, ETHANOL) <= TOLERANCES[name].fd_forces


def test_periodic_cell_rotates_with_the_atoms():
    """A cell shorter than the cutoff (the atoms see their images): symmetric only if the cell rotates too."""
    atoms = Atoms("COH", positions=[[0, 0, 0], [1.2, 0.3, 0.1], [-0.5, 0.9, 0.2]], cell=[3.0, 3.5, 4.0], pbc=True)
    calc = QEqCalculator(tiny_model())
    assert_equivariant(calc, atoms, rotations=2)
    assert_forces_match_finite_differences(calc, atoms, components=3)
    with pytest.raises(ValueError, match="periodic"):
        assert_equivariant(tiny_model(), atoms)


def test_symmetric_function_passes():
    assert assert_equivariant(harmonic, ETHANOL)["forces"] < 1e-13
    assert assert_forces_match_finite_differences(harmonic, ETHANOL, components=None) < 1e-8


@pytest.mark.parametrize("broken, message", [
    (dict(field=np.array([0.0, 0.0, 0.1])), r"energy not invariant: .* under rotation"),
    (dict(force_offset=np.array([0.1, 0.0, 0.0])), r"forces not equivariant: .* under rotation"),
    (dict(weights=1 + np.arange(9) / 9), r"energy not invariant: .* under a permutation of the atoms"),
])
def test_equivariance_fails_on_a_broken_symmetry(broken, message):
    with pytest.raises(AssertionError, match=message):
        assert_equivariant(lambda z, x: harmonic(z, x, **broken), ETHANOL)
    if "force_offset" not in broken:  # only the symmetry is broken: the forces are still -dE/dx
        assert_forces_match_finite_differences(lambda z, x: harmonic(z, x, **broken), ETHANOL, components=None)


def test_equivariance_fails_on_a_model_in_an_external_field(monkeypatch):
    """E += 0.01 eV/Å * sum_i x_i: the energy depends on the orientation and the position."""
    model = tiny_model()
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda positions, *args, **kwargs:
                        forward(positions, *args, **kwargs) + 0.01 * positions[:, 0])
    with pytest.raises(AssertionError, match=r"float64 tolerances: energy not invariant: .*; forces not equivariant"):
        assert_equivariant(model, ETHANOL)
    with pytest.raises(AssertionError, match="forces not equivariant"):
        assert_equivariant(QEqCalculator(model), ETHANOL)


@pytest.mark.parametrize("scale", [-1.0, 1.001])
def test_finite_differences_fail_when_forces_are_not_minus_the_gradient(scale):
    def scaled(numbers, positions):
        energy, forces = harmonic(numbers, positions)
        return energy, scale * forces

    with pytest.raises(AssertionError, match=r"forces are not -dE/dx \(float64: \d+ of 6 components"):
        assert_forces_match_finite_differences(scaled, ETHANOL)


def test_finite_differences_fail_on_a_calculator_with_scaled_forces(monkeypatch):
    """5% too large forces of the tiny float32 model (|F| up to 0.5 eV/Å here): beyond the float32 tolerance."""
    model = tiny_model(torch.float32)
    energy_and_forces = model.energy_and_forces
    monkeypatch.setattr(model, "energy_and_forces", lambda *args, **kwargs:
                        {**(out := energy_and_forces(*args, **kwargs)), "forces": 1.05 * out["forces"]})
    with pytest.raises(AssertionError, match=r"float32: .* worst atom \d+ [xyz]: force"):
        assert_forces_match_finite_differences(QEqCalculator(model), ETHANOL)


def test_nan_fails():
    def nan_forces(numbers, positions):
        return harmonic(numbers, positions)[0], np.full(positions.shape, np.nan)

    with pytest.raises(AssertionError, match="forces not equivariant: .* = inf"):
        assert_equivariant(nan_forces, ETHANOL)
    with pytest.raises(AssertionError, match="forces are not -dE/dx"):
        assert_forces_match_finite_differences(nan_forces, ETHANOL)
    with pytest.raises(AssertionError, match="energy not invariant"):
        assert_equivariant(lambda z, x: (np.nan, harmonic(z, x)[1]), ETHANOL)


def test_int8_and_unknown_precisions_are_refused():
    with pytest.raises(ValueError, match="piecewise constant"):
        assert_forces_match_finite_differences(tiny_model(), ETHANOL, precision="int8")
    with pytest.raises(ValueError, match="unknown precision 'float16'"):
        assert_equivariant(tiny_model(), ETHANOL, precision="float16")


def test_global_rng_state_is_untouched():
    numpy_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    assert_equivariant(harmonic, ETHANOL, seed=3)
    assert_forces_match_finite_differences(harmonic, ETHANOL, seed=3)
    assert np.array_equal(np.random.get_state()[1], numpy_state) and torch.equal(torch.get_rng_state(), torch_state)
