"""The fused C++ edge-attention kernel against the eager layer it replaces at inference."""

import warnings

import numpy as np
import pytest
import torch

from qeq_ase.model.attention import EquivariantAttention
from qeq_ase.kernels import edge_kernel
from qeq_ase.kernels.edge_kernel import EdgeCSR, edge_attention, edge_blocks, receiver_order, resolve_edge_backend
from qeq_ase.data.neighbors import periodic_edges
from test_model import tiny_model


def random_layer_inputs(normalize: bool, seed: int = 0):
    """A small random graph (unsorted edges, one isolated atom) and float64 layer inputs."""
    gen = torch.Generator().manual_seed(seed)
    N, F, H = 8, 16, 4
    layer = EquivariantAttention(F, H, normalize=normalize).double()
    pos = torch.randn(N, 3, generator=gen, dtype=torch.float64) * 1.5
    pos[-1] += 100.0  # no neighbours
    pairs = [(j, i) for i in range(N) for j in range(N) if i != j and (pos[i] - pos[j]).norm() < 3.0]
    edge_index = torch.tensor(pairs).T[:, torch.randperm(len(pairs), generator=gen)]
    E = edge_index.shape[1]
    inputs = {
        "qkv": torch.randn(N, 5 * F, generator=gen, dtype=torch.float64),
        "vin": torch.randn(N, 3, F, generator=gen, dtype=torch.float64),
        "filt": torch.randn(E, 4 * F, generator=gen, dtype=torch.float64),
        "envelope": torch.rand(E, generator=gen, dtype=torch.float64),
        "unit": torch.nn.functional.normalize(torch.randn(E, 3, generator=gen, dtype=torch.float64), dim=-1),
    }
    with torch.no_grad():
        layer.log_inv_temperature.copy_(torch.rand(H, generator=gen, dtype=torch.float64) * 2)
    return layer, edge_index, inputs


@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
def test_fused_messages_equal_the_eager_layer(normalize):
    layer, edge_index, x = random_layer_inputs(normalize)
    eager = layer._messages(x["qkv"], x["vin"], x["filt"], edge_index, x["envelope"], x["unit"])
    order = receiver_order(edge_index)
    assert order is not None
    sorted_index = edge_index[:, order]
    edge_inputs = [x[k][order] for k in ("filt", "envelope", "unit")]
    fused = edge_attention(x["qkv"], x["vin"], *edge_inputs, layer.logit_scale(),
                           EdgeCSR.from_sorted_edges(sorted_index, x["qkv"].shape[0]), normalize)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert fused[0][-1].abs().max() == 0 and fused[1][-1].abs().max() == 0  # the isolated atom


@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
def test_fused_backward_passes_gradcheck(normalize):
    layer, edge_index, x = random_layer_inputs(normalize, seed=1)
    order = receiver_order(edge_index)
    csr = EdgeCSR.from_sorted_edges(edge_index[:, order], x["qkv"].shape[0])
    inputs = [x["qkv"], x["vin"]] + [x[k][order] for k in ("filt", "envelope", "unit")]
    scale = layer.logit_scale().detach()
    inputs = [t.clone().requires_grad_(True) for t in inputs + [scale]]
    if not normalize:  # the dot-product scale is a constant
        inputs[-1].requires_grad_(False)
    assert torch.autograd.gradcheck(lambda *a: edge_attention(*a, csr, normalize), inputs)


@pytest.mark.parametrize("planar", [True, False], ids=["planar", "interleaved"])
def test_int8_filter_gradient_codes_are_those_of_the_int8_quantizer(planar):
    """The backward's int8 mode writes what quantize_per_row_limbs makes of the float dfilt."""
    from qeq_ase.quant.int8_kernels import load_cpp_kernels
    from qeq_ase.quant.quantizers import TINY

    layer, edge_index, x = random_layer_inputs(True, seed=2)
    order = receiver_order(edge_index)
    csr = EdgeCSR.from_sorted_edges(edge_index[:, order], x["qkv"].shape[0])
    graph = (csr.rowptr, csr.sender, csr.receiver, csr.colptr, csr.sender_order)
    inputs = [x["qkv"], x["vin"]] + [x[k][order] for k in ("filt", "envelope", "unit")] + [layer.logit_scale()]
    inputs = [t.detach().float().contiguous() for t in inputs]
    kernel = edge_kernel.load_edge_kernel()
    _, _, *saved = kernel.forward(*inputs, *graph, True)
    gen = torch.Generator().manual_seed(3)
    grad_s, grad_v = torch.randn(8, 16, generator=gen), torch.randn(8, 3, 16, generator=gen)
    col_scale = torch.rand(64, generator=gen) + 0.5
    args = (grad_s, grad_v, *inputs, *saved, *graph, True)
    reference = kernel.backward(*args)
    out = kernel.backward(*args, filt_col_scale=col_scale, tiny=TINY, planar=planar)
    codes, scale = load_cpp_kernels().quantize_per_row_limbs(reference[2], col_scale, 127, TINY, 2, planar)
    assert out[2].numel() == 0 and reference[6].numel() == 0  # no float dfilt / no codes
    assert torch.equal(out[6], codes) and torch.equal(out[7], scale)
    for a, b in zip(out[:6], reference[:6]):
        if a.numel():
            assert torch.equal(a, b)
    assert codes.abs().max() == 127  # a real quantization: every row reaches the range


