"""Real INT8 layers: int8 storage, agreement with the dequantized float layer and with QAT,
input gradients (forces), double backward, rotation-invariant vector grids.

Tolerances: the int8 GEMM is exact (int32 accumulation), so the int8 layer and its
dequantized float reference differ only by float32 rounding of the rescale (~1e-6
relative). ``backward="int8"`` also quantizes the output gradient per row, in two int8 limbs
whatever the activations' (one limb gave ~0.4% relative error): bound 1e-4. Tests of the
straight-through gradient itself ask for ``backward="float"``, exact up to rounding.
"""

import pytest
import torch
from e3nn import o3

from qeq_ase.kernels.cpp_extension import LazyExtension
from qeq_ase.quant import int8_kernels
from qeq_ase.quant.int8_kernels import EagerKernels
from qeq_ase.quant.int8_linear import Int8ScalarLinear, Int8VectorLinear
from qeq_ase.quant.qat import NaiveQATLayerFactory, QATLayerFactory, QATScalarLinear, QATVectorLinear
from qeq_ase.quant.quantizers import LSQQuantizer, fake_quantize_per_atom, lsq_codes

FLOAT_RTOL = 1e-5     # int8 layer vs dequantized float32 reference (rounding of the rescale)
INT8_GRAD_RTOL = 1e-4  # backward="int8": per-row two-limb int8 gradients


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def qat_scalar(K=32, N=24, bias=True, seed=0, clip=False):
    torch.manual_seed(seed)
    layer = QATScalarLinear(K, N, bias)
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
        x = torch.randn(200, K)
        layer.input_quantizer.initialize(x)
        if clip:  # a step so small that ~5% of inputs are clipped
            layer.input_quantizer.step.mul_(0.5)
    return layer


def qat_vector(K=32, N=24, seed=0):
    torch.manual_seed(seed)
    layer = QATVectorLinear(K, N)
    with torch.no_grad():
        layer.input_quantizer.magnitude.initialize(torch.randn(50, 3, K).norm(dim=1))
    return layer


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_scalar_int8_layer_holds_int8_and_matches_qat_and_reference(backend):
    qat = qat_scalar()
    layer = Int8ScalarLinear.from_qat(qat, backend=backend)
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8_t.dtype == torch.int8
    assert ("_int_mm" in layer.kernel or "brgemm" in layer.kernel) and ("C++" in layer.kernel) == (backend == "cpp")
    assert layer.irreps_in == qat.irreps_in and layer.irreps_out == qat.irreps_out
    torch.manual_seed(1)
    for shape in [(1, 32), (21, 32), (400, 32), (2, 7, 32)]:
        x = torch.randn(*shape) * 1.5       # some inputs beyond the calibrated range: clipped
        y = layer(x)
        assert y.shape == (*shape[:-1], 24) and y.dtype == torch.float32
        assert rel_err(y, layer.reference_forward(x).detach()) < FLOAT_RTOL
        assert rel_err(y, qat(x).detach()) < FLOAT_RTOL
    # the input codes are exactly those of the QAT quantizer
    codes = layer._ops().quantize_per_tensor(x.reshape(-1, 32), layer.input_step_value, 127)
    assert torch.equal(codes.float(), lsq_codes(x.reshape(-1, 32), qat.input_quantizer.effective_step(), 127, 127))
    assert layer(torch.zeros(0, 32)).shape == (0, 24)


