"""The int8 GEMMs and kernels behind the layers of :mod:`qeq_ase.quant.int8_linear`: the GEMM
choice, the exact int8 product :func:`int_mm`, the C++ kernel set and its eager-torch twin
(:class:`EagerKernels`, with the autograd node :class:`_EagerInt8Linear`).

The int8 GEMM (``gemm``, :data:`GEMMS`) is ``torch._int_mm`` (oneDNN's VNNI kernel,
every x86 CPU), with the GEMM and the rescale run on blocks of rows whose int32 result
stays in cache; oneDNN's int8 linear ``onednn::qlinear_pointwise`` on a weight packed
once by ``onednn::qlinear_prepack`` (AMX-INT8 tiles), whose epilogue applies the scales and
the bias and whose "sum" post-op adds the lo limb's product; or (``"brgemm"``) oneDNN's
batch-reduce GEMM micro-kernel (``at::native::cpublas::brgemm``, AMX-INT8 tiles) called from
the C++ kernels on tiles of 16-32 rows, each tile's int32 result rescaled while it is in L1
and the output written once (non-temporal stores for outputs of 8 MB and more).
``gemm="auto"`` picks brgemm where the CPU has AMX-INT8 (:func:`cpu_has_amx_int8`) and
``_int_mm`` elsewhere (the environment variable ``QEQ_INT8_GEMM`` overrides that choice):
without AMX, oneDNN's int8 linear falls back to a reference kernel ~1000x slower
(``shared/notes/int8-on-cpu.md``). brgemm and ``_int_mm`` give bit-identical outputs (the
same integer products, the same rescale); oneDNN's int8 linear agrees with them to float32
rounding (~1e-7). With oneDNN's int8 linear, inputs of fewer than ``ONEDNN_MIN_ROWS`` (128)
rows and weights narrower than ``ONEDNN_MIN_WIDTH`` (32) use ``_int_mm``; with brgemm,
products narrower than ``BRGEMM_MIN_WIDTH`` (16) or not a multiple of 4 wide.

The fused kernels and the autograd node are C++ (``qeq_ase/kernels/csrc/int8_kernels.cpp``),
built with ``torch.utils.cpp_extension`` on the first forward pass (never at import; 30-50 s
once, then cached per environment and CPU, :mod:`qeq_ase.kernels.cpp_extension`).
``backend="auto"`` falls back to eager torch with a warning when the build fails (or when
``QEQ_INT8_BACKEND=eager``); ``backend="cpp"`` raises instead.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..kernels.cpp_extension import CSRC, OPENMP_FLAGS, LazyExtension
from ..kernels.cpu_features import has_amx_int8 as cpu_has_amx_int8
from ..kernels.cpu_features import int_mm_is_exact
from .quantizers import TINY, per_atom_scale

BACKENDS = ("auto", "cpp", "eager")
GEMMS = ("auto", "int_mm", "onednn", "brgemm")
#: The oneDNN GEMM runs only for inputs of at least this many rows and for weights whose
#: two dimensions are at least ONEDNN_MIN_WIDTH (narrower ones hit oneDNN's reference
#: kernel); ``kOnednnMinRows``/``kOnednnMinWidth`` in the C++ file.
ONEDNN_MIN_ROWS = 128
ONEDNN_MIN_WIDTH = 32
EXTENSION_NAME = "qeq_int8_kernels"
_SOURCE = CSRC / "int8_kernels.cpp"
# Built with -fopenmp (cpp_extension.OPENMP_FLAGS) so that its at::parallel_for loops use every
# thread; the inner loops carry "#pragma omp simd", without which they stopped vectorising inside
# OpenMP's outlined regions (tried without it 2026-11-28: slower on two threads than on one).
_CFLAGS = ["-O3", "-ffp-contract=off", *OPENMP_FLAGS]
_NO_PACK = torch.empty(0, dtype=torch.int8)  # "no packed weight": the GEMM is torch._int_mm
#: Limbs of the gradient codes of the int8 backward, whatever the activations' (one limb would
#: cost ~1% of the gradient; ``kGradientLimbs`` in the C++ file).
GRADIENT_LIMBS = 2


#: Up to this reduction width a float32 GEMM of int8 codes (|c| <= 127) is exact: every partial
#: sum is an integer below 2^24 (``kExactFloatK`` in the C++ file).
EXACT_FLOAT_K = (1 << 24) // (127 * 127)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact int32 product of int8 ``a [M, K]`` and ``b [K, N]``: ``torch._int_mm`` where it is
    exact (VNNI, AMX), else the same integers from a float GEMM (``cpu_features.int_mm_is_exact``)."""
    if int_mm_is_exact():
        return torch._int_mm(a, b)
    dtype = torch.float32 if a.shape[1] <= EXACT_FLOAT_K else torch.float64
    with torch.profiler.record_function("qeq_int8_gemm_via_float"):
        return torch.mm(a.to(dtype), b.to(dtype)).to(torch.int32)


