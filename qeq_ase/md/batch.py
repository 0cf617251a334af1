"""Many structures in one model call: ``evaluate_batch("aspirin_int8", list_of_atoms)``.

The structures (any molecules the potential knows, any sizes, gas phase or periodic) are
joined into one disconnected graph, as :mod:`qeq_ase.train.evaluate` batches rMD17 frames, and
the model runs once on it. Each structure is first moved to its local frame in float64, as
the calculator does (:mod:`qeq_ase.data.local_frame`). No edge joins two structures, so each
energy equals a one-at-a-time calculator call up to float32 rounding: the GEMMs see more
rows and may round differently (a batch of one is the calculator's computation exactly).
INT8 potentials round activations to codes, and such rounding can move a code that sits on
a boundary: up to a few tenths of a meV, as much as moving the atoms by 1e-7 Å does
(``docs/ipi_and_batching.md``). Results are ASE's units: eV and eV/Å.

>>> results = evaluate_batch(calc, [atoms_a, atoms_b])       # doctest: +SKIP
>>> energy_a, forces_a = results[0]                          # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms

from ..calculator import QEqCalculator, resolve_model, species_names
from ..data.graph import AtomicGraph
from ..data.local_frame import OverlappingAtomsError, check_no_overlap, local_frame
from ..data.neighbors import molecule_edges, periodic_edges
from ..model.potential import Potential

#: Default most atoms per model call; more are split into consecutive calls of at most this
#: many (a structure larger than it runs alone). 64 aspirins are 1,344 atoms.
MAX_ATOMS_PER_CALL = 20_000


def _check_structure(index: int, atoms: Atoms, species: list[int]) -> None:
    if not isinstance(atoms, Atoms):
        raise TypeError(f"structure {index} is a {type(atoms).__name__}, not an ase.Atoms")
    unknown = sorted(set(atoms.numbers.tolist()) - set(species))
    if unknown:
        raise ValueError(f"structure {index}: the potential was not trained on element(s) "
                         f"{species_names(unknown)}; it knows {species_names(species)}")
    if not np.isfinite(atoms.positions).all():
        bad = np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1)).tolist()
        raise ValueError(f"structure {index}: non-finite (NaN or inf) positions for atom(s) {bad}")


def _local_frame(index: int, atoms: Atoms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`~qeq_ase.data.local_frame.local_frame` of one structure, errors naming it."""
    try:
        return local_frame(atoms)
    except ValueError as err:
        raise ValueError(f"structure {index}: {err}") from None


