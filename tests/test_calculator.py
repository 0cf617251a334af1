"""The ASE calculator contract: properties, units, forces = -dE/dx, caching, errors, no global state."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

from qeq_ase.calculator import QEqCalculator
from qeq_ase.io.checkpoint import PotentialFileError, save_potential
from qeq_ase.data.graph import molecules_to_graph
from qeq_ase.data.local_frame import local_positions
from qeq_ase.testing import assert_equivariant, assert_forces_match_finite_differences
from conftest import build_tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_properties_shapes_and_units(tiny_potential_path, aspirin):
    calc = QEqCalculator(tiny_potential_path)
    aspirin.calc = calc
    energy = aspirin.get_potential_energy()
    forces = aspirin.get_forces()
    energies = aspirin.get_potential_energies()
    assert isinstance(energy, float)
    assert aspirin.get_potential_energy(force_consistent=True) == energy  # free_energy
    assert forces.shape == (len(aspirin), 3) and forces.dtype == np.float64
    assert energies.shape == (len(aspirin),)
    assert energies.sum() == pytest.approx(energy, abs=1e-9)
    # energy and forces are the model's output in eV and eV/Å, reference energies included,
    # for the positions moved to the local frame the calculator gives the model
    model = calc.model
    graph = molecules_to_graph([aspirin.numbers], [local_positions(aspirin.positions)], model.config.cutoff,
                               torch.float32)
    out = model.energy_and_forces(graph.positions, model.species_index(graph.numbers), graph.edge_index,
                                  graph.batch, 1)
    assert energy == pytest.approx(out["energy"].item(), abs=1e-9)
    np.testing.assert_allclose(forces, out["forces"].detach().numpy(), atol=1e-6)
    assert energy < -17000  # aspirin with H/C/O reference energies of -13.6/-1029/-2041 eV


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_forces_are_minus_energy_gradient(tiny_potential_path, aspirin, dtype):
    """All components; float64 to 1e-6 eV/Å, float32 to 2e-3 eV/Å (TOLERANCES)."""
    assert_forces_match_finite_differences(QEqCalculator(tiny_potential_path, dtype=dtype), aspirin, components=None)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_calculator_is_rotation_translation_and_permutation_invariant(tiny_potential_path, aspirin, dtype):
    assert_equivariant(QEqCalculator(tiny_potential_path, dtype=dtype), aspirin)


def test_caching_follows_check_state(tiny_potential_path, aspirin, monkeypatch):
    calc = QEqCalculator(tiny_potential_path)
    calls = []
    original = calc.model.energy_and_forces
    monkeypatch.setattr(calc.model, "energy_and_forces", lambda *a, **k: calls.append(1) or original(*a, **k))
    aspirin.calc = calc
    forces = aspirin.get_forces()
    aspirin.get_forces()
    aspirin.get_potential_energy()
    aspirin.get_potential_energies()
    assert len(calls) == 1
    aspirin.positions[0, 0] += 0.01
    assert not np.allclose(aspirin.get_forces(), forces)
    assert len(calls) == 2


def test_check_state_agrees_with_ase(tiny_potential_path, aspirin):
    """The fast path (nothing changed) gives what ASE's ``compare_atoms`` gives, in every case."""
    from ase.calculators.calculator import compare_atoms

    calc = QEqCalculator(tiny_potential_path)
    aspirin.calc = calc
    aspirin.get_forces()

    def variants():
        yield aspirin.copy()
        moved = aspirin.copy()
        moved.positions[3, 1] += 1e-16  # within ASE's tolerance: no change
        yield moved
        moved = aspirin.copy()
        moved.positions[3, 1] += 1e-3
        yield moved
        yield aspirin.copy()[::-1]
        charged = aspirin.copy()
        charged.set_initial_charges(np.ones(len(charged)))
        yield charged
        boxed = aspirin.copy()
        boxed.cell = [20.0, 20.0, 20.0]
        yield boxed
        periodic = boxed.copy()
        periodic.pbc = True
        yield periodic
        moving = aspirin.copy()
        moving.set_momenta(np.ones((len(moving), 3)))  # not a property ASE checks
        yield moving

    answers = []
    for atoms in variants():
        answers.append(calc.check_state(atoms))
        assert sorted(answers[-1]) == sorted(compare_atoms(calc.atoms, atoms))
    assert [bool(a) for a in answers] == [False, False, True, True, True, True, True, False]


def test_species_index_follows_atomic_numbers(tiny_potential_path, aspirin):
    """The cached species tensor is rebuilt when the atomic numbers change (same count or not)."""
    calc = QEqCalculator(tiny_potential_path, dtype="float64")
    aspirin.calc = calc
    e_aspirin = aspirin.get_potential_energy()
    swapped = aspirin.copy()
    swapped.numbers[[0, -1]] = swapped.numbers[[-1, 0]]
    swapped.calc = calc
    assert swapped.get_potential_energy() != pytest.approx(e_aspirin, abs=1e-6)
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    water.calc = calc
    assert water.get_forces().shape == (3, 3)
    aspirin.calc = calc
    assert aspirin.get_potential_energy() == pytest.approx(e_aspirin, abs=1e-9)


