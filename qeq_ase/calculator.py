"""ASE calculator for qeq-ase potentials: ``atoms.calc = QEqCalculator("aspirin_fp32")``.

Units (ASE's): energies in eV, forces in eV/Å, positions and cell in Å.

========================  ======================================================
property                  meaning
========================  ======================================================
``energy``                total energy (eV), float64 (reference energies included)
``free_energy``           same as ``energy`` (no electronic entropy)
``forces``                ``-dE/dpositions`` (eV/Å) ``[N, 3]``, by autograd
``energies``              per-atom energies (eV) ``[N]``; they sum to ``energy``
``stress``                periodic cells only: ``(1/V) dE/dstrain`` (eV/Å³), ASE's Voigt
                          order and sign (:mod:`qeq_ase.model.stress`); computed only when asked
========================  ======================================================

The calculator only talks to the model through ``config.cutoff``, ``config.species``,
``species_index`` and ``energy_and_forces``, so any potential that
:func:`qeq_ase.io.registry.load_model` returns plugs in unchanged: float32/float64, QAT, or
INT8 (:mod:`qeq_ase.quant.int8_model`; float32 only, its linear layers run ``torch._int_mm``
GEMMs, never a dequantized float forward; ``int8_kernel_report(calc.model)`` lists them).

Periodic cells are supported: edges and image shifts come from
:func:`qeq_ase.data.neighbors.periodic_edges`. A molecule in a box larger than the cutoff plus
its extent therefore has the same energy with and without periodic boundaries.

Positions are moved to a local frame in float64 before the cast to the model's dtype
(:func:`qeq_ase.data.local_frame.local_positions`), so a translated molecule, or unwrapped
coordinates in a periodic cell, give the same float32 forces. Atoms closer than
:data:`~qeq_ase.data.local_frame.MIN_PAIR_DISTANCE_A` raise
:class:`~qeq_ase.data.local_frame.OverlappingAtomsError` (there is no short-range repulsion), and
non-finite model output raises ``ValueError``: NaN forces are never returned.

Nothing here touches torch's global state (default dtype, threads, grad mode): the dtype
and device are per calculator, so calculators of different precision can coexist.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.data import chemical_symbols

from .data.local_frame import check_no_overlap, local_frame
from .data.neighbors import molecule_edges, periodic_edges
from .model.potential import Potential
from .model.stress import stress_volume, voigt_stress
from .quant.int8_model import is_int8_model, set_activation_limbs, set_int8_gemm

#: Accepted spellings of the calculator's float dtype.
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def as_torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"float32"``/``"float64"`` (or a torch dtype, or None) -> torch dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, *DTYPES.values()):
            raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype of a built model's parameters (float32 if it has none)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def resolve_model(model: str | os.PathLike | Potential, device: str | torch.device = "cpu",
                  dtype: str | torch.dtype | None = None) -> tuple[Potential, dict, torch.dtype, str]:
    """A shipped name, a path or a built model -> ``(model, metadata, dtype, label)``.

    A built model is used as it is (never moved or cast: it belongs to the caller); for it
    ``dtype`` must be None or match its parameters. Names and paths are loaded through
    :func:`qeq_ase.io.registry.load_model` with ``dtype`` (default float32).
    """
    dtype = as_torch_dtype(dtype)
    if isinstance(model, torch.nn.Module):
        model_dtype = model_float_dtype(model)
        if dtype is not None and dtype != model_dtype:
            raise ValueError(f"dtype {dtype} was requested but the given model is {model_dtype}; "
                             "cast the model or pass dtype=None")
        return model, {"species": list(model.config.species), "cutoff": model.config.cutoff}, model_dtype, "<model>"
    from .io.registry import load_model

    dtype = dtype or torch.float32
    built, metadata = load_model(model, device=device, dtype=dtype)
    built.requires_grad_(False)  # our own copy: autograd then tracks positions only (faster)
    return built, metadata, dtype, str(model)


def unchanged(previous: Atoms, atoms: Atoms, ignored: set[str]) -> bool:
    """Whether every property ASE's ``compare_atoms`` checks (but ``ignored``) is exactly equal.

    True implies what ASE's check would find (no change), at a fraction of its cost: ASE runs
    ``np.allclose`` once per property, and an MD step asks several times about atoms that did
    not move (``md_examples/profile_calculator.py`` times both checks).
    """
    checked = set(all_changes) - ignored
    for name, a, b in (("cell", previous.cell.array, atoms.cell.array), ("pbc", previous.pbc, atoms.pbc)):
        if name in checked and not np.array_equal(a, b):
            return False
    names = checked & set(previous.arrays)
    if names != checked & set(atoms.arrays):
        return False
    return all(np.array_equal(previous.arrays[name], atoms.arrays[name]) for name in names)


def species_names(species: list[int]) -> str:
    return ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in species)


class QEqCalculator(Calculator):
    """ASE calculator for a qeq-ase potential.

    Args:
        model: shipped potential name (see :func:`qeq_ase.io.registry.shipped_names`), path
            to a potential file, or a built model (:class:`~qeq_ase.model.potential.Potential`, used as is).
        device: torch device of the model, e.g. ``"cpu"`` or ``"cuda"``.
        dtype: ``"float32"`` (default for files) or ``"float64"`` (not for INT8 files); for
            a built model, None (its own dtype).
        activation_limbs: INT8 potentials only: ``2`` (two int8 codes per activation, an
            energy smooth in the positions, for MD and optimisation) or ``1`` (W8A8, a step
            function of the positions); None keeps what the file says
            (:func:`qeq_ase.quant.int8_model.set_activation_limbs`).
        edge_backend: what runs the per-edge attention work: ``"auto"`` (the fused C++ kernel
            where it builds, else eager torch ops with a warning), ``"cpp"`` or ``"eager"``;
            None keeps the model's (``$QEQ_EDGE_BACKEND`` or ``"auto"`` for a loaded file).
        int8_gemm: INT8 potentials only: ``"auto"``, ``"int_mm"``, ``"onednn"`` or ``"brgemm"``
            (:func:`qeq_ase.quant.int8_model.set_int8_gemm`; a GEMM this CPU cannot run fast is
            refused); None keeps the model's (``$QEQ_INT8_GEMM`` or ``"auto"`` for a loaded file).

        Settings given for a built model change that model.
        **kwargs: passed to :class:`ase.calculators.calculator.Calculator` (``label``,
            ``atoms``, ``directory``).

    Raises ``ValueError`` for an unknown name (listing the shipped ones), for atoms of an
    element the potential was not trained on, for non-finite positions and for overlapping
    atoms (:class:`~qeq_ase.data.local_frame.OverlappingAtomsError`);
    :class:`~qeq_ase.io.checkpoint.PotentialFileError` for missing, corrupt or incompatible files.

    >>> from qeq_ase import QEqCalculator
    >>> from qeq_ase.md.driver import load_start_structure
    >>> atoms = load_start_structure("ethanol")          # shipped with the package
    >>> atoms.calc = QEqCalculator("ethanol_int8")
    >>> atoms.get_forces().shape                          # eV/Å
    (9, 3)
    >>> QEqCalculator("ethanol_int9")
    Traceback (most recent call last):
    ...
    ValueError: unknown potential 'ethanol_int9'; shipped potentials: ...
    """

    implemented_properties = ["energy", "free_energy", "forces", "energies", "stress"]

    def __init__(self, model: str | os.PathLike | Potential = "aspirin_fp32", device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, activation_limbs: int | None = None,
                 edge_backend: str | None = None, int8_gemm: str | None = None, **kwargs):
        self.device = torch.device(device)
        self.model, self.metadata, self.dtype, self.model_label = resolve_model(model, self.device, dtype)
        for name, value, setting in (("activation_limbs", activation_limbs, set_activation_limbs),
                                     ("int8_gemm", int8_gemm, set_int8_gemm)):
            if value is not None:
                if not is_int8_model(self.model):
                    raise ValueError(f"{name} applies to INT8 potentials; {self.model_label!r} is not one")
                setting(self.model, value)
        if edge_backend is not None:
            self.model.set_edge_backend(edge_backend)
        self.cutoff_A = float(self.model.config.cutoff)
        self.species = [int(z) for z in self.model.config.species]
        self._numbers: np.ndarray | None = None  # atomic numbers of the cached species tensor
        self._species: torch.Tensor | None = None  # embedding rows [N]
        self._batch: torch.Tensor | None = None  # zeros [N]
        Calculator.__init__(self, **kwargs)

    def todict(self) -> dict:
        return {"model": self.model_label, "device": str(self.device), "dtype": str(self.dtype).split(".")[-1]}

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """ASE's check (``ase.calculators.calculator.compare_atoms``), answered at once when
        nothing changed at all (:func:`unchanged`)."""
        if self.atoms is not None and unchanged(self.atoms, atoms, set(self.ignored_changes)):
            return []
        return super().check_state(atoms, tol)

    def _species_for(self, numbers: np.ndarray) -> torch.Tensor:
        """Embedding rows of ``numbers``; cached while the atomic numbers stay the same."""
        if self._numbers is None or not np.array_equal(numbers, self._numbers):
            unknown = sorted(set(numbers.tolist()) - set(self.species))
            if unknown:
                raise ValueError(
                    f"potential {self.model_label!r} was not trained on element(s) {species_names(unknown)}; "
                    f"it knows {species_names(self.species)}"
                )
            z = torch.as_tensor(numbers, dtype=torch.long, device=self.device)
            self._species = self.model.species_index(z)
            self._batch = torch.zeros(len(numbers), dtype=torch.long, device=self.device)
            self._numbers = numbers.copy()
        return self._species

    def _edges(self, local: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``edge_index`` ``[2, E]`` and image shifts in Å ``[E, 3]`` (None without periodicity)."""
        if not pbc.any():
            return molecule_edges(positions, self.cutoff_A), None
        edge_index, shift = periodic_edges(local, cell, pbc, self.cutoff_A)
        return (torch.as_tensor(edge_index, device=self.device),
                torch.as_tensor(shift, dtype=self.dtype, device=self.device))

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        n_atoms = len(atoms)
        volume = stress_volume(atoms) if "stress" in properties else None  # gas phase: PropertyNotImplementedError
        if n_atoms == 0:
            self.results = {"energy": 0.0, "free_energy": 0.0, "forces": np.zeros((0, 3)), "energies": np.zeros(0)}
            if volume is not None:
                self.results["stress"] = np.zeros(6)
            return
        positions = atoms.positions
        if not np.isfinite(positions).all():
            bad = np.flatnonzero(~np.isfinite(positions).all(axis=1)).tolist()
            raise ValueError(f"non-finite (NaN or inf) positions for atom(s) {bad}")
        species = self._species_for(atoms.numbers)
        local, cell, pbc = local_frame(atoms)
        pos = torch.as_tensor(local, dtype=self.dtype, device=self.device)
        edge_index, shift = self._edges(local, cell, pbc, pos)
        check_no_overlap(pos, edge_index, shift)
        out = self.model.energy_and_forces(pos, species, edge_index, self._batch, 1, edge_shift=shift,
                                           virial=volume is not None)
        finite = torch.isfinite(out["forces"]).all(dim=1)
        if not bool(finite.all() & torch.isfinite(out["energy"]).all()):
            bad = torch.nonzero(~finite).flatten()[:10].tolist()
            raise ValueError(f"potential {self.model_label!r} gave non-finite energy or forces (atoms {bad}); "
                             "is the structure far outside what it was trained on?")
        energy = float(out["energy"].detach()[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().to("cpu", torch.float64).numpy(),
            "energies": out["energies"].detach().to("cpu", torch.float64).numpy(),
        }
        if volume is not None:
            self.results["stress"] = voigt_stress(out["virial"][0], volume)

    def calculate_batch(self, structures) -> list[tuple[float, np.ndarray]]:
        """``(energy eV, forces eV/Å)`` of each of many ``Atoms`` from one model call.

        See :func:`qeq_ase.md.batch.evaluate_batch`. ``self.results`` is left as it was.
        """
        from .md.batch import evaluate_batch

        return evaluate_batch(self, structures)