def test_fused_kernel_has_no_double_backward():
    layer, edge_index, x = random_layer_inputs(True)
    order = receiver_order(edge_index)
    csr = EdgeCSR.from_sorted_edges(edge_index[:, order], x["qkv"].shape[0])
    qkv = x["qkv"].clone().requires_grad_(True)
    agg_s, _ = edge_attention(qkv, x["vin"], *(x[k][order] for k in ("filt", "envelope", "unit")),
                              layer.logit_scale().detach(), csr, True)
    grad, = torch.autograd.grad(agg_s.square().sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|not differentiable"):
        grad.sum().backward()


def test_csr_refuses_unsorted_edges():
    with pytest.raises(ValueError, match="sorted by receiver"):
        EdgeCSR.from_sorted_edges(torch.tensor([[0, 1], [1, 0]]), 2)


def test_missing_compiler_falls_back_to_the_eager_layers(monkeypatch, tmp_path):
    from qeq_ase.kernels.cpp_extension import LazyExtension

    monkeypatch.setattr(edge_kernel, "_EXTENSION", LazyExtension("qeq_missing", tmp_path / "missing.cpp", [],
                                                                 "the fused edge-attention kernel"))
    with pytest.raises(RuntimeError, match="C\\+\\+17 compiler"):
        resolve_edge_backend("cpp")
    with pytest.warns(RuntimeWarning, match="eager attention layers"):
        assert resolve_edge_backend("auto") == "eager"
    model = tiny_model()  # and the model still runs, on the eager layers, warning once
    positions = torch.tensor([[0.0, 0, 0], [1.1, 0, 0], [0, 1.2, 0.1]], dtype=torch.float64)
    args = (positions, model.species_index(torch.tensor([6, 1, 8])),
            torch.tensor([[1, 2, 0, 2, 0, 1], [0, 0, 1, 1, 2, 2]]), torch.zeros(3, dtype=torch.long), 1)
    with pytest.warns(RuntimeWarning):
        out = model.energy_and_forces(*args)
    assert torch.isfinite(out["forces"]).all() and model.edge_backend() == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resolved once per model: no warning per call
        model.energy_and_forces(*args)
    with pytest.raises(RuntimeError, match="C\\+\\+17 compiler"):
        model.set_edge_backend("cpp").energy_and_forces(*args)


def test_unknown_backend_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="edge_backend must be one of"):
        tiny_model().set_edge_backend("fast")
    monkeypatch.setenv("QEQ_EDGE_BACKEND", "fast")
    with pytest.raises(ValueError, match="QEQ_EDGE_BACKEND"):
        tiny_model()


def test_environment_sets_the_default_when_a_model_is_built(monkeypatch):
    """``QEQ_EDGE_BACKEND`` is read when a model is made, never per call."""
    monkeypatch.setenv("QEQ_EDGE_BACKEND", "eager")
    model = tiny_model()
    monkeypatch.setenv("QEQ_EDGE_BACKEND", "cpp")
    assert model.edge_backend() == "eager"
    assert tiny_model().edge_backend() == "cpp"
    assert model.set_edge_backend("auto").edge_backend() == "cpp"


def _energy_and_forces(model, graph_args, backend, training=False):
    out = model.set_edge_backend(backend).energy_and_forces(*graph_args, training=training)
    return out["energy"].detach(), out["forces"].detach()


def test_edge_blocks_cut_between_receivers_and_cover_every_edge(monkeypatch):
    receiver = torch.tensor([0, 0, 0, 1, 3, 3, 4, 4, 4, 4, 6])
    edge_index = torch.stack([torch.zeros_like(receiver), receiver])
    monkeypatch.setattr(edge_kernel, "BLOCK_BYTES", 3)
    monkeypatch.setattr(edge_kernel, "MIN_BLOCK_EDGES_PER_NODE", 0)
    blocks = edge_blocks(edge_index, 7, row_bytes=1)  # ~3 edges a block
    assert [(b.edges.start, b.edges.stop) for b in blocks] == [(0, 3), (3, 6), (6, 10), (10, 11)]
    for b in blocks:  # every block's CSR spans all nodes; its rows hold only its own receivers
        assert b.csr.rowptr.shape == (8,) and b.csr.rowptr[-1] == b.edges.stop - b.edges.start
    assert edge_blocks(edge_index[:, :0], 7, row_bytes=1) == []
    monkeypatch.setattr(edge_kernel, "MIN_BLOCK_EDGES_PER_NODE", 2)  # >= 14 edges a block: one block
    assert [(b.edges.start, b.edges.stop) for b in edge_blocks(edge_index, 7, row_bytes=1)] == [(0, 11)]


