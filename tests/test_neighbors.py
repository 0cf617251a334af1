"""Neighbour lists against brute-force references: molecules (torch-cluster, matscipy,
dense) and periodic cells (matscipy against an image-by-image loop written here)."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from qeq_ase.data import neighbors
from qeq_ase.data.neighbors import (
    AUTO_DENSE_MAX_ATOMS, HAVE_TORCH_CLUSTER, brute_force_edges, molecule_edges, periodic_edges,
)

RMD17_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "rmd17"
ASPIRIN_TEST = RMD17_DIR / "rmd17_aspirin_test_01.npz"
CUTOFF = 5.0  # the project's model cutoff (configs/recipes/aspirin/fp32.yaml)

needs_torch_cluster = pytest.mark.skipif(not HAVE_TORCH_CLUSTER, reason="torch-cluster is not installed")
MOLECULE_METHODS = ["brute_force", "matscipy", "auto",
                    pytest.param("torch_cluster", marks=needs_torch_cluster)]


def edge_set(edge_index) -> set[tuple[int, int]]:
    return set(map(tuple, np.asarray(edge_index).T.tolist()))


def reference_molecule_edges(positions: np.ndarray, cutoff: float, batch=None) -> set[tuple[int, int]]:
    """(sender, receiver) of all same-molecule pairs closer than the cutoff, pair by pair in float64."""
    pos = np.asarray(positions, dtype=np.float64)
    n = len(pos)
    batch = np.zeros(n, dtype=int) if batch is None else np.asarray(batch)
    diff = pos[None, :, :] - pos[:, None, :]  # [receiver, sender] -> r_j - r_i
    dist = np.sqrt((diff ** 2).sum(-1))
    mask = (dist < cutoff) & (batch[:, None] == batch[None, :]) & ~np.eye(n, dtype=bool)
    receiver, sender = np.nonzero(mask)
    return set(zip(sender.tolist(), receiver.tolist()))


def reference_periodic_edges(positions, cell, pbc, cutoff):
    """{(sender, receiver, n1, n2, n3): distance} over all image shifts in a range shown to be enough."""
    pos, cell, pbc = np.asarray(positions, float), np.asarray(cell, float), np.asarray(pbc, bool)
    # Layers of images needed along each lattice vector: cutoff over the plane spacing,
    # plus the largest fractional spread of the (unwrapped) atoms, plus one spare layer.
    recip = np.linalg.inv(cell).T  # rows b_k with a_i . b_k = delta_ik
    frac = pos @ np.linalg.inv(cell)
    spread = frac.max(0) - frac.min(0)
    reach = np.where(pbc, np.ceil(cutoff * np.linalg.norm(recip, axis=1) + spread).astype(int) + 1, 0)
    found = {}
    shell_hits = 0
    for image in itertools.product(*(range(-k, k + 1) for k in reach)):
        image = np.array(image)
        vec = pos[None, :, :] - pos[:, None, :] + image @ cell  # [i, j]
        dist = np.linalg.norm(vec, axis=-1)
        mask = dist < cutoff
        if not image.any():
            np.fill_diagonal(mask, False)
        i, j = np.nonzero(mask)
        if np.any((np.abs(image) == reach) & pbc):
            shell_hits += len(i)
        for a, b, d in zip(i.tolist(), j.tolist(), dist[i, j].tolist()):
            found[(b, a, *image.tolist())] = d
    assert shell_hits == 0, "reference image range too small"
    return found


def as_triples(positions, cell, edge_index, shift):
    """matscipy's result as {(sender, receiver, n1, n2, n3): distance}, checking integer shifts."""
    images = shift @ np.linalg.inv(cell)
    np.testing.assert_allclose(images, np.round(images), atol=1e-8)
    images = np.round(images).astype(int)
    vec = positions[edge_index[0]] - positions[edge_index[1]] + shift
    dist = np.linalg.norm(vec, axis=1)
    triples = {(int(j), int(i), *map(int, s)): float(d) for j, i, s, d in zip(*edge_index, images, dist)}
    assert len(triples) == edge_index.shape[1], "duplicate edges"
    return triples


@pytest.fixture(scope="module")
def aspirin(tmp_path_factory):
    if not ASPIRIN_TEST.is_file():
        pytest.skip(f"rMD17 aspirin frames not found at {ASPIRIN_TEST} (shared/rmd17 next to the repository)")
    from qeq_ase.data.dataset import load_rmd17

    return load_rmd17(ASPIRIN_TEST, cache_dir=tmp_path_factory.mktemp("rmd17_cache"))