def structures_to_graph(structures: Sequence[Atoms], cutoff: float, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> AtomicGraph:
    """One graph of gas-phase and periodic structures (``edge_shift`` None if all are gas phase).

    Positions are each structure's local frame (:func:`~qeq_ase.data.local_frame.local_positions`).
    The gas-phase ones share one neighbour list call (:func:`~qeq_ase.data.neighbors.molecule_edges`);
    each periodic one gets its own (:func:`~qeq_ase.data.neighbors.periodic_edges`).
    """
    frames = [_local_frame(k, a) for k, a in enumerate(structures)]
    counts = np.array([len(a) for a in structures], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    positions = np.concatenate([f[0] for f in frames]) if len(structures) else np.zeros((0, 3))
    pos = torch.as_tensor(positions, dtype=dtype, device=device)
    numbers = torch.as_tensor(np.concatenate([a.numbers for a in structures]) if len(structures) else [],
                              dtype=torch.long, device=device)
    batch = torch.repeat_interleave(torch.arange(len(structures), device=device),
                                    torch.as_tensor(counts, device=device))
    periodic = [k for k, a in enumerate(structures) if np.any(a.pbc) and len(a)]
    gas_atoms = np.concatenate([np.arange(o, o + n) for o, n, a in zip(offsets, counts, structures)
                                if not np.any(a.pbc)] or [np.zeros(0, dtype=np.int64)])
    edges = []
    if len(gas_atoms) == len(pos):
        edges.append(molecule_edges(pos, cutoff, batch))
    elif len(gas_atoms):
        index = torch.as_tensor(gas_atoms, device=device)
        edges.append(index[molecule_edges(pos[index], cutoff, batch[index])])
    if not periodic:
        edge_index = edges[0] if edges else torch.zeros(2, 0, dtype=torch.long, device=device)
        return AtomicGraph(pos, numbers, batch, edge_index, len(structures))
    shifts = [torch.zeros(edges[0].shape[1], 3, dtype=dtype, device=device)] if edges else []
    for k in periodic:
        edge_index, shift = periodic_edges(*frames[k], cutoff)
        edges.append(torch.as_tensor(edge_index + offsets[k], device=device))
        shifts.append(torch.as_tensor(shift, dtype=dtype, device=device))
    return AtomicGraph(pos, numbers, batch, torch.cat(edges, dim=1), len(structures), torch.cat(shifts))


def _check_no_overlap(graph: AtomicGraph, first: int) -> None:
    """:func:`~qeq_ase.data.local_frame.check_no_overlap` on the batch; on failure, again per
    structure, so the error names the structure and its own atom indices."""
    try:
        check_no_overlap(graph.positions, graph.edge_index, graph.edge_shift)
    except OverlappingAtomsError:
        receiver_graph = graph.batch[graph.edge_index[1]]
        for k in range(graph.num_graphs):
            atoms = torch.nonzero(graph.batch == k).flatten()
            mask = receiver_graph == k
            if not bool(mask.any()):
                continue
            shift = None if graph.edge_shift is None else graph.edge_shift[mask]
            try:
                check_no_overlap(graph.positions[atoms], graph.edge_index[:, mask] - atoms[0], shift)
            except OverlappingAtomsError as error:
                raise OverlappingAtomsError(f"structure {first + k}: {error}") from None
        raise


def _chunks(counts: list[int], max_atoms: int) -> list[slice]:
    """Consecutive slices of structures with at most ``max_atoms`` atoms each (or one structure)."""
    chunks, start, atoms = [], 0, 0
    for k, n in enumerate(counts):
        if k > start and atoms + n > max_atoms:
            chunks.append(slice(start, k))
            start, atoms = k, 0
        atoms += n
    chunks.append(slice(start, len(counts)))
    return chunks


def evaluate_batch(model: str | os.PathLike | Potential | QEqCalculator, structures: Sequence[Atoms], *,
                   max_atoms: int = MAX_ATOMS_PER_CALL) -> list[tuple[float, np.ndarray]]:
    """Energy (eV) and forces (eV/Å ``[n_atoms, 3]``, float64) of each structure, in order.

    Args:
        model: a :class:`~qeq_ase.calculator.QEqCalculator` (its model, dtype and device are
            used; its cached results are not touched), a shipped potential name, a path or a
            built model (see :func:`~qeq_ase.calculator.resolve_model`).
        structures: ASE ``Atoms``; gas phase (no ``pbc``) or periodic, any sizes and elements
            the potential knows. Their calculators are neither used nor changed.
        max_atoms: most atoms per model call; longer lists take several calls.

    Raises ``ValueError`` naming the structure, as the calculator does for one: unknown
    elements, non-finite positions, a periodic cell without a vector or singular,
    overlapping atoms (:class:`~qeq_ase.data.local_frame.OverlappingAtomsError`), non-finite
    model output.
    """
    if isinstance(model, QEqCalculator):
        net, dtype, device = model.model, model.dtype, model.device
    else:
        net, _, dtype, _ = resolve_model(model)
        device = next(net.parameters()).device
    if isinstance(structures, Atoms):
        raise TypeError("structures must be a sequence of ase.Atoms; wrap a single one in a list")
    if max_atoms < 1:
        raise ValueError(f"max_atoms must be at least 1, got {max_atoms}")
    structures = list(structures)
    species = [int(z) for z in net.config.species]
    for k, atoms in enumerate(structures):
        _check_structure(k, atoms, species)
    results: list[tuple[float, np.ndarray]] = []
    for chunk in _chunks([len(a) for a in structures], max_atoms):
        part = structures[chunk]
        if sum(len(a) for a in part) == 0:
            results.extend((0.0, np.zeros((0, 3))) for _ in part)
            continue
        graph = structures_to_graph(part, float(net.config.cutoff), dtype, device)
        _check_no_overlap(graph, chunk.start)
        out = net.energy_and_forces(graph.positions, net.species_index(graph.numbers), graph.edge_index,
                                    graph.batch, graph.num_graphs, edge_shift=graph.edge_shift)
        energy = out["energy"].detach().cpu().numpy()
        forces = out["forces"].detach().to("cpu", torch.float64).numpy()
        split = np.split(forces, np.cumsum([len(a) for a in part])[:-1])
        for k, (e, f) in enumerate(zip(energy, split), start=chunk.start):
            if not (np.isfinite(e) and np.isfinite(f).all()):
                raise ValueError(f"structure {k}: the potential gave non-finite energy or forces; "
                                 "is it far outside what the potential was trained on?")
            results.append((float(e), f))
    return results
