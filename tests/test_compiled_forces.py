"""The compiled force graph trains the same model as the eager double backward."""

import numpy as np
import pytest
import torch

from qeq_ase.train.compiled_forces import CompiledEnergyForces
from qeq_ase.data.graph import molecules_to_graph

from qeq_ase.testing import tiny_model


def _four_layer_model(dtype):
    # Four layers: TorchInductor's own index_add gave forces ~5% off in float64 for this depth
    return tiny_model(dtype, reference_energy=False, num_layers=4, neighbor_embedding=True).train()


def _batch(dtype, seed=0):
    rng = np.random.default_rng(seed)
    numbers = [np.array([6, 8, 1, 1, 6, 1]), np.array([8, 1, 1])]
    positions = [rng.normal(scale=1.2, size=(len(z), 3)) for z in numbers]
    return molecules_to_graph(numbers, positions, 5.0, dtype, centre=True)


def _loss_and_grads(model, out, graph):
    energy, forces = out["interaction_energy"], out["forces"]
    loss = energy.pow(2).mean() + (forces - 0.1).pow(2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return loss, grads


def _compare(backend, dtype, rtol):
    model = _four_layer_model(dtype)
    compiled = CompiledEnergyForces(model, backend=backend)
    for seed in (0, 1):  # a second batch of another size reuses the graph traced on the first
        graph = _batch(dtype, seed) if seed == 0 else molecules_to_graph(
            [np.array([6, 1, 1, 1, 1])], [np.random.default_rng(3).normal(size=(5, 3))], 5.0, dtype, centre=True)
        species = model.species_index(graph.numbers)
        eager = model.energy_and_forces(graph.positions, species, graph.edge_index, graph.batch, graph.num_graphs,
                                        training=True)
        fast = compiled(graph.positions, species, graph.edge_index, graph.batch, graph.num_graphs)
        torch.testing.assert_close(fast["forces"], eager["forces"], rtol=rtol, atol=0)
        torch.testing.assert_close(fast["interaction_energy"], eager["interaction_energy"], rtol=rtol, atol=0)
        loss_e, grads_e = _loss_and_grads(model, eager, graph)
        loss_c, grads_c = _loss_and_grads(model, fast, graph)
        torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=0)
        for (name, _), ge, gc in zip(model.named_parameters(), grads_e, grads_c):
            assert (ge is None) == (gc is None), name
            if ge is not None:
                torch.testing.assert_close(gc, ge, rtol=rtol, atol=rtol * ge.abs().max().item(), msg=name)


def test_traced_force_graph_matches_eager_double_backward_in_float64():
    _compare(backend=None, dtype=torch.float64, rtol=1e-10)


@pytest.mark.slow
def test_inductor_compiled_force_graph_matches_eager_in_float64():
    _compare(backend="inductor", dtype=torch.float64, rtol=1e-9)


def test_a_first_batch_with_as_many_atoms_as_features_does_not_fix_the_atom_count():
    """Traced on 16 atoms with 16 features (salicylic acid: 8 x 16 atoms, F = 128), the graph
    must still serve batches of other sizes."""
    model = tiny_model(torch.float64, reference_energy=False)
    assert model.config.num_features == 16
    compiled = CompiledEnergyForces(model, backend=None)
    rng = np.random.default_rng(5)
    for n_atoms in (16, 17, 9):
        graph = molecules_to_graph([rng.choice([1, 6, 8], n_atoms)], [rng.uniform(0, 4, (n_atoms, 3))], 5.0,
                                   torch.float64, centre=True)
        species = model.species_index(graph.numbers)
        eager = model.energy_and_forces(graph.positions, species, graph.edge_index, graph.batch, graph.num_graphs,
                                        training=True)
        fast = compiled(graph.positions, species, graph.edge_index, graph.batch, graph.num_graphs)
        torch.testing.assert_close(fast["forces"], eager["forces"], rtol=1e-10, atol=0)