# --------------------------------------------------------------------------- molecules


@pytest.mark.parametrize("method", MOLECULE_METHODS)
def test_single_aspirin_matches_reference(aspirin, method):
    for frame in (0, 1, 500, 999):
        pos = aspirin.positions[frame]
        reference = reference_molecule_edges(pos, CUTOFF)
        edges = molecule_edges(torch.as_tensor(pos, dtype=torch.float64), CUTOFF, method=method)
        assert edges.dtype == torch.long and edges.shape[0] == 2
        assert edges.shape[1] == len(reference)
        assert edge_set(edges) == reference


@pytest.mark.parametrize("method", MOLECULE_METHODS)
def test_aspirin_float32_edges_match_away_from_the_cutoff(aspirin, method):
    pos = aspirin.positions[3]
    edges = edge_set(molecule_edges(torch.as_tensor(pos, dtype=torch.float32), CUTOFF, method=method))
    reference = reference_molecule_edges(pos, CUTOFF)
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    near_cutoff = {(j, i) for j, i in reference ^ edges if abs(dist[i, j] - CUTOFF) < 1e-4}
    assert reference ^ edges == near_cutoff  # float32 may only disagree at the boundary


@pytest.mark.parametrize("method", MOLECULE_METHODS)
def test_batch_of_overlapping_molecules_has_no_cross_edges(aspirin, method):
    frames = [0, 10, 20, 30, 40, 50, 60, 70]  # all centred near the origin: they overlap in space
    pos = np.concatenate([aspirin.positions[f] for f in frames])
    batch = np.repeat(np.arange(len(frames)), aspirin.n_atoms)
    edges = molecule_edges(torch.as_tensor(pos), CUTOFF, torch.as_tensor(batch), method=method)
    got = edge_set(edges)
    assert all(batch[j] == batch[i] for j, i in got)
    assert got == reference_molecule_edges(pos, CUTOFF, batch)
    # the same as each molecule on its own
    per_molecule = set()
    for k, f in enumerate(frames):
        off = k * aspirin.n_atoms
        per_molecule |= {(j + off, i + off) for j, i in reference_molecule_edges(aspirin.positions[f], CUTOFF)}
    assert got == per_molecule


@pytest.mark.parametrize("method", MOLECULE_METHODS)
def test_batch_with_uneven_and_missing_molecules(method):
    rng = np.random.default_rng(1)
    batch = np.repeat([0, 1, 3, 4, 6], [1, 7, 20, 2, 13])  # single atoms, gaps in the indices
    pos = rng.uniform(-3.0, 3.0, size=(len(batch), 3))
    edges = molecule_edges(torch.as_tensor(pos), 2.5, torch.as_tensor(batch), method=method)
    assert edge_set(edges) == reference_molecule_edges(pos, 2.5, batch)


@pytest.mark.parametrize("method", MOLECULE_METHODS)
def test_dense_cluster_drops_no_neighbours(method):
    """torch_cluster.radius_graph keeps only 32 neighbours per atom unless told otherwise."""
    rng = np.random.default_rng(2)
    pos = rng.uniform(0.0, 6.0, size=(300, 3))  # ~1.4 atoms/Å^3: ~300 neighbours within 5 Å
    reference = reference_molecule_edges(pos, CUTOFF)
    degree = np.bincount([i for _, i in reference], minlength=len(pos))
    assert degree.min() > 32  # every atom
    edges = molecule_edges(torch.as_tensor(pos), CUTOFF, method=method)
    assert edges.shape[1] == len(reference)
    assert edge_set(edges) == reference


def test_brute_force_in_blocks_matches_one_block(monkeypatch):
    rng = np.random.default_rng(5)
    pos = torch.as_tensor(rng.uniform(0.0, 8.0, size=(97, 3)))
    batch = torch.as_tensor(rng.integers(0, 3, size=97))  # brute force takes an unsorted batch too
    whole = brute_force_edges(pos, 3.0, batch)
    monkeypatch.setattr(neighbors, "_DENSE_BLOCK_ENTRIES", 7 * 97)  # blocks of 7 rows
    blocks = brute_force_edges(pos, 3.0, batch)
    assert torch.equal(whole, blocks)
    assert edge_set(whole) == reference_molecule_edges(pos.numpy(), 3.0, batch.numpy())