def test_cpp_and_eager_kernels_agree_bitwise():
    cpp = int8_kernels.load_cpp_kernels()
    torch.manual_seed(2)
    x, v = torch.randn(37, 20), torch.randn(11, 3, 20)
    assert torch.equal(cpp.quantize_per_tensor(x, 0.01, 127), EagerKernels.quantize_per_tensor(x, 0.01, 127))
    for a, b in zip(cpp.quantize_per_atom(v, 127, 1e-30), EagerKernels.quantize_per_atom(v, 127, 1e-30)):
        assert torch.equal(a, b)
    cs = torch.rand(20)
    for a, b in zip(cpp.quantize_per_row(x, cs, 127, 1e-30), EagerKernels.quantize_per_row(x, cs, 127, 1e-30)):
        assert torch.equal(a, b)
    for a, b in zip(cpp.quantize_per_row_limbs(x, cs, 127, 1e-30, 2),
                    EagerKernels.quantize_per_row_limbs(x, cs, 127, 1e-30, 2)):
        assert torch.equal(a, b)
    acc, rs, bias = torch.randint(-50000, 50000, (37, 20), dtype=torch.int32), torch.rand(1), torch.randn(20)
    assert torch.equal(cpp.rescale(acc, rs, 1, cs, bias, x, 0.01, 127, 1),
                       EagerKernels.rescale(acc, rs, 1, cs, bias, x, 0.01, 127, 1))


