"""The test kit that the package's tests and users share (as ``e3nn.util.test``): a tiny random
potential, one energy + forces evaluation of it, the symmetry and finite-difference
assertions, and their tolerances per precision.

>>> import numpy as np
>>> from qeq_ase.testing import assert_equivariant, assert_forces_match_finite_differences, predict, tiny_model
>>> model = tiny_model()                                  # float64, 3 species, 2 layers
>>> water = (np.array([8, 1, 1]), np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
>>> energy, forces = predict(model, *water)
>>> forces.shape
(3, 3)
>>> errors = assert_equivariant(model, water)             # worst deviations, within TOLERANCES["float64"]
>>> error = assert_forces_match_finite_differences(model, water)

A potential is a model (:class:`~qeq_ase.model.potential.Potential`, evaluated by :func:`predict`), an
ASE calculator, or a function ``(numbers, positions) -> (energy eV, forces eV/Å)``. A broken
one fails with the worst deviation named:

>>> def wrong_sign(numbers, positions):                   # E = sum |x|^2, "forces" +dE/dx
...     return float((positions ** 2).sum()), 2 * positions
>>> assert_forces_match_finite_differences(wrong_sign, water)
Traceback (most recent call last):
AssertionError: forces are not -dE/dx ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from .calculator import model_float_dtype
from .checks.equivariance import random_rotations
from .data.graph import molecules_to_graph
from .model.network import ModelConfig, QEqModel
from .model.potential import Potential
from .quant.int8_model import is_int8_model

#: Reference energies of the tiny model (eV per H, C, O): nonzero, so that they are tested.
TINY_REFERENCE_ENERGY_EV = [-13.6, -1029.0, -2041.0]

#: What the assertions take: a model (:class:`~qeq_ase.model.potential.Potential`), an ASE calculator,
#: or a function ``(numbers, positions) -> (energy, forces)``.
Evaluable = Potential | Calculator | Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]
Structure = Atoms | tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Tolerance:
    """Bounds (eV, eV/Å, Å) of one precision, for rMD17-sized molecules."""

    energy: float  # one structure computed two ways that round differently (batched vs one at a time)
    forces: float  # the same, largest |dF| component
    equivariance_energy: float  # |E(x') - E(x)| for x' a rotated, translated or permuted x
    equivariance_forces: float  # |F_i(x') - F_i(x) R^T| per atom, plus:
    equivariance_forces_rtol: float  # this fraction of the mean |F_i(x)|
    fd_step: float | None  # Å, of the fourth-order central difference; None: no finite differences
    fd_forces: float | None  # |F + dE/dx| per component


#: Measured on the tiny model and the shipped aspirin/ethanol potentials:
#: float64 symmetry errors 4e-14 eV/Å, finite differences 6e-8 eV/Å; float32 symmetry errors
#: 3e-6 eV and 2e-5 eV/Å (translations up to 5 Å, no re-centring), finite differences
#: 6e-4 eV/Å (tiny) and 1e-4 eV/Å (aspirin_fp32) over all components. INT8 rounds vector
#: components on a per-atom grid, so it is equivariant only up to quantization (worst atom
#: 0.7% of the mean |F| for the tiny model, 0.01% for aspirin_int8; energies up to 0.014 eV),
#: and its energy is piecewise constant (activation codes), so finite differences of it are
#: not its forces (those are the QAT model's, straight-through). Batched vs single calls
#: (rMD17): float32 0.6 µeV and 1 µeV/Å; INT8 0.25 meV and 0.20 meV/Å, codes on a rounding
#: boundary flipping, as moving the atoms by 1e-7 Å flips them.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-9, 1e-9, 1e-10, 1e-10, 0.0, 1e-4, 1e-6),
    "float32": Tolerance(1e-5, 1e-5, 5e-5, 1e-4, 0.0, 1e-2, 2e-3),
    "int8": Tolerance(1e-3, 1e-3, 5e-2, 0.0, 0.05, None, None),
}


def tiny_model(dtype: torch.dtype = torch.float64, seed: int = 0, reference_energy: bool = True,
               **overrides) -> QEqModel:
    """A small random model for H, C and O (16 features, 2 layers, 2 heads, 8 radial functions),
    in eval mode. ``overrides`` change :class:`~qeq_ase.model.network.ModelConfig` fields; the
    weights come from ``seed`` without touching torch's global RNG."""
    config = ModelConfig(**{"species": [1, 6, 8], "num_features": 16, "num_layers": 2, "num_heads": 2,
                            "num_radial": 8, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = QEqModel(config)
    model = model.to(dtype)
    if reference_energy:
        model.reference_energy = torch.tensor(TINY_REFERENCE_ENERGY_EV, dtype=torch.float64)
    return model.eval()


def predict(model: QEqModel, numbers: np.ndarray, positions: np.ndarray) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å, ``[N, 3]``) of one molecule, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    graph = molecules_to_graph([numbers], [positions], model.config.cutoff, dtype)
    out = model.energy_and_forces(graph.positions, model.species_index(graph.numbers), graph.edge_index,
                                  graph.batch, graph.num_graphs)
    return out["energy"].item(), out["forces"].detach().numpy()


def precision_of(potential: Evaluable) -> str:
    """``"int8"``, ``"float32"`` or ``"float64"`` for a model or a calculator with a ``model``;
    ``"float64"`` (the strictest) for other calculators and functions. A QAT model counts as
    float32: pass ``precision="int8"`` for it."""
    model = potential if isinstance(potential, torch.nn.Module) else getattr(potential, "model", None)
    if not isinstance(model, torch.nn.Module):
        return "float64"
    return "int8" if is_int8_model(model) else str(model_float_dtype(model)).removeprefix("torch.")


def assert_equivariant(potential: Evaluable, structure: Structure, *, rotations: int = 4,
                       translation_A: float = 5.0, precision: str | None = None, seed: int = 0
                       ) -> dict[str, float]:
    """Assert ``E(x') = E(x)`` and ``F(x') = F(x) R^T`` (atoms permuted with ``x``) for ``x'`` a
    translation of ``x``, ``rotations`` Haar-random proper rotations (each with a translation)
    and a permutation of the atoms; a periodic cell rotates with the atoms. Translations are
    uniform in ``[-translation_A, translation_A]^3``; ``seed`` seeds a private generator.

    Returns the worst deviations ``{"energy": eV, "forces": eV/Å}``; raises AssertionError
    naming them when they exceed ``TOLERANCES[precision]`` (default :func:`precision_of`).
    """
    __tracebackhide__ = True
    evaluate, atoms, precision, tol = _setup(potential, structure, precision)
    rng = np.random.default_rng(seed)
    energy, forces = evaluate(atoms)
    identity, in_order = np.eye(3), np.arange(len(atoms))
    shifts = rng.uniform(-translation_A, translation_A, size=(rotations + 1, 3))
    cases = [(f"translation by {np.round(shifts[0], 2)} Å", identity, shifts[0], in_order)]
    cases += [(f"rotation {k + 1} of {rotations} ({_angle_deg(r):.0f} deg) + translation by {np.round(t, 2)} Å",
               r, t, in_order) for k, (r, t) in enumerate(zip(random_rotations(rotations, rng), shifts[1:]))]
    cases.append(("a permutation of the atoms", identity, np.zeros(3), rng.permutation(len(atoms))))
    (worst_e, case_e), (worst_f, case_f) = (0.0, ""), (0.0, "")
    for case, rotation, translation, order in cases:
        moved = atoms[order]
        moved.positions = moved.positions @ rotation.T + translation
        moved.set_cell(moved.cell[:] @ rotation.T)
        energy_m, forces_m = evaluate(moved)
        energy_error = _nan_fails(abs(energy_m - energy))
        deviation = _nan_fails(np.linalg.norm(forces_m - forces[order] @ rotation.T, axis=1))
        if energy_error >= worst_e:
            worst_e, case_e = energy_error, case
        if len(atoms) and deviation.max() >= worst_f:
            worst_f, case_f = deviation.max(), f"{case}, atom {order[deviation.argmax()]}"
    force_bound = tol.equivariance_forces + tol.equivariance_forces_rtol * np.linalg.norm(forces, axis=1).mean()
    problems = []
    if not worst_e <= tol.equivariance_energy:
        problems.append(f"energy not invariant: |E(x') - E(x)| = {worst_e:.3g} eV > {tol.equivariance_energy:.3g} eV "
                        f"under {case_e}")
    if not worst_f <= force_bound:  # NaN forces give a NaN bound
        problems.append(f"forces not equivariant: |F_i(x') - F_i(x) R^T| = {worst_f:.3g} eV/Å > {force_bound:.3g} "
                        f"eV/Å under {case_f}")
    assert not problems, f"{precision} tolerances: " + "; ".join(problems)
    return {"energy": float(worst_e), "forces": float(worst_f)}


def assert_forces_match_finite_differences(potential: Evaluable, structure: Structure, *,
                                           components: int | Sequence[tuple[int, int]] | None = 6,
                                           step: float | None = None, precision: str | None = None,
                                           seed: int = 0) -> float:
    """Assert ``F = -dE/dx`` on ``components``: ``(atom, axis)`` pairs, a number of them drawn
    with ``seed`` (a private generator), or None for all. ``dE/dx`` is the fourth-order central
    difference with ``step`` (Å, default ``TOLERANCES[precision].fd_step``).

    Returns the worst ``|F + dE/dx|`` (eV/Å); raises AssertionError naming it when it exceeds
    ``TOLERANCES[precision].fd_forces``, and ValueError for int8, whose energy is piecewise
    constant (compare its forces with the QAT model's instead).
    """
    __tracebackhide__ = True
    evaluate, atoms, precision, tol = _setup(potential, structure, precision)
    if tol.fd_step is None:
        raise ValueError(f"{precision}: the energy is piecewise constant, so finite differences of it are "
                         "not the forces; compare the forces with those of the QAT model instead")
    step = step or tol.fd_step
    if components is None or isinstance(components, int):
        count = 3 * len(atoms) if components is None else min(components, 3 * len(atoms))
        flat = np.sort(np.random.default_rng(seed).choice(3 * len(atoms), size=count, replace=False))
        components = [(int(i) // 3, int(i) % 3) for i in flat]
    _, forces = evaluate(atoms)
    worst, failed, at = 0.0, 0, ""
    for atom, axis in components:
        energies = []
        for offset in (-2, -1, 1, 2):
            moved = atoms.copy()
            moved.positions[atom, axis] += offset * step
            energies.append(evaluate(moved)[0])
        gradient = (energies[0] - 8 * energies[1] + 8 * energies[2] - energies[3]) / (12 * step)
        error = _nan_fails(abs(forces[atom, axis] + gradient))
        failed += error > tol.fd_forces
        if error >= worst:
            worst, at = error, (f"atom {atom} {'xyz'[axis]}: force {forces[atom, axis]:.6g} eV/Å, "
                                f"-dE/dx {-gradient:.6g} eV/Å")
    assert not failed, (f"forces are not -dE/dx ({precision}: {failed} of {len(components)} components off by more "
                        f"than {tol.fd_forces:.3g} eV/Å, step {step:.3g} Å); worst {at}, |difference| {worst:.3g} eV/Å")
    return float(worst)


def _setup(potential: Evaluable, structure: Structure, precision: str | None
           ) -> tuple[Callable[[Atoms], tuple[float, np.ndarray]], Atoms, str, Tolerance]:
    """The potential as ``Atoms -> (energy, forces)``, the structure as Atoms, and the tolerances."""
    atoms = structure.copy() if isinstance(structure, Atoms) else Atoms(numbers=structure[0], positions=structure[1])
    precision = precision or precision_of(potential)
    if precision not in TOLERANCES:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(TOLERANCES)}")
    if isinstance(potential, Calculator):
        def evaluate(moved: Atoms) -> tuple[float, np.ndarray]:
            moved.calc = potential
            return float(moved.get_potential_energy()), np.asarray(moved.get_forces(), dtype=np.float64)
    else:
        if atoms.pbc.any():
            raise ValueError("a model or function is evaluated without a cell; use an ASE calculator "
                             "(QEqCalculator(model)) for periodic structures")
        compute = (lambda z, x: predict(potential, z, x)) if isinstance(potential, torch.nn.Module) else potential

        def evaluate(moved: Atoms) -> tuple[float, np.ndarray]:
            energy, forces = compute(moved.numbers, moved.positions)
            return float(energy), np.asarray(forces, dtype=np.float64)
    return evaluate, atoms, precision, TOLERANCES[precision]


def _nan_fails(error):
    """``error`` with NaN as infinity, so that a NaN force or energy fails every comparison."""
    return np.nan_to_num(error, nan=np.inf)


def _angle_deg(rotation: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))))