def test_two_calculators_coexist(tiny_potential_path, aspirin):
    calc32 = QEqCalculator(tiny_potential_path)
    calc64 = QEqCalculator(tiny_potential_path, dtype="float64")
    a32, a64 = aspirin.copy(), aspirin.copy()
    a32.calc, a64.calc = calc32, calc64
    f64 = a64.get_forces()
    f32 = a32.get_forces()
    a64.positions[3] += 0.02
    a64.get_forces()
    a64.positions[3] -= 0.02
    np.testing.assert_allclose(a64.get_forces(), f64, atol=1e-12)
    np.testing.assert_allclose(f32, f64, atol=1e-3)
    assert calc32.dtype == torch.float32 and calc64.dtype == torch.float64


def test_built_model_is_used_as_is(aspirin):
    model = build_tiny_model().double()
    calc = QEqCalculator(model)
    assert calc.dtype == torch.float64 and calc.model is model
    assert all(p.requires_grad for p in model.parameters())  # the caller's model is not modified
    aspirin.calc = calc
    assert np.isfinite(aspirin.get_forces()).all()
    with pytest.raises(ValueError, match="requested"):
        QEqCalculator(model, dtype="float32")


def test_unknown_element_is_named(tiny_potential_path):
    atoms = Atoms("CH3N", positions=np.arange(15.0).reshape(5, 3) * 0.4)
    atoms.calc = QEqCalculator(tiny_potential_path)
    with pytest.raises(ValueError, match=r"not trained on element\(s\) N \(Z=7\).*H \(Z=1\), C \(Z=6\), O \(Z=8\)"):
        atoms.get_potential_energy()


def test_non_finite_positions_are_rejected(tiny_potential_path, aspirin):
    aspirin.calc = QEqCalculator(tiny_potential_path)
    aspirin.positions[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*\[4\]"):
        aspirin.get_forces()
    aspirin.positions[4, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        aspirin.get_potential_energy()


def test_unknown_name_lists_shipped_potentials():
    with pytest.raises(ValueError, match="unknown potential 'no_such_potential'; shipped potentials"):
        QEqCalculator("no_such_potential")


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(PotentialFileError, match="not found"):
        QEqCalculator(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00 not a torch file")
    with pytest.raises(PotentialFileError, match="corrupt"):
        QEqCalculator(tmp_path / "corrupt.pt")
    path = save_potential(tmp_path / "tiny.pt", build_tiny_model(), {})
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["num_layers"] = 3
    torch.save(payload, tmp_path / "incompatible.pt")
    with pytest.raises(PotentialFileError, match="does not match"):
        QEqCalculator(tmp_path / "incompatible.pt")
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        QEqCalculator(path, dtype="float16")


def test_molecule_in_large_periodic_box_matches_non_periodic(tiny_potential_path, aspirin):
    calc = QEqCalculator(tiny_potential_path, dtype="float64")
    aspirin.calc = calc
    energy, forces = aspirin.get_potential_energy(), aspirin.get_forces()
    boxed = aspirin.copy()
    boxed.cell = np.diag([30.0, 31.0, 32.0])  # > molecule extent (~7 Å) + cutoff (5 Å)
    boxed.pbc = True
    boxed.positions += 2.0  # wrapping must not matter either
    boxed.wrap()
    boxed.calc = calc
    assert boxed.get_potential_energy() == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(boxed.get_forces(), forces, atol=1e-10)


def test_small_periodic_cell_sees_its_images(tiny_potential_path):
    """A cell shorter than the cutoff: an atom interacts with its own images; still translation invariant."""
    atoms = Atoms("CO", positions=[[0, 0, 0], [1.2, 0.3, 0.1]], cell=[3.0, 3.5, 4.0], pbc=True)
    atoms.calc = QEqCalculator(tiny_potential_path, dtype="float64")
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    isolated = Atoms("CO", positions=atoms.positions)
    isolated.calc = atoms.calc
    assert abs(isolated.get_potential_energy() - energy) > 1e-6
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-10)
    atoms.positions += [1.0, -2.0, 0.5]
    assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-9)
    atoms.calc = QEqCalculator(tiny_potential_path, dtype="float64")
    atoms.cell = [3.0, 0.0, 4.0]
    with pytest.raises(ValueError, match="nonzero cell vectors"):
        atoms.get_potential_energy()


def test_no_global_torch_state_change(tiny_potential_path):
    """Importing the package and building/using calculators leaves torch's global settings alone."""
    code = f"""
import torch
before = (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled(), torch.random.get_rng_state())
import qeq_ase.calculator, qeq_ase.md.driver, qeq_ase.checks.equivariance, qeq_ase.checks.conservation
from ase import Atoms
calc = qeq_ase.calculator.QEqCalculator({str(tiny_potential_path)!r}, dtype="float64")
other = qeq_ase.calculator.QEqCalculator({str(tiny_potential_path)!r})
atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
atoms.calc = calc
atoms.get_forces()
after = (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled(), torch.random.get_rng_state())
assert before[:3] == after[:3], (before[:3], after[:3])
assert torch.equal(before[3], after[3]), "global torch RNG consumed"
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_todict_names_the_potential(tiny_potential_path):
    calc = QEqCalculator(tiny_potential_path, dtype="float64")
    assert calc.todict() == {"model": str(tiny_potential_path), "device": "cpu", "dtype": "float64"}


def test_keep_large_allocations_is_opt_in_and_checks_its_argument():
    from qeq_ase.kernels.glibc_malloc import keep_large_allocations

    with pytest.raises(ValueError, match="positive"):
        keep_large_allocations(0)
    import platform

    accepted = keep_large_allocations()
    assert accepted is (platform.libc_ver()[0] == "glibc")  # elsewhere it changes nothing