# ---------------------------------------------------------------------------------------
# Kernels: C++ (built lazily) or eager torch with the same signatures and results
# ---------------------------------------------------------------------------------------

class EagerKernels:
    """Eager-torch twins of the C++ kernels: same arguments, same codes (used as fallback)."""

    name = "eager torch"

    @staticmethod
    def quantize_per_tensor(x, step, qmax):
        return torch.clamp(torch.round(x / step), -qmax, qmax).to(torch.int8)

    @staticmethod
    def quantize_per_atom(v, qmax, tiny):
        scale = per_atom_scale(v, qmax)
        codes = torch.clamp(torch.round(v / scale), -qmax, qmax).to(torch.int8)
        return codes, scale.reshape(-1)

    @staticmethod
    def split_limbs(y, qmax, planar=False):
        """``[M, K]`` values on the step grid -> ``[2M, K]`` (hi, lo) int8 codes: rows
        interleaved (``_int_mm``) or planar, all hi rows then all lo rows (oneDNN)."""
        yc = torch.clamp(y, -qmax, qmax)
        hi = torch.round(yc)
        lo = torch.round((yc - hi) * (2.0 * qmax))
        return torch.stack([hi, lo], dim=0 if planar else 1).reshape(2 * y.shape[0], y.shape[1]).to(torch.int8)

    @classmethod
    def quantize_static_limbs(cls, x, step, qmax, planar=False):
        return cls.split_limbs(x / step, qmax, planar)

    @classmethod
    def quantize_per_atom_limbs(cls, v, qmax, tiny, limbs, planar=False):
        if limbs == 1:
            return cls.quantize_per_atom(v, qmax, tiny)
        scale = per_atom_scale(v, qmax)
        codes = cls.split_limbs((v / scale).reshape(-1, v.shape[2]), qmax, planar)
        shape = (2, v.shape[0], 3, v.shape[2]) if planar else (v.shape[0], 3, 2, v.shape[2])
        return codes.view(shape), scale.reshape(-1)

    @staticmethod
    def quantize_per_row(x, col_scale, qmax, tiny):
        y = x * col_scale if col_scale is not None else x
        scale = y.abs().amax(dim=1).clamp_min(tiny) / qmax
        return torch.clamp(torch.round(y / scale[:, None]), -qmax, qmax).to(torch.int8), scale

    @classmethod
    def quantize_per_row_limbs(cls, x, col_scale, qmax, tiny, limbs, planar=False):
        if limbs == 1:
            return cls.quantize_per_row(x, col_scale, qmax, tiny)
        y = x * col_scale if col_scale is not None else x
        scale = y.abs().amax(dim=1).clamp_min(tiny) / qmax
        return cls.split_limbs(y / scale[:, None], qmax, planar), scale

    @staticmethod
    def rescale(acc, row_scale, row_group, col_scale, bias, mask_x, mask_step, qmax, limbs=1):
        r = row_scale if row_scale.numel() == 1 else row_scale.repeat_interleave(row_group)[:, None]
        out = acc.to(row_scale.dtype)
        if limbs == 2:
            pairs = out.view(-1, 2, out.shape[1])
            out = pairs[:, 0] + pairs[:, 1] * (1.0 / (2.0 * qmax))
        out = out * (r * col_scale if col_scale is not None else r)
        if bias is not None and bias.numel():
            out = out + bias
        if mask_x is not None:
            y = mask_x / mask_step
            out = out * ((y >= -qmax) & (y <= qmax)).to(out.dtype)
        return out

    @staticmethod
    def ste_mask_(grad, x, step, qmax):
        y = x / step
        return grad.mul_(((y >= -qmax) & (y <= qmax)).to(grad.dtype))

    @classmethod
    def linear_static_forward(cls, x, step, qmax, w_t, w_scale, bias, limbs=1, packed=None):
        onednn = _use_onednn(packed, x.shape[0])
        codes = (cls.quantize_per_tensor(x, step, qmax) if limbs == 1
                 else cls.quantize_static_limbs(x, step, qmax, planar=onednn))
        clipped = bool((x.abs() / step > qmax).any())
        if onednn:
            return _onednn_linear(codes, limbs, step, 1.0 / (2.0 * qmax), packed, w_scale, bias), clipped
        acc = int_mm(codes, w_t)
        return cls.rescale(acc, x.new_full((1,), step), 1, w_scale, bias, None, 1.0, qmax, limbs), clipped

    @classmethod
    def linear_atom_forward(cls, x, qmax, tiny, w_t, w_scale, limbs=1, packed=None):
        onednn = _use_onednn(packed, x.shape[0])
        codes, scale = cls.quantize_per_atom_limbs(x.view(-1, 3, x.shape[1]), qmax, tiny, limbs, planar=onednn)
        codes = codes.reshape(limbs * x.shape[0], x.shape[1])
        if onednn:
            y = _onednn_linear(codes, limbs, 1.0, 1.0 / (2.0 * qmax), packed, w_scale, None)
            return y.mul_(scale.repeat_interleave(3)[:, None])
        return cls.rescale(int_mm(codes, w_t), scale, 3, w_scale, None, None, 1.0, qmax, limbs)

    @classmethod
    def linear_backward_from_codes(cls, codes, scale, w, x, step, qmax, limbs=1, packed=None):
        if _use_onednn(packed, scale.shape[0]):  # planar codes
            out = _onednn_linear(codes, limbs, 1.0, 1.0 / 254.0, packed, scale.new_ones(w.shape[1]), None)
            out.mul_(scale[:, None])
        else:
            out = cls.rescale(int_mm(codes, w), scale, 1, None, None, None, 1.0, 127, limbs)
        if x is not None:
            cls.ste_mask_(out, x, step, qmax)
        return out

    @classmethod
    def linear_backward_int8(cls, grad, w_scale, w, x, step, qmax, tiny, limbs=1, packed=None):
        onednn = _use_onednn(packed, grad.shape[0])
        codes, scale = cls.quantize_per_row_limbs(grad, w_scale, 127, tiny, limbs, planar=onednn)
        return cls.linear_backward_from_codes(codes, scale, w, x, step, qmax, limbs, packed)

    @staticmethod
    def int8_linear(x, w_t, w, w_deq, w_scale, bias, step, qmax, atom, backward_int8, limbs=1,
                    w_packed=_NO_PACK, w_t_packed=_NO_PACK):
        return _EagerInt8Linear.apply(x, w_t, w, w_deq, w_scale, bias, step, qmax, atom, backward_int8, limbs,
                                      w_packed, w_t_packed)


