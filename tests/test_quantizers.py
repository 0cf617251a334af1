"""Fake quantizers (LSQ, MDDQ, naive, weights) and the QAT model built from them."""

import math

import numpy as np
import pytest
import torch
from e3nn import o3

from qeq_ase.data.graph import molecules_to_graph
from qeq_ase.model.network import QEqModel
from qeq_ase.testing import tiny_model
from qeq_ase.quant.qat import (QATScalarLinear, QATVectorLinear, calibration, convert_to_qat,
                               quantization_state, quantizer_parameters, set_quantization, widen_activation_steps)
from qeq_ase.quant.quantizers import (LSQQuantizer, MDDQQuantizer, NaiveQuantizer, fake_quantize_per_atom,
                                      fake_quantize_weight, per_atom_scale, quantize_weight)

# Largest angle between u and its MDDQ code direction: each component moves <= 1/254.
DIRECTION_BOUND_RAD = math.asin(math.sqrt(3) / 254)


def rotate(v: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate vector features ``[N, 3, F]``."""
    return torch.einsum("ij,njf->nif", rotation, v)


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between vectors ``[N, 3, F]`` along the Cartesian axis (atan2: accurate near 0)."""
    return torch.atan2(torch.linalg.cross(a, b, dim=1).norm(dim=1), (a * b).sum(dim=1))


# --------------------------------------------------------------------------- LSQ


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_codes_on_grid_within_bounds_and_error_half_step(signed):
    torch.manual_seed(0)
    x = torch.randn(500, 16, dtype=torch.float64) * 3
    x = x if signed else x.abs()
    q = LSQQuantizer(8, signed=signed)
    out = q(x)                                   # lazy init: max|x| / Qp, nothing clipped
    step = q.effective_step()
    codes = out / step
    assert torch.allclose(codes, codes.round(), atol=1e-9)
    lo, hi = (-127, 127) if signed else (0, 255)
    assert codes.min() >= lo - 1e-9 and codes.max() <= hi + 1e-9
    assert (out - x).abs().max() <= step / 2 + 1e-12
    # a smaller step clips: clipped values sit on the last code
    q.step.data.fill_(step / 4)
    out = q(x)
    assert torch.allclose(out.abs().max(), torch.tensor(hi * step / 4, dtype=torch.float64))


def test_lsq_lazy_init_enable_switch_and_zero_batch():
    q = LSQQuantizer()
    assert not q.initialized
    zeros = torch.zeros(4, 8)
    assert q(zeros) is zeros and not q.initialized          # all-zero batch: no information
    x = torch.randn(64, 8)
    q(x)
    assert q.initialized and q.effective_step() == pytest.approx(x.abs().max().item() / 127, rel=1e-6)
    q.enabled = False
    assert q(x) is x
    with pytest.raises(ValueError, match="init must be one of"):
        LSQQuantizer(init="minmax")


def test_calibration_covers_every_batch_and_margin_widens_the_steps():
    """A step calibrated on one batch clips a later, larger one (its inputs then drop out of
    the forces); calibration takes the largest |x| of all batches, and the margin adds headroom."""
    q, mddq = LSQQuantizer(), MDDQQuantizer()
    small, large = torch.randn(64, 8), 3.0 * torch.randn(64, 8)
    q.calibrating = mddq.calibrating = True
    for x in (small, large, small):
        assert q(x) is x
        v = x.reshape(64, 1, 8).expand(64, 3, 8)
        assert mddq(v) is v
    assert q.effective_step() == pytest.approx(large.abs().max().item() / 127, rel=1e-6)
    assert mddq.effective_step() == pytest.approx(large.abs().max().item() * math.sqrt(3) / 255, rel=1e-5)
    q.calibrating = False
    assert torch.equal(q(large).abs().max(), large.abs().max())       # nothing clipped
    model = convert_to_qat(tiny_float_model(), "full")
    with calibration(model):
        predict(model, molecule_graph())
    before = [s.item() for s in quantizer_parameters(model)]
    widen_activation_steps(model, 2.0)
    assert [s.item() for s in quantizer_parameters(model)] == [2.0 * b for b in before]
    with pytest.raises(ValueError, match="step margin must be >= 1"):
        widen_activation_steps(model, 0.5)


def test_lsq_step_gradient_matches_formula_and_step_learns():
    torch.manual_seed(1)
    x = torch.randn(256, 8, dtype=torch.float64)
    q = LSQQuantizer(4).double()                             # 4 bits: Qn = Qp = 7
    q.step.data.fill_(0.2)
    w = torch.randn_like(x)
    (q(x) * w).sum().backward()
    y = x / 0.2
    inside = (y >= -7) & (y <= 7)
    d_out_d_step = torch.where(inside, torch.round(y) - y, y.clamp(-7, 7))  # Esser et al., eq. 3
    g = 1 / math.sqrt(x.numel() * 7)
    assert q.step.grad.item() == pytest.approx((w * d_out_d_step).sum().item() * g, rel=1e-10)

    # a badly initialised step (4x too large) learns to reduce the quantization error
    q.step.data.fill_(4 * x.abs().max().item() / 7)
    opt = torch.optim.Adam(q.parameters(), lr=0.02)
    first = None
    for _ in range(60):
        loss = (q(x) - x).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_lsq_double_backward():
    torch.manual_seed(2)
    layer = QATScalarLinear(8, 4).double()
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    e = torch.nn.functional.silu(layer(x)).sum()
    (dx,) = torch.autograd.grad(e, x, create_graph=True)
    dx.pow(2).sum().backward()
    assert layer.input_quantizer.step.grad is not None and torch.isfinite(layer.input_quantizer.step.grad)
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_fake_quant_per_channel_and_ste(per_channel):
    torch.manual_seed(3)
    w = (torch.randn(6, 10) * torch.logspace(-2, 1, 6)[:, None]).requires_grad_(True)
    wq = fake_quantize_weight(w, 8, per_channel)
    codes, scale = quantize_weight(w, 8, per_channel)
    assert codes.dtype == torch.int8 and scale.shape == (6,)
    assert torch.equal(wq.detach(), codes.float() * scale[:, None])
    if per_channel:                        # every row uses its full range
        assert torch.equal(codes.abs().amax(dim=1), torch.full((6,), 127, dtype=torch.int8))
        assert ((wq - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    wq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))            # straight through


# --------------------------------------------------------------------------- MDDQ


def mddq_fixture(dtype=torch.float64, seed=4):
    torch.manual_seed(seed)
    h = torch.randn(40, 3, 16, dtype=dtype) * torch.rand(40, 1, 16, dtype=dtype)
    q = MDDQQuantizer(8).to(dtype)
    q(h)                                                      # lazy init of the magnitude step
    return q, h


def test_mddq_direction_to_8_bit_accuracy_and_magnitude_on_grid():
    q, h = mddq_fixture()
    out = q(h)
    step = q.effective_step()
    r, r_out = h.norm(dim=1), out.norm(dim=1)
    assert torch.allclose(r_out / step, (r_out / step).round(), atol=1e-9)    # magnitude codes
    assert (r_out - r).abs().max() <= step / 2 + 1e-9
    kept = r_out > 0
    assert angle(h, out)[kept].max() <= DIRECTION_BOUND_RAD
    assert angle(h, out)[kept].mean() < 0.5 * DIRECTION_BOUND_RAD


def test_mddq_magnitude_invariant_and_direction_equivariant_under_rotation():
    q, h = mddq_fixture()
    out = q(h)
    torch.manual_seed(5)
    for _ in range(5):
        rotation = o3.rand_matrix(dtype=torch.float64)
        out_r = q(rotate(h, rotation))
        # magnitudes: the same codes (|R h| = |h| to 1e-16, far from a rounding boundary)
        assert torch.allclose(out_r.norm(dim=1), out.norm(dim=1), rtol=0, atol=1e-12)
        # directions: both within the 8-bit bound of the exact rotated direction
        kept = out.norm(dim=1) > 0
        assert angle(out_r, rotate(out, rotation))[kept].max() <= 2 * DIRECTION_BOUND_RAD


def test_naive_quantizer_breaks_magnitude_invariance():
    q, h = mddq_fixture()
    naive = NaiveQuantizer(8, branch="vector").double()
    out = naive(h)
    out_r = naive(rotate(h, o3.rand_matrix(dtype=torch.float64)))
    assert (out_r.norm(dim=1) - out.norm(dim=1)).abs().max() > 1e-3 * naive.effective_step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mddq_zero_and_tiny_vectors_are_finite_with_finite_gradients(dtype):
    q, h = mddq_fixture(dtype)
    h = h.clone()
    h[:5] = 0.0                       # atoms without vector features
    h[5:8] *= 1e-9                    # nearly zero
    h.requires_grad_(True)
    out = q(h)
    assert torch.isfinite(out).all() and (out[:5] == 0).all()
    w = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * w).sum(), h, create_graph=True)
    assert torch.isfinite(g).all()
    g.pow(2).sum().backward()         # double backward (force training)
    assert torch.isfinite(h.grad).all() and torch.isfinite(q.magnitude.step.grad)
    zeros = torch.zeros(3, 3, 4, dtype=dtype, requires_grad=True)
    fresh = MDDQQuantizer(8).to(dtype)
    assert fresh(zeros) is zeros and not fresh.initialized    # nothing to learn a step from