@pytest.mark.parametrize("block_bytes", [8 << 20, 64], ids=["one-block", "many-blocks"])
@pytest.mark.parametrize("variant", [{}, {"attention_normalization": False, "neighbor_embedding": True}],
                         ids=["cosine", "dot+neighbour-embedding"])
def test_model_energy_and_forces_fused_equal_eager_periodic(monkeypatch, variant, block_bytes):
    """A periodic cell (edge shifts, an atom's own images, unsorted matscipy edges), float64."""
    model = tiny_model(**variant)
    rng = np.random.default_rng(3)
    cell = np.diag([4.0, 4.5, 5.0])
    positions = rng.uniform(0, 4, (10, 3))
    edge_index, shift = periodic_edges(positions, cell, np.array([True, True, True]), model.config.cutoff)
    species = model.species_index(torch.as_tensor(rng.choice([1, 6, 8], 10)))
    args = (torch.as_tensor(positions), species, torch.as_tensor(edge_index), torch.zeros(10, dtype=torch.long), 1,
            torch.as_tensor(shift))
    assert model.edge_backend() == "cpp"
    monkeypatch.setattr(edge_kernel, "BLOCK_BYTES", block_bytes)  # 64 bytes: one edge per block
    monkeypatch.setattr(edge_kernel, "MIN_BLOCK_EDGES_PER_NODE", 0)
    e_fused, f_fused = _energy_and_forces(model, args, "auto")
    e_eager, f_eager = _energy_and_forces(model, args, "eager")
    torch.testing.assert_close(e_fused, e_eager, rtol=0, atol=1e-10)
    torch.testing.assert_close(f_fused, f_eager, rtol=0, atol=1e-10)


def test_edge_pairs_group_each_edge_with_its_reverse():
    edge_index = torch.tensor([[1, 0, 2, 0, 2, 1, 3], [0, 1, 0, 2, 1, 2, 0]])  # 3 -> 0 has no reverse
    pairs = edge_kernel.edge_pairs(edge_index, 4)
    assert pairs.first.shape == (4,) and torch.equal(pairs.row[pairs.first], torch.arange(4))
    key = {frozenset(e) for e in edge_index.T.tolist()}
    assert len(key) == 4
    for a in range(7):
        for b in range(7):
            same = set(edge_index[:, a].tolist()) == set(edge_index[:, b].tolist())
            assert (pairs.row[a] == pairs.row[b]) == same
    assert edge_kernel.edge_pairs(edge_index[:, 6:], 4) is None  # no edge shares a pair: nothing to save
    assert edge_kernel.plan_fused_edges(edge_index, torch.zeros(7, 3), 4, 64)[3] is None  # periodic shifts


@pytest.mark.parametrize("variant", [{}, {"attention_normalization": False, "neighbor_embedding": True}],
                         ids=["cosine", "dot+neighbour-embedding"])
def test_model_filters_once_per_pair_of_edges_give_the_per_edge_results(monkeypatch, variant):
    """A molecule (no shifts, one block): the fused path computes the filters once per pair of
    edges; energy and forces equal those of per-edge filters and of the eager layers, float64."""
    model = tiny_model(**variant)
    rng = np.random.default_rng(4)
    positions = torch.as_tensor(rng.uniform(0, 3.5, (9, 3)))
    species = model.species_index(torch.as_tensor(rng.choice([1, 6, 8], 9)))
    from qeq_ase.data.neighbors import molecule_edges

    args = (positions, species, molecule_edges(positions, model.config.cutoff), torch.zeros(9, dtype=torch.long), 1)
    used = []
    pairs_of = edge_kernel.edge_pairs
    monkeypatch.setattr(edge_kernel, "edge_pairs", lambda *a: used.append(pairs_of(*a)) or used[-1])
    e_pairs, f_pairs = _energy_and_forces(model, args, "auto")
    assert used and used[-1] is not None and 2 * used[-1].first.numel() == args[2].shape[1]
    monkeypatch.setattr(edge_kernel, "edge_pairs", lambda *a: None)
    e_edges, f_edges = _energy_and_forces(model, args, "auto")
    e_eager, f_eager = _energy_and_forces(model, args, "eager")
    for e, f in ((e_edges, f_edges), (e_eager, f_eager)):
        torch.testing.assert_close(e_pairs, e, rtol=0, atol=1e-10)
        torch.testing.assert_close(f_pairs, f, rtol=0, atol=1e-10)


def test_training_keeps_the_eager_double_backward():
    """``training=True`` must not route through the once-differentiable kernel."""
    model = tiny_model()
    positions = torch.tensor([[0.0, 0, 0], [1.1, 0, 0], [0, 1.2, 0.1]], dtype=torch.float64)
    species = model.species_index(torch.tensor([6, 1, 8]))
    edge_index = torch.tensor([[1, 2, 0, 2, 0, 1], [0, 0, 1, 1, 2, 2]])
    out = model.set_edge_backend("cpp").energy_and_forces(positions, species, edge_index,
                                                          torch.zeros(3, dtype=torch.long), 1, training=True)
    out["forces"].square().sum().backward()  # second derivatives reach the parameters
    assert model.layers[0].qkv.weight.grad is not None