@needs_torch_cluster
@pytest.mark.parametrize("start_cap", [1, 5, 64])
def test_torch_cluster_cap_is_raised_until_nothing_is_dropped(start_cap):
    """The GPU path starts from a small neighbour cap and doubles it; exercised here on CPU."""
    rng = np.random.default_rng(3)
    pos = torch.as_tensor(rng.uniform(0.0, 5.0, size=(150, 3)))
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 60, 50]))
    edges = neighbors._torch_cluster_edges(pos, 4.0, batch, max_num_neighbors=start_cap)
    assert edge_set(edges) == reference_molecule_edges(pos.numpy(), 4.0, batch.numpy())


@pytest.mark.parametrize("method", MOLECULE_METHODS)
def test_tiny_and_empty_inputs(method):
    assert molecule_edges(torch.zeros(0, 3), 5.0, method=method).shape == (2, 0)
    assert molecule_edges(torch.zeros(1, 3), 5.0, method=method).shape == (2, 0)
    two = molecule_edges(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), 5.0, method=method)
    assert edge_set(two) == {(0, 1), (1, 0)}


def test_edge_direction_convention():
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    for method in ["brute_force", "matscipy"] + (["torch_cluster"] if HAVE_TORCH_CLUSTER else []):
        sender, receiver = molecule_edges(pos, 2.0, method=method)
        assert sorted(zip(sender.tolist(), receiver.tolist())) == [(0, 1), (1, 0)]
    edge_index, shift = periodic_edges(pos.numpy(), 10.0 * np.eye(3), True, 2.0)
    vec = pos.numpy()[edge_index[0]] - pos.numpy()[edge_index[1]] + shift
    got = {(int(j), int(i)): tuple(v) for j, i, v in zip(*edge_index, vec)}
    assert got[(2, 0)] == pytest.approx((-1.0, 0.0, 0.0))  # atom 2's image at x = -1 sends to atom 0
    assert got[(0, 2)] == pytest.approx((1.0, 0.0, 0.0))


def test_auto_dispatches_on_size(monkeypatch):
    calls = []
    monkeypatch.setattr(neighbors, "_dense_edges",
                        lambda *a: calls.append("brute_force") or torch.empty(2, 0, dtype=torch.long))
    large = neighbors.AUTO_LARGE_METHOD
    if large == "torch_cluster" and not HAVE_TORCH_CLUSTER:
        large = "matscipy"  # the fallback without torch-cluster
    monkeypatch.setattr(neighbors, "_torch_cluster_edges",
                        lambda *a: calls.append("torch_cluster") or torch.empty(2, 0, dtype=torch.long))
    monkeypatch.setattr(neighbors, "_matscipy_molecule_edges",
                        lambda *a: calls.append("matscipy") or torch.empty(2, 0, dtype=torch.long))
    molecule_edges(torch.zeros(AUTO_DENSE_MAX_ATOMS, 3), 5.0)
    molecule_edges(torch.zeros(AUTO_DENSE_MAX_ATOMS + 1, 3), 5.0)
    assert calls == ["brute_force", large]


def test_no_gradient_and_device_kept():
    pos = torch.rand(30, 3, requires_grad=True)
    edges = molecule_edges(pos, 0.5)
    assert not edges.requires_grad and edges.device == pos.device


@pytest.mark.parametrize("bad, error, match", [
    (dict(positions=torch.tensor([[0.0, float("nan"), 0.0]] * 3)), ValueError, "NaN or infinite"),
    (dict(positions=torch.tensor([[0.0, float("inf"), 0.0]] * 3)), ValueError, "NaN or infinite"),
    (dict(positions=torch.zeros(4, 2)), ValueError, r"shape \[N, 3\]"),
    (dict(positions=torch.zeros(4, 3, 1)), ValueError, r"shape \[N, 3\]"),
    (dict(positions=torch.zeros(4, 3, dtype=torch.long)), TypeError, "floating-point"),
    (dict(positions=np.zeros((4, 3))), TypeError, "torch.Tensor"),
    (dict(cutoff=0.0), ValueError, "positive"),
    (dict(cutoff=-1.0), ValueError, "positive"),
    (dict(cutoff=float("nan")), ValueError, "finite"),
    (dict(cutoff=float("inf")), ValueError, "finite"),
    (dict(cutoff="5"), TypeError, "real number"),
    (dict(batch=torch.zeros(3, dtype=torch.long)), ValueError, "one entry per atom"),
    (dict(batch=torch.tensor([0, 1, 1, 0])), ValueError, "sorted"),
    (dict(batch=torch.tensor([-1, 0, 0, 0])), ValueError, "non-negative"),
    (dict(batch=torch.zeros(4)), TypeError, "integer"),
    (dict(method="kdtree"), ValueError, "unknown neighbour-list method"),
])
def test_molecule_edges_rejects_bad_input(bad, error, match):
    kwargs = dict(positions=torch.zeros(4, 3), cutoff=5.0, batch=None, method="brute_force") | bad
    with pytest.raises(error, match=match):
        molecule_edges(**kwargs)