_EXTENSION = LazyExtension(EXTENSION_NAME, _SOURCE, _CFLAGS, "the qeq_ase int8 C++ kernels",
                           "; or use backend='eager' (slower)", ldflags=OPENMP_FLAGS)


def load_cpp_kernels():
    """Build (first call, 30-50 s) or load the C++ kernels; raise RuntimeError if impossible."""
    module = _EXTENSION.load()
    module.name = "C++ fused (qeq_ase/kernels/csrc/int8_kernels.cpp)"
    module.set_int_mm_via_float(not int_mm_is_exact())
    return module


def get_kernels(backend: str = "auto"):
    """The kernel set for ``backend`` (``"auto"``: C++ if it builds, else eager with a warning)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "cpp":
        return load_cpp_kernels()
    if backend == "eager" or os.environ.get("QEQ_INT8_BACKEND") == "eager":
        return EagerKernels
    try:
        return load_cpp_kernels()
    except RuntimeError as err:
        warnings.warn(f"{err} Falling back to eager torch kernels.", RuntimeWarning, stacklevel=3)
        return EagerKernels


def gemm_available(gemm: str) -> bool:
    """Whether the int8 GEMM ``gemm`` runs fast on this CPU: ``_int_mm`` everywhere; brgemm and
    oneDNN's int8 linear only with AMX-INT8 (without it brgemm cannot run and oneDNN's int8 linear
    falls back to a reference kernel ~1000x slower than fp32)."""
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, not {gemm!r}")
    return gemm in ("auto", "int_mm") or cpu_has_amx_int8()


def resolve_gemm(gemm: str) -> str:
    """``"int_mm"``, ``"onednn"`` or ``"brgemm"`` for a requested ``gemm`` (``"auto"``: brgemm on AMX CPUs;
    the environment variable ``QEQ_INT8_GEMM`` overrides ``"auto"``). A GEMM this CPU cannot run
    fast (:func:`gemm_available`) is refused by name."""
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, not {gemm!r}")
    if gemm == "auto":
        gemm = os.environ.get("QEQ_INT8_GEMM", "auto")
        if gemm not in GEMMS:
            raise ValueError(f"QEQ_INT8_GEMM must be one of {GEMMS}, not {gemm!r}")
    if gemm == "auto":
        gemm = "brgemm" if cpu_has_amx_int8() else "int_mm"
    if not gemm_available(gemm):
        what = "the brgemm int8 GEMM" if gemm == "brgemm" else "oneDNN's int8 linear ('onednn')"
        raise ValueError(f"{what} needs a CPU with AMX-INT8, which this one lacks or oneDNN may not use "
                         f"(cpuinfo flag amx_int8, ONEDNN_MAX_CPU_ISA); use gemm='int_mm' or 'auto'")
    return gemm


class _PackedWeights:
    """Packed copies of a layer's codes for the forward (``W_q [N, K]``) and the backward
    (``W_q^T``) GEMM, made on first use: oneDNN's opaque tensors (``gemm="onednn"``) or the
    VNNI layout of the brgemm micro-kernel (``gemm="brgemm"``; ``_NO_PACK``, i.e. ``_int_mm``,
    for a product whose reduction or output width is not a multiple of 4 or below
    ``BRGEMM_MIN_WIDTH``). Opaque oneDNN tensors cannot be copied or pickled, so a copy of
    the layer starts without them (``_Int8LinearBase.__getstate__``)."""

    def __init__(self):
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, gemm: str, weight_int8: torch.Tensor, weight_int8_t: torch.Tensor,
            ops=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tensors is None:
            if gemm == "onednn":
                prepack = torch.ops.onednn.qlinear_prepack
                self.tensors = (prepack(weight_int8, [1, weight_int8.shape[1]]),
                                prepack(weight_int8_t, [1, weight_int8_t.shape[1]]))
            else:  # brgemm: B = W_q^T [K, N] forward, W_q [N, K] backward
                self.tensors = tuple(ops.pack_vnni(b) if _brgemm_fits(b) else _NO_PACK
                                     for b in (weight_int8_t, weight_int8))
        return self.tensors


#: The brgemm micro-kernel runs products whose reduction and output widths are multiples of 4
#: and at least this wide; narrower ones (the readout's 64 -> 1) run ``torch._int_mm``.
BRGEMM_MIN_WIDTH = 16


def _brgemm_fits(b: torch.Tensor) -> bool:
    """Whether the product with B ``[K, N]`` runs in the brgemm micro-kernel."""
    return all(d % 4 == 0 and d >= BRGEMM_MIN_WIDTH for d in b.shape)


def _use_onednn(packed: torch.Tensor | None, rows: int) -> bool:
    return (packed is not None and packed.is_mkldnn and rows >= ONEDNN_MIN_ROWS
            and min(packed.shape) >= ONEDNN_MIN_WIDTH)


def _onednn_linear(codes, limbs, x_scale, inv_lo, packed, w_scale, bias):
    """Eager twin of ``onednn_linear`` in the C++ file: oneDNN scales the hi limb's product
    and adds the lo limb's (planar codes ``[limbs * M, K]``) with its "sum" post-op."""
    m = codes.shape[0] // limbs
    zeros = torch.zeros(w_scale.numel(), dtype=torch.long)
    bias = bias if bias is not None and bias.numel() else None
    y = torch.ops.onednn.qlinear_pointwise(codes[:m], x_scale, 0, packed, w_scale, zeros, bias, 1.0, 0,
                                           torch.float32, "none", [], "")
    if limbs == 2:
        torch.ops.onednn.qlinear_pointwise.binary(codes[m:], x_scale * inv_lo, 0, packed, w_scale, zeros, y, None,
                                                  1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")
    return y


# ---------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------

class _EagerInt8Linear(torch.autograd.Function):
    """Python twin of ``Int8LinearFunction`` in the C++ file (same arguments, same results).

    ``x [M, K]`` float32; ``w_t [K, N]`` / ``w [N, K]`` int8 codes; ``w_deq [N, K]`` =
    ``W_q * s_w``; ``bias [N]`` or empty; ``atom``: per-atom input grid, else static step.
    """

    @staticmethod
    def forward(ctx, x, w_t, w, w_deq, w_scale, bias, step, qmax, atom, backward_int8, limbs=1,
                w_packed=_NO_PACK, w_t_packed=_NO_PACK):
        if atom:
            y, clipped = EagerKernels.linear_atom_forward(x, qmax, TINY, w_t, w_scale, limbs, w_packed), False
        else:
            y, clipped = EagerKernels.linear_static_forward(x, step, qmax, w_t, w_scale, bias, limbs, w_packed)
        ctx.save_for_backward(x if clipped else None, w, w_deq, w_scale)  # x only for the STE mask
        ctx.step, ctx.qmax, ctx.backward_int8 = step, qmax, backward_int8
        ctx.w_t_packed = w_t_packed
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, w_deq, w_scale = ctx.saved_tensors
        masked = x is not None  # some input was clipped: its gradient is 0 (LSQ's STE)
        if torch.is_grad_enabled():
            # create_graph=True: differentiable float path, so that second derivatives exist.
            gx = grad @ w_deq
            if masked:
                y = x.detach() / ctx.step
                gx = gx * ((y >= -ctx.qmax) & (y <= ctx.qmax)).to(gx.dtype)
        elif not ctx.backward_int8:
            gx = torch.mm(grad.contiguous(), w_deq)
            if masked:
                EagerKernels.ste_mask_(gx, x, ctx.step, ctx.qmax)
        else:
            gx = EagerKernels.linear_backward_int8(grad.contiguous(), w_scale, w, x, ctx.step, ctx.qmax, TINY,
                                                   GRADIENT_LIMBS, ctx.w_t_packed)
        return (gx,) + (None,) * 12