def test_mddq_off_is_identity_and_shape_is_checked():
    q, h = mddq_fixture()
    q.enabled = False
    assert q(h) is h
    with pytest.raises(ValueError, match=r"\[N, 3, F\]"):
        q(torch.randn(4, 16))


def test_per_atom_requantization_scale_is_rotation_invariant():
    _, h = mddq_fixture()
    rotation = o3.rand_matrix(dtype=torch.float64)
    assert torch.allclose(per_atom_scale(rotate(h, rotation)), per_atom_scale(h), rtol=1e-14)
    hq = fake_quantize_per_atom(h)
    assert ((hq - h).abs() <= per_atom_scale(h) / 2 + 1e-15).all()


# --------------------------------------------------------------------------- QAT model


def tiny_float_model(dtype=torch.float64) -> QEqModel:
    return tiny_model(dtype, reference_energy=False, neighbor_embedding=True)


def molecule_graph(dtype=torch.float64, seed=0):
    rng = np.random.default_rng(seed)
    numbers = np.array([6, 6, 8, 1, 1, 1, 8, 1, 6, 1])
    positions = rng.normal(size=(len(numbers), 3)) * 1.3
    return molecules_to_graph([numbers, numbers], [positions, positions[::-1] * 0.9], 5.0, dtype)