def test_torch_cluster_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(neighbors, "_radius_graph", None)
    with pytest.raises(ImportError, match="pip install"):
        molecule_edges(torch.zeros(4, 3), 5.0, method="torch_cluster")


# --------------------------------------------------------------------------- periodic cells

TRICLINIC = np.array([[5.0, 0.0, 0.0], [1.5, 4.5, 0.0], [0.8, -1.2, 4.0]])


@pytest.mark.parametrize("cell, pbc, cutoff, n_atoms", [
    (6.0 * np.eye(3), [True, True, True], 3.5, 40),
    (3.0 * np.eye(3), [True, True, True], 7.0, 3),  # cutoff over twice the cell: several images
    (TRICLINIC, [True, True, True], 4.5, 12),
    (TRICLINIC, [True, True, False], 4.5, 12),
    (TRICLINIC, [False, True, False], 3.0, 12),
])
def test_periodic_edges_match_image_loop(cell, pbc, cutoff, n_atoms):
    rng = np.random.default_rng(4)
    frac = rng.uniform(-0.4, 1.4, size=(n_atoms, 3))  # not wrapped into the cell, as in MD
    positions = frac @ cell
    edge_index, shift = periodic_edges(positions, cell, np.array(pbc), cutoff)
    assert edge_index.dtype == np.int64 and edge_index.shape[0] == 2
    assert shift.dtype == np.float64 and shift.shape == (edge_index.shape[1], 3)
    got = as_triples(positions, cell, edge_index, shift)
    reference = reference_periodic_edges(positions, cell, pbc, cutoff)
    assert len(reference) > 0
    assert got.keys() == reference.keys()
    np.testing.assert_allclose([got[k] for k in reference], list(reference.values()), rtol=0, atol=1e-10)
    images = np.array(list(got))[:, 2:]
    assert not images[:, ~np.array(pbc)].any(), "shift along a non-periodic direction"


def test_molecule_in_a_huge_box_matches_molecule_path(aspirin):
    pos = aspirin.positions[7] + 50.0
    cell = 100.0 * np.eye(3)
    molecule = edge_set(molecule_edges(torch.as_tensor(pos), CUTOFF, method="brute_force"))
    for pbc in (True, [True, True, False], False):
        edge_index, shift = periodic_edges(pos, cell, pbc, CUTOFF)
        assert not shift.any()
        assert edge_set(edge_index) == molecule
    # an ASE molecule with no cell at all
    edge_index, shift = periodic_edges(pos, np.zeros((3, 3)), False, CUTOFF)
    assert edge_set(edge_index) == molecule and not shift.any()


def test_periodic_edges_accepts_a_tensor_and_no_atoms():
    edge_index, _ = periodic_edges(torch.tensor([[0.0, 0.0, 0.0]]), 2.0 * np.eye(3), True, 2.5)
    assert edge_index.shape == (2, 6)  # its own six nearest images
    edge_index, shift = periodic_edges(np.zeros((0, 3)), 2.0 * np.eye(3), True, 2.5)
    assert edge_index.shape == (2, 0) and shift.shape == (0, 3)


@pytest.mark.parametrize("bad, error, match", [
    (dict(positions=np.array([[0.0, np.nan, 0.0]])), ValueError, "NaN or infinite"),
    (dict(positions=np.zeros((2, 2))), ValueError, r"shape \[N, 3\]"),
    (dict(cell=np.eye(2)), ValueError, r"shape \[3, 3\]"),
    (dict(cell=np.full((3, 3), np.inf)), ValueError, "NaN or infinite"),
    (dict(cell=np.diag([4.0, 4.0, 0.0])), ValueError, "singular"),
    (dict(pbc=[True, True]), ValueError, "3 bools"),
    (dict(pbc=[1, 1, 1]), TypeError, "3 bools"),
    (dict(cutoff=0.0), ValueError, "positive"),
    (dict(cutoff=np.nan), ValueError, "finite"),
])
def test_periodic_edges_rejects_bad_input(bad, error, match):
    kwargs = dict(positions=np.zeros((2, 3)), cell=4.0 * np.eye(3), pbc=True, cutoff=3.0) | bad
    with pytest.raises(error, match=match):
        periodic_edges(**kwargs)