@pytest.mark.parametrize("backend", ["cpp", "eager"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("backward", ["float", "int8"])
def test_scalar_input_gradient_matches_dequantized_layer(backward, clip, backend):
    layer = Int8ScalarLinear.from_qat(qat_scalar(clip=clip), backward=backward, backend=backend)
    torch.manual_seed(3)
    x = torch.randn(300, 32)
    g = torch.randn(300, 24)
    xi, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    layer(xi).backward(g)
    layer.reference_forward(xr).backward(g)
    assert rel_err(xi.grad, xr.grad) < (FLOAT_RTOL if backward == "float" else INT8_GRAD_RTOL)
    clipped = (x / layer.input_step_value).abs() > 127
    assert (xi.grad[clipped] == 0).all() and (clipped.any() or not clip)  # STE: clipped inputs get 0


@pytest.mark.parametrize("backend", ["cpp", "eager"])
@pytest.mark.parametrize("clip", [False, True])
def test_two_limb_int8_backward_is_nearly_exact(clip, backend):
    """With two-limb activations too the int8 backward carries ``g * s_w`` in two limbs."""
    layer = Int8ScalarLinear.from_qat(qat_scalar(clip=clip), backward="int8", backend=backend)
    layer.set_activation_limbs(2)
    vector = Int8VectorLinear.from_qat(qat_vector(), backward="int8", backend=backend)
    vector.set_activation_limbs(2)
    torch.manual_seed(3)
    for lay, x, g in ((layer, torch.randn(300, 32), torch.randn(300, 24)),
                      (vector, torch.randn(20, 3, 32), torch.randn(20, 3, 24))):
        xi, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        lay(xi).backward(g)
        lay.reference_forward(xr).backward(g)
        assert rel_err(xi.grad, xr.grad) < INT8_GRAD_RTOL


def test_gradient_is_the_finite_difference_of_the_straight_through_surrogate():
    """Rounding makes the quantized layer piecewise constant; forces are the gradient of its
    straight-through surrogate ``clamp(x) @ W_deq.T + b``. Check that by central differences."""
    layer = Int8ScalarLinear.from_qat(qat_scalar(K=8, N=5, clip=True), backward="float")
    lim = 127 * layer.input_step_value
    w = layer.dequantized_weight().double()
    c = torch.randn(5, dtype=torch.float64)

    def surrogate(x):
        return ((x.clamp(-lim, lim) @ w.T) * c).sum()

    torch.manual_seed(4)
    x = torch.randn(6, 8) * 1.5
    xi = x.clone().requires_grad_(True)
    (layer(xi) * c.float()).sum().backward()
    h = 1e-6
    for i, j in [(0, 0), (1, 3), (4, 7), (5, 2)]:
        if abs(abs(x[i, j].item()) - lim) < 10 * h:
            continue
        xp, xm = x.double().clone(), x.double().clone()
        xp[i, j] += h
        xm[i, j] -= h
        fd = (surrogate(xp) - surrogate(xm)) / (2 * h)
        assert xi.grad[i, j].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_double_backward_matches_dequantized_layer(backend):
    layer = Int8ScalarLinear.from_qat(qat_scalar(clip=True), backend=backend, backward="float")
    torch.manual_seed(5)
    x = torch.randn(50, 32)
    results = []
    for forward in (layer, layer.reference_forward):
        c = torch.randn(24, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
        xi = x.clone().requires_grad_(True)
        energy = (torch.nn.functional.silu(forward(xi)) * c).sum()
        (force,) = torch.autograd.grad(energy, xi, create_graph=True)
        force.pow(2).sum().backward()                       # a force loss, as in training
        results.append((force.detach(), c.grad, xi.grad))
    for a, b in zip(*results):
        assert rel_err(a, b) < FLOAT_RTOL


def test_vector_layer_per_atom_grid_matches_qat_and_is_rotation_invariant():
    qat = qat_vector()
    layer = Int8VectorLinear.from_qat(qat)                    # QAT layer's own MDDQ runs first
    assert layer.input_mode == "atom" and layer.mddq is not None and layer.bias is None
    assert layer.irreps_in == qat.irreps_in and layer.irreps_out == qat.irreps_out
    torch.manual_seed(7)
    v = torch.randn(30, 3, 32) * torch.rand(30, 1, 32)
    v[0] = 0.0                                                # an atom without vector features
    y = layer(v)
    assert y.shape == (30, 3, 24) and torch.isfinite(y).all() and (y[0] == 0).all()
    assert rel_err(y, qat(v).detach()) < FLOAT_RTOL
    assert rel_err(y, layer.reference_forward(v).detach()) < FLOAT_RTOL
    # per-atom int8 input: codes of the QAT fake quantizer, scale invariant under rotation
    vq = layer.mddq(v)
    codes, scale = layer._ops().quantize_per_atom(vq, 127, 1e-30)
    assert torch.equal(codes.float() * scale[:, None, None], fake_quantize_per_atom(vq))
    rotation = o3.rand_matrix(dtype=torch.float64)
    vr = torch.einsum("ij,njf->nif", rotation, vq.double()).float().contiguous()
    assert torch.allclose(layer._ops().quantize_per_atom(vr, 127, 1e-30)[1], scale, rtol=1e-6)
    # the whole layer is equivariant up to the int8 error of its input grid
    y_rot = layer(torch.einsum("ij,njf->nif", rotation, v.double()).float())
    y_ref = torch.einsum("ij,njf->nif", rotation, y.double()).float()
    assert rel_err(y_rot, y_ref) < 2e-2


@pytest.mark.parametrize("backend", ["cpp", "eager"])
@pytest.mark.parametrize("backward", ["float", "int8"])
def test_vector_input_gradient_matches_qat_layer(backward, backend):
    qat = qat_vector()
    layer = Int8VectorLinear.from_qat(qat, backward=backward, backend=backend)
    torch.manual_seed(8)
    v = torch.randn(20, 3, 32)
    g = torch.randn(20, 3, 24)
    vi, vq = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    layer(vi).backward(g)
    qat(vq).backward(g)
    assert rel_err(vi.grad, vq.grad) < (FLOAT_RTOL if backward == "float" else INT8_GRAD_RTOL)


def test_linked_observer_conversion_and_naive_vector_layer():
    torch.manual_seed(9)
    # full scheme, observer upstream: the int8 layer only re-grids per atom
    qat = QATLayerFactory().vector_linear(16, 8)
    qat.input_quantizer = None
    layer = Int8VectorLinear.from_qat(qat)
    v = torch.randn(5, 3, 16)
    assert layer.mddq is None and rel_err(layer(v), qat(v).detach()) < FLOAT_RTOL
    # naive scheme: one static per-tensor step for all components, from the linked observer
    naive = NaiveQATLayerFactory().vector_linear(16, 8)
    observer, naive.input_quantizer = naive.input_quantizer, None
    observer(v)                                               # lazy init of its step
    with pytest.raises(ValueError, match="input_quantizer"):
        Int8VectorLinear.from_qat(naive)
    layer = Int8VectorLinear.from_qat(naive, input_quantizer=observer)
    assert layer.input_mode == "static"
    assert rel_err(layer(v), naive(observer(v)).detach()) < FLOAT_RTOL


def test_state_dict_round_trip_and_input_checks():
    layer = Int8ScalarLinear.from_qat(qat_scalar())
    fresh = Int8ScalarLinear(32, 24)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(9, 32)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"weight_int8", "weight_scale", "bias", "input_step"}
    with pytest.raises(TypeError, match="float32"):
        layer(x.double())
    assert layer.double()(x).dtype == torch.float32          # .double() leaves the int8 layer intact
    linked = QATScalarLinear(4, 4)
    linked.input_quantizer = None                             # its observer was not passed
    with pytest.raises(ValueError, match="input_quantizer"):
        Int8ScalarLinear.from_qat(linked)
    with pytest.raises(RuntimeError, match="not initialised"):
        Int8ScalarLinear.from_qat(linked, input_quantizer=LSQQuantizer())


def test_int_mm_odd_shapes():
    torch.manual_seed(10)
    for K, N in [(3, 1), (1, 5), (7, 13)]:
        qat = qat_scalar(K=K, N=N)
        layer = Int8ScalarLinear.from_qat(qat)
        x = torch.randn(1, K)
        assert rel_err(layer(x), qat(x).detach()) < FLOAT_RTOL


def test_missing_compiler_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(int8_kernels, "_EXTENSION", LazyExtension("qeq_missing", tmp_path / "missing.cpp", [],
                                                                  "the int8 kernels"))
    with pytest.raises(RuntimeError, match="C\\+\\+17 compiler"):
        int8_kernels.get_kernels("cpp")
    with pytest.warns(RuntimeWarning, match="Falling back to eager"):
        assert int8_kernels.get_kernels("auto") is EagerKernels


def test_two_limb_kernels_agree_bitwise_and_refine_the_input_grid():
    cpp = int8_kernels.load_cpp_kernels()
    torch.manual_seed(5)
    x, v = torch.randn(37, 20) * 0.5, torch.randn(11, 3, 20)
    codes = cpp.quantize_static_limbs(x, 0.01, 127)
    assert codes.shape == (74, 20) and torch.equal(codes, EagerKernels.quantize_static_limbs(x, 0.01, 127))
    hi, lo = codes.view(37, 2, 20).float().unbind(1)
    inside = (x / 0.01).abs() <= 127
    # hi is the one-limb code; lo resolves the remainder on a 254x finer grid
    assert torch.equal(hi, cpp.quantize_per_tensor(x, 0.01, 127).float())
    assert ((hi + lo / 254) * 0.01 - x)[inside].abs().max() <= 0.01 / 254 / 2 * 1.001
    for a, b in zip(cpp.quantize_per_atom_limbs(v, 127, 1e-30, 2), EagerKernels.quantize_per_atom_limbs(v, 127, 1e-30, 2)):
        assert torch.equal(a, b)
    acc = torch.randint(-50000, 50000, (74, 20), dtype=torch.int32)
    rs, cs, bias = torch.rand(1), torch.rand(20), torch.randn(20)
    assert torch.equal(cpp.rescale(acc, rs, 1, cs, bias, None, 1.0, 127, 2),
                       EagerKernels.rescale(acc, rs, 1, cs, bias, None, 1.0, 127, 2))


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_two_limb_layers_are_close_to_the_float_layer_and_keep_the_gradient(backend):
    qat, x = qat_scalar(clip=True), torch.randn(60, 32, requires_grad=True)
    # the float backward: the straight-through gradient itself ("auto" runs two-limb int8 gradients with brgemm)
    layer = Int8ScalarLinear.from_qat(qat, backend=backend, backward="float")
    w, b = layer.dequantized_weight(), layer.bias
    step = layer.input_step_value
    exact = torch.nn.functional.linear(x.detach().clamp(-127 * step, 127 * step), w, b)
    one = layer(x).detach()
    layer.set_activation_limbs(2)
    y = layer(x)
    assert rel_err(y.detach(), layer.reference_forward(x).detach()) < FLOAT_RTOL
    # measured: the input rounding error falls ~250x with the second limb
    assert rel_err(y.detach(), exact) < rel_err(one, exact) / 50
    g = torch.randn_like(y)
    gx, = torch.autograd.grad(y, x, g)
    layer.set_activation_limbs(1)
    gx1, = torch.autograd.grad(layer(x), x, g)
    assert torch.equal(gx, gx1)  # the same straight-through gradient
    vector = Int8VectorLinear.from_qat(qat_vector(), backend=backend)
    vin = torch.randn(9, 3, 32)
    one = vector(vin)
    vector.set_activation_limbs(2)
    exact = torch.nn.functional.linear(vin, vector.dequantized_weight())
    assert rel_err(vector(vin), vector.reference_forward(vin)) < FLOAT_RTOL
    assert rel_err(vector(vin), exact) < rel_err(one, exact) / 50
    with pytest.raises(ValueError, match="activation limbs"):
        vector.set_activation_limbs(3)


def gemm_pair(make, gemm_a: str, gemm_b: str, limbs: int):
    """Two copies of the layer ``make()`` builds, with the two GEMMs and ``limbs`` input limbs."""
    pair = make(), make()
    for layer, gemm in zip(pair, (gemm_a, gemm_b)):
        layer.set_gemm(gemm)
        layer.set_activation_limbs(limbs)
    return pair


needs_onednn = pytest.mark.skipif(not hasattr(torch.ops.onednn, "qlinear_prepack") or not int8_kernels.gemm_available("onednn"),
                                  reason="oneDNN's int8 linear needs AMX-INT8 here (else a reference kernel)")


@needs_onednn
@pytest.mark.parametrize("backend", ["cpp", "eager"])
@pytest.mark.parametrize("limbs", [1, 2])
def test_onednn_and_int_mm_gemms_agree(limbs, backend):
    """oneDNN's int8 linear (AMX) with its epilogue scales and "sum" of the lo limb gives
    the layer outputs and int8-backward gradients of ``torch._int_mm`` + rescale up to
    float32 rounding, on both sides of the row count where the layer switches GEMM."""
    import copy

    torch.manual_seed(11)
    for make, shape in ((lambda: Int8ScalarLinear.from_qat(qat_scalar(N=40, clip=True), backward="int8",
                                                           backend=backend), (300, 32)),
                        (lambda: Int8VectorLinear.from_qat(qat_vector(N=40), backward="int8", backend=backend),
                         (100, 3, 32))):
        a, b = gemm_pair(make, "int_mm", "onednn", limbs)
        assert "qlinear_pointwise" in b.kernel and "qlinear_pointwise" not in a.kernel
        for rows in (1, shape[0]):  # 1 row: below ONEDNN_MIN_ROWS, _int_mm runs in both
            x = torch.randn(rows, *shape[1:]) * 1.5
            g = torch.randn(*a(x).shape)
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            ya = a(xa)
            with torch.profiler.profile() as prof:
                yb = b(xb)
            gemm_rows = x.numel() // x.shape[-1]
            assert any("qlinear_pointwise" in e.name for e in prof.events()) == (gemm_rows >= int8_kernels.ONEDNN_MIN_ROWS)
            assert rel_err(yb.detach(), ya.detach()) < 1e-6
            assert rel_err(yb.detach(), b.reference_forward(x)) < FLOAT_RTOL
            ya.backward(g)
            yb.backward(g)
            assert rel_err(xb.grad, xa.grad) < 1e-6
            assert torch.equal(xb.grad == 0, xa.grad == 0)  # the same STE mask
        c = copy.deepcopy(b)  # oneDNN's packed weights cannot be copied: the copy packs its own
        assert torch.equal(c(x), b(x))
    narrow = Int8ScalarLinear.from_qat(qat_scalar(N=1), backend=backend)  # 32 -> 1: oneDNN's reference kernel
    narrow.set_gemm("onednn")
    with torch.profiler.profile() as prof:
        narrow(torch.randn(300, 32))
    assert not any("qlinear_pointwise" in e.name for e in prof.events())
    with pytest.raises(ValueError, match="gemm must be one of"):
        a.set_gemm("amx")


needs_amx = pytest.mark.skipif(not int8_kernels.cpu_has_amx_int8(), reason="the brgemm GEMM needs AMX-INT8")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@needs_amx
@pytest.mark.parametrize("limbs", [1, 2])
def test_brgemm_and_int_mm_gemms_agree_bitwise(limbs, two_threads):
    """The brgemm tiles (16-32 rows each, rescale fused, non-temporal stores from 8 MB of output
    on) give bit for bit the outputs and gradients of torch._int_mm + rescale: the same integer
    products, the same rescale. Row counts below, at and beyond one tile and beyond the
    streaming threshold; clipped inputs (STE mask); the int8 and the code-fed backward."""
    torch.manual_seed(13)
    for make, shapes in ((lambda: Int8ScalarLinear.from_qat(qat_scalar(N=40, clip=True), backward="int8"),
                          [(1, 32), (16, 32), (37, 32), (70, 32)]),
                         (lambda: Int8ScalarLinear.from_qat(qat_scalar(N=64, clip=True), backward="int8"),
                          [(40000, 32)]),  # a 10 MB output, 64 wide: non-temporal stores
                         (lambda: Int8VectorLinear.from_qat(qat_vector(N=40), backward="int8"),
                          [(1, 3, 32), (37, 3, 32)])):
        a, b = gemm_pair(make, "int_mm", "brgemm", limbs)
        assert "brgemm" in b.kernel and "brgemm" not in a.kernel
        for shape in shapes:
            x = torch.randn(*shape) * 1.5
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            with torch.profiler.profile() as prof:
                yb = b(xb)
            assert any("qeq_int8_brgemm" in e.name for e in prof.events())
            ya = a(xa)
            assert torch.equal(ya, yb)
            g = torch.randn(*ya.shape)
            ya.backward(g)
            yb.backward(g)
            assert torch.equal(xa.grad, xb.grad)
    # the gradient codes of a fused producer (interleaved limbs for brgemm)
    layer = Int8ScalarLinear.from_qat(qat_scalar(N=40, clip=True))
    layer.set_activation_limbs(2)
    layer.set_gemm("brgemm")
    assert not layer.planar_gradient_codes(1000)
    g, x = torch.randn(1000, 40), torch.randn(1000, 32) * 1.5
    codes, scale = layer._ops().quantize_per_row_limbs(g, layer.weight_scale, 127, layer.gradient_tiny, 2)
    ref = EagerKernels.linear_backward_from_codes(codes, scale, layer.weight_int8, x, layer.input_step_value, 127, 2)
    assert torch.equal(layer.input_grad_from_codes(codes, scale, x), ref)


@pytest.mark.parametrize("gemm", ["brgemm", "onednn"])
def test_amx_gemms_without_amx_are_refused_by_name(monkeypatch, gemm):
    """Neither AMX GEMM is ever picked, or runs when asked for by name, on a CPU without AMX-INT8
    (brgemm cannot run; oneDNN's int8 linear falls back to a reference kernel ~1000x slower)."""
    monkeypatch.setattr(int8_kernels, "cpu_has_amx_int8", lambda: False)
    monkeypatch.delenv("QEQ_INT8_GEMM", raising=False)
    assert not int8_kernels.gemm_available(gemm)
    with pytest.raises(ValueError, match="needs a CPU with AMX-INT8"):
        int8_kernels.resolve_gemm(gemm)
    monkeypatch.setenv("QEQ_INT8_GEMM", gemm)
    with pytest.raises(ValueError, match="needs a CPU with AMX-INT8"):
        int8_kernels.resolve_gemm("auto")
    monkeypatch.delenv("QEQ_INT8_GEMM")
    assert int8_kernels.resolve_gemm("auto") == "int_mm"
    layer = Int8ScalarLinear.from_qat(qat_scalar(N=40))
    with pytest.raises(ValueError, match="needs a CPU with AMX-INT8"):
        layer.set_gemm(gemm)
    assert layer.gemm == "int_mm"


def test_multithreaded_quantizers_and_rescale_agree_bitwise_with_eager(two_threads):
    """The C++ passes split rows over threads (built with -fopenmp): on inputs of many chunks
    their codes, scales and outputs are still those of the eager definitions."""
    cpp = int8_kernels.load_cpp_kernels()
    torch.manual_seed(14)
    x, v, cs = torch.randn(3000, 96) * 0.7, torch.randn(900, 3, 96), torch.rand(96)
    assert torch.equal(cpp.quantize_per_tensor(x, 0.01, 127), EagerKernels.quantize_per_tensor(x, 0.01, 127))
    assert torch.equal(cpp.quantize_static_limbs(x, 0.01, 127), EagerKernels.quantize_static_limbs(x, 0.01, 127))
    for limbs in (1, 2):
        for a, b in zip(cpp.quantize_per_atom_limbs(v, 127, 1e-30, limbs),
                        EagerKernels.quantize_per_atom_limbs(v, 127, 1e-30, limbs)):
            assert torch.equal(a, b)
        for a, b in zip(cpp.quantize_per_row_limbs(x, cs, 127, 1e-30, limbs),
                        EagerKernels.quantize_per_row_limbs(x, cs, 127, 1e-30, limbs)):
            assert torch.equal(a, b)
    acc, rs, bias = torch.randint(-50000, 50000, (6000, 96), dtype=torch.int32), torch.rand(1), torch.randn(96)
    assert torch.equal(cpp.rescale(acc, rs, 1, cs, bias, x, 0.01, 127, 2),
                       EagerKernels.rescale(acc, rs, 1, cs, bias, x, 0.01, 127, 2))


def test_planar_two_limb_codes_hold_the_interleaved_rows():
    cpp = int8_kernels.load_cpp_kernels()
    torch.manual_seed(12)
    x, v, cs = torch.randn(37, 20), torch.randn(11, 3, 20), torch.rand(20)
    inter = cpp.quantize_static_limbs(x, 0.01, 127)
    planar = cpp.quantize_static_limbs(x, 0.01, 127, planar=True)
    assert torch.equal(planar, inter.view(37, 2, 20).transpose(0, 1).reshape(74, 20))
    assert torch.equal(planar, EagerKernels.quantize_static_limbs(x, 0.01, 127, planar=True))
    codes, scale = cpp.quantize_per_atom_limbs(v, 127, 1e-30, 2, planar=True)
    assert torch.equal(codes, cpp.quantize_per_atom_limbs(v, 127, 1e-30, 2)[0].permute(2, 0, 1, 3))
    assert torch.equal(codes, EagerKernels.quantize_per_atom_limbs(v, 127, 1e-30, 2, planar=True)[0])
    codes, scale = cpp.quantize_per_row_limbs(x, cs, 127, 1e-30, 2, planar=True)
    assert torch.equal(codes, cpp.quantize_per_row_limbs(x, cs, 127, 1e-30, 2)[0].view(37, 2, 20).transpose(0, 1)
                       .reshape(74, 20))
    assert torch.equal(codes, EagerKernels.quantize_per_row_limbs(x, cs, 127, 1e-30, 2, planar=True)[0])