def predict(model, graph, training=False):
    return model.energy_and_forces(graph.positions, model.species_index(graph.numbers), graph.edge_index,
                                   graph.batch, graph.num_graphs, training=training)


@pytest.mark.parametrize("scheme", ["full", "naive"])
def test_qat_model_loads_float_weights_and_reproduces_float_model_when_off(scheme):
    model = tiny_float_model()
    qat = convert_to_qat(model, scheme, scalar=False, vector=False)
    assert quantization_state(qat) == {"scalar": False, "vector": False}
    graph = molecule_graph()
    ref, out = predict(model, graph), predict(qat, graph)
    assert torch.equal(ref["energy"], out["energy"]) and torch.equal(ref["forces"], out["forces"])
    # every observer that feeds a linear quantizes its input (no double quantization)
    linked = [m for m in qat.modules() if isinstance(m, (QATScalarLinear, QATVectorLinear)) and m.input_observer]
    # per layer: qkv, vector_mix, out, ffn_hidden; once: readout_hidden and the neighbour embedding's combine
    assert len(linked) == 4 * model.config.num_layers + 2
    assert all(m.input_quantizer is None for m in linked)


@pytest.mark.parametrize("scheme", ["full", "naive"])
def test_qat_model_quantized_stays_close_and_double_backward_works(scheme):
    model = tiny_float_model(torch.float32)
    graph = molecule_graph(torch.float32)
    qat = convert_to_qat(model, scheme).train()
    with calibration(qat):
        calibrated = predict(qat, graph)                      # float pass that sets every step
    ref = predict(model, graph)
    assert torch.equal(calibrated["forces"], ref["forces"])
    steps = quantizer_parameters(qat)
    # all steps set, except layer 0's vector input, which is always zero
    assert sum(s.detach().item() == 0 for s in steps) == 1
    out = predict(qat, graph, training=True)
    force_error = (out["forces"] - ref["forces"]).pow(2).mean().sqrt() / ref["forces"].pow(2).mean().sqrt()
    # an untrained network with O(1) random weights and ~25 quantization points: 6-9% here
    assert 0 < force_error < 0.2, force_error
    assert (out["interaction_energy"] - ref["interaction_energy"]).abs().max() < 0.2
    loss = out["forces"].pow(2).mean() + out["interaction_energy"].pow(2).mean()
    loss.backward()
    grads = [p.grad for p in qat.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(s.grad is not None and s.grad.abs() > 0 for s in steps) >= len(steps) - 2


def test_branch_separated_schedule():
    qat = convert_to_qat(tiny_float_model(), "full", scalar=True, vector=False)
    assert quantization_state(qat) == {"scalar": True, "vector": False}
    vector_modules = [m for m in qat.modules() if isinstance(m, (MDDQQuantizer, QATVectorLinear))]
    assert vector_modules and not any(m.enabled for m in vector_modules)
    assert set_quantization(qat, vector=True) == {"scalar": True, "vector": True}
    assert set_quantization(qat, scalar=False) == {"scalar": False, "vector": True}
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        convert_to_qat(tiny_float_model(), "int4")
