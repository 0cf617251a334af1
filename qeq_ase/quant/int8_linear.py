"""Real INT8 linear layers for inference: int8 codes, an int8 x int8 -> int32 GEMM, forces.

:class:`Int8ScalarLinear` and :class:`Int8VectorLinear` are the inference twins of
:class:`qeq_ase.model.layers.ScalarLinear` / :class:`~qeq_ase.model.layers.VectorLinear` (same
``irreps_in``/``irreps_out``), built from trained QAT layers with ``from_qat``. A forward
pass is::

    codes = quantize(x)                         int8 [M, K]       (one fused pass)
    acc   = int8_gemm(codes, W_q^T)             int32 [rows, N]
    y     = acc * row_scale * s_w + b           float32 [M, N]    (one fused pass)

With ``activation_limbs = 2`` (:meth:`_Int8LinearBase.set_activation_limbs`, the shipped
setting) each input ``y = x / s_x`` is carried as two int8 codes, ``hi = round(y)`` and
``lo = round((y - hi) * 2 qmax)``, in interleaved rows of one ``[2M, K]`` code matrix: the
same ``_int_mm`` on twice the rows, then ``acc_hi + acc_lo / (2 qmax)`` in the rescale
(oneDNN: two GEMMs on the hi and lo halves of a planar ``[2M, K]``, the second with the
step divided by ``2 qmax`` and summed into the first). The
input grid is 254 times finer, which makes the energy smooth enough in the positions for MD
(``docs/quantization.md``, "Smoothness").

* Weights: symmetric int8 codes ``W_q [N, K]`` per output channel, ``s_w [N]`` (the
  ``1/sqrt(K)`` normalisation of the float layer folded in). Stored as ``weight_int8``;
  a transposed copy ``[K, N]`` is kept for ``_int_mm``.
* Scalar inputs: the static step ``s_x`` learned by LSQ (no reduction over the data):
  ``codes = clamp(round(x / s_x), -127, 127)``, ``row_scale = s_x``.
* Vector inputs ``[N, 3, F]``: one rotation-invariant scale per atom,
  ``s_n = max_f |v[n, :, f]| / 127`` (``quantizers.fake_quantize_per_atom``); the GEMM runs
  on the ``3N`` rows. The input is the MDDQ-quantized ``r~ u~``: its int8 representation
  is that vector re-quantized on the atom's grid (see ``docs/quantization.md``: direction
  codes times magnitude codes are not a GEMM operand, because the factor ``r~/|c|``
  changes along the summed channel axis).

Backward (forces): with the straight-through estimator the layer is linear in ``x``, so
``dL/dx = (g @ W_deq) * mask`` where ``W_deq = W_q * s_w`` and ``mask`` is LSQ's STE mask
(0 where ``x`` was clipped). ``backward="float"`` uses a cached float copy of
``W_deq`` and an fp32 GEMM, exact with respect to the dequantized layer;
``backward="int8"`` quantizes ``g * s_w`` per row in two limbs (whatever the inputs' limbs: one
would cost ~1% of the gradient) and reuses ``W_q`` (packed transposed for oneDNN) in the int8
GEMM. ``backward="auto"`` (default) runs the int8 GEMM in every layer whose GEMM is brgemm (its
tiles quantize their rows of ``g * s_w`` themselves) or an exact ``torch._int_mm`` (VNNI: the
separate quantization pass costs less than the fp32 GEMM it replaces, ``docs/speed.md``), and
the float one elsewhere (oneDNN's int8 linear, ``_int_mm`` computed through fp32). The edge
filters' gradient arrives already quantized: the fused edge kernel writes it as two-limb int8
codes (:func:`qeq_ase.kernels.edge_kernel.filtered_edge_attention`,
:meth:`takes_gradient_codes`; the ``[E, 4F] x [4F, F]`` product, the largest of a call).
Double backward (``create_graph=True``) runs a differentiable float path; with
``backward="float"`` the second derivatives are those of the fake-quantized QAT layer (the STE
mask has zero derivative), with the int8 backward they carry its two-limb gradient error.

The int8 GEMMs (``gemm``, :data:`~qeq_ase.quant.int8_kernels.GEMMS`) and the fused C++ kernels
(``backend``) are those of :mod:`qeq_ase.quant.int8_kernels`; ``layer.kernel`` says what runs.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from ..kernels.cpu_features import int_mm_is_exact
from ..kernels.edge_kernel import GradientCodesFilter
from .int8_kernels import (BACKENDS, ONEDNN_MIN_ROWS, ONEDNN_MIN_WIDTH, _NO_PACK, _PackedWeights, _use_onednn,
                           get_kernels, resolve_gemm)
from .quantizers import (TINY, LSQQuantizer, MDDQQuantizer, fake_quantize_limbs, fake_quantize_per_atom,
                         per_atom_scale, quantize_weight)

BACKWARD_KERNELS = ("auto", "float", "int8")
INPUT_MODES = ("static", "atom")
ACTIVATION_LIMBS = (1, 2)


def auto_backward_is_int8(gemm: str) -> bool:
    """Whether ``backward="auto"`` runs the int8 input-gradient GEMM in every layer with ``gemm``
    (a resolved GEMM name): brgemm, or an exact ``torch._int_mm``; else only in the edge filters."""
    return gemm == "brgemm" or (gemm == "int_mm" and int_mm_is_exact())


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------

def _refresh_after_load(module: "_Int8LinearBase", incompatible_keys) -> None:
    """``load_state_dict`` post-hook (a module-level function, so that the layer pickles)."""
    module.refresh()


class _Int8LinearBase(nn.Module, GradientCodesFilter):
    """Buffers (saved in the state dict): ``weight_int8 [out, in]`` int8, ``weight_scale [out]``
    (float, includes ``1/sqrt(in)``), ``bias [out]`` or None, ``input_step`` (scalar, the
    static activation step; unused for per-atom vector inputs)."""

    input_mode = "static"

    def __init__(self, in_features: int, out_features: int, bias: bool, input_qmax: int = 127,
                 backend: str = "auto", backward: str = "auto", gemm: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if backward not in BACKWARD_KERNELS:
            raise ValueError(f"backward must be one of {BACKWARD_KERNELS}, not {backward!r}")
        self.in_features, self.out_features = in_features, out_features
        self.input_qmax, self.backend, self.backward_kernel = input_qmax, backend, backward
        self.gemm = resolve_gemm(gemm)
        self.activation_limbs = 1
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_step", torch.tensor(1.0))
        self.register_buffer("weight_int8_t", torch.zeros(in_features, out_features, dtype=torch.int8),
                             persistent=False)
        self._kernels = None
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def refresh(self) -> None:
        """Rebuild the derived tensors (transposed codes, caches) after the codes changed."""
        # A fresh [in, out] tensor, not .t().contiguous(): for out == 1 that returns a view
        # with strides (1, 1), which torch._int_mm (CPU, torch 2.13) misreads into garbage.
        self.weight_int8_t = torch.empty(self.in_features, self.out_features, dtype=torch.int8,
                                         device=self.weight_int8.device).copy_(self.weight_int8.t())
        self._weight_dequant = self.weight_int8.float() * self.weight_scale[:, None]
        self.input_step_value = float(self.input_step)
        # kernel arguments as one plain tuple: reading buffers through nn.Module.__getattr__
        # costs ~0.8 us each, which matters at M = 21 (the whole int8 GEMM takes ~5 us)
        bias = self.bias if self.bias is not None else self.weight_scale.new_zeros(0)
        self._call = (self.weight_int8_t, self.weight_int8, self._weight_dequant, self.weight_scale, bias,
                      self.input_step_value, self.input_qmax, self.input_mode == "atom", self.activation_limbs)
        self._packed = _PackedWeights()

    def __getstate__(self):
        # copy.deepcopy / pickle: the built C++ module and oneDNN's packed weights cannot be
        # copied; the copy finds its kernels and packs its weights again on first use.
        state = dict(super().__getstate__())
        state["_kernels"], state["_packed"] = None, _PackedWeights()
        return state

    def set_gemm(self, gemm: str) -> None:
        """The int8 GEMM: ``"int_mm"``, ``"onednn"`` or ``"auto"`` (see :data:`GEMMS`)."""
        self.gemm = resolve_gemm(gemm)
        self.refresh()  # a new packed-weight cache for the new GEMM

    def _packed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Called several times per forward pass, so the answer is cached in a plain attribute
        # (buffer lookups through nn.Module.__getattr__ cost ~1 us each; see refresh()).
        packed = self._packed.tensors
        if packed is None:
            ops = self._ops()
            packs = self.gemm in ("onednn", "brgemm") and self.weight_int8.device.type == "cpu"
            if self.gemm == "brgemm" and not hasattr(ops, "pack_vnni"):
                packs = False  # the eager twin runs torch._int_mm: the same integers, the same rescale
            packed = (self._packed.get(self.gemm, self.weight_int8, self.weight_int8_t, ops) if packs
                      else (_NO_PACK, _NO_PACK))
            self._packed.tensors = packed
        return packed

    def set_activation_limbs(self, limbs: int) -> None:
        """1: int8 input codes (W8A8); 2: two int8 limbs per input, a 2 qmax times finer grid."""
        if limbs not in ACTIVATION_LIMBS:
            raise ValueError(f"activation limbs must be one of {ACTIVATION_LIMBS}, not {limbs!r}")
        self.activation_limbs = limbs
        self.refresh()

    def _apply(self, fn, recurse=True):
        # .to(device) moves the codes; .double()/.half() must not touch them or the float32
        # scales the kernels take, and the dequantized-weight cache must follow the device.
        super()._apply(fn, recurse)
        for name in ("weight_scale", "bias", "input_step"):
            value = getattr(self, name)
            if value is not None and value.dtype != torch.float32:
                setattr(self, name, value.to(torch.float32))
        self.refresh()
        return self

    def _ops(self):
        if self._kernels is None:
            self._kernels = get_kernels(self.backend)
        return self._kernels

    @property
    def kernel(self) -> str:
        """What runs: GEMM, quantize/rescale kernels, backward GEMM (builds the C++ kernels)."""
        backward = ("fp32 GEMM with the dequantized weight" if not self._int8_backward()
                    else "torch._int_mm with per-row two-limb int8 gradients")
        if self.takes_gradient_codes:
            backward += ("; the int8 GEMM on two-limb int8 gradient codes where a fused kernel hands them over "
                         "(edge filters)")
        gemm = ("torch._int_mm (int8 x int8 -> int32)" if int_mm_is_exact() else
                "exact int8 GEMM via fp32 (int8 x int8 -> int32 products; torch._int_mm saturates without VNNI)")
        if self.gemm == "onednn":
            gemm = (f"oneDNN qlinear_pointwise (int8 x int8, AMX-INT8 where present; torch._int_mm below "
                    f"{ONEDNN_MIN_ROWS} rows or {ONEDNN_MIN_WIDTH} channels)")
        elif self.gemm == "brgemm" and self._packed_weights()[0].numel():
            gemm = "oneDNN brgemm micro-kernel (int8 x int8, AMX-INT8, tiles of 16-32 rows, rescale fused)"
        if self._int8_backward() and self.gemm in ("onednn", "brgemm"):
            backward = backward.replace("torch._int_mm", "the same int8 GEMM")
        if self.in_kernel_operands() is not None:
            gemm += "; as an edge filter, run inside the fused edge kernel (forward and input gradient)"
        return f"{gemm} + {self._ops().name} quantize/rescale; backward: {backward}"

    def _int8_backward(self) -> bool:
        """Whether the input gradient runs the int8 GEMM: ``backward="int8"``, or ``"auto"`` with
        the brgemm GEMM on this layer's backward product (quantization fused in its tiles) or an
        exact ``torch._int_mm``."""
        if self.backward_kernel == "auto":
            if self.gemm == "brgemm":  # (a product too narrow for it runs _int_mm, and the float backward)
                return self._packed_weights()[1].numel() > 0
            return auto_backward_is_int8(self.gemm)
        return self.backward_kernel == "int8"

    def dequantized_weight(self) -> torch.Tensor:
        """``W_q * s_w`` as float32 ``[out, in]`` (cached; the effective weight of the layer)."""
        return self._weight_dequant

    def _set_weight(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.weight_int8.copy_(codes)
            self.weight_scale.copy_(scale)
            if self.bias is not None:
                self.bias.copy_(bias.detach())
        self.refresh()

    def _apply_int8(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.dtype is not torch.float32:
            raise TypeError(f"{type(self).__name__} takes float32 inputs, got {x2d.dtype}")
        if x2d.shape[0] == 0:
            return x2d.new_zeros(0, self.out_features)
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        w_t, w, w_deq, w_scale, bias, step, qmax, atom, limbs = self._call
        ops = self._kernels or self._ops()
        w_packed, w_t_packed = self._packed_weights()
        if x2d.requires_grad and torch.is_grad_enabled():
            return ops.int8_linear(x2d, w_t, w, w_deq, w_scale, bias, step, qmax, atom,
                                   self._int8_backward(), limbs, w_packed, w_t_packed)
        if atom:  # no autograd node needed
            return ops.linear_atom_forward(x2d, qmax, TINY, w_t, w_scale, limbs, w_packed)
        return ops.linear_static_forward(x2d, step, qmax, w_t, w_scale, bias, limbs, w_packed)[0]

    # --- GradientCodesFilter: the input gradient as int8 codes (qeq_ase.kernels.edge_kernel) ---

    @property
    def takes_gradient_codes(self) -> bool:
        """Whether a producer of this layer's output gradient may hand it over as int8 codes.

        True for ``backward="auto"`` or ``"int8"`` with static inputs (:meth:`input_grad_from_codes`
        is then the int8 backward of ``backward="int8"``).
        """
        return self.backward_kernel != "float" and self.input_mode == "static"

    gradient_tiny = TINY

    def planar_gradient_codes(self, rows: int) -> bool:
        """Layout of the gradient codes :meth:`input_grad_from_codes` takes for ``rows`` rows:
        planar (oneDNN) or interleaved (``torch._int_mm``)."""
        return _use_onednn(self._packed_weights()[1], rows)

    def in_kernel_operands(self) -> dict | None:
        """What a fused kernel needs to compute this layer itself, or ``None`` where it cannot.

        With the brgemm GEMM, two-limb static inputs, no bias and the C++ kernels, the edge
        kernel quantizes this layer's input and computes its output a window of edges at a
        time, with this layer's arithmetic, and runs its input-gradient GEMM on the gradient
        codes (:mod:`qeq_ase.kernels.edge_kernel`); the returned values are keyword arguments of that
        kernel.
        """
        if (self.gemm != "brgemm" or not self.takes_gradient_codes or self.activation_limbs != 2
                or self.bias is not None):
            return None
        w_fwd, w_bwd = self._packed_weights()
        if not (w_fwd.numel() and w_bwd.numel()):
            return None
        return {"filter_w": w_fwd, "filter_w_bwd": w_bwd, "filter_w_scale": self.weight_scale,
                "filter_step": self.input_step_value, "filter_qmax": float(self.input_qmax)}

    def forward_no_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``(y, clipped)`` for static inputs, without an autograd node: ``clipped`` says
        whether any input lay outside the quantizer's range (its gradient is then masked)."""
        if self.input_mode != "static" or x.dtype is not torch.float32:
            raise ValueError("forward_no_grad takes float32 inputs of a layer with a static input step")
        w_t, w, w_deq, w_scale, bias, step, qmax, atom, limbs = self._call
        w_packed, _ = self._packed_weights()
        x2d = x.reshape(-1, self.in_features).contiguous()
        y, clipped = self._ops().linear_static_forward(x2d, step, qmax, w_t, w_scale, bias, limbs, w_packed)
        return y.reshape(*x.shape[:-1], self.out_features), bool(clipped)

    def input_grad_from_codes(self, codes: torch.Tensor, scale: torch.Tensor,
                              x: torch.Tensor | None = None) -> torch.Tensor:
        """``dL/dx`` from per-row two-limb codes ``[2M, out]`` of ``g * weight_scale`` and their
        scales ``[M]`` (layout :meth:`planar_gradient_codes`): the int8 GEMM with ``W_q`` of
        ``backward="int8"``, masked by the input quantizer's STE when ``x`` (the input) is given."""
        w_t, w, w_deq, w_scale, bias, step, qmax, atom, limbs = self._call
        _, w_t_packed = self._packed_weights()
        return self._ops().linear_backward_from_codes(codes, scale, w, x, step, qmax, 2, w_t_packed)

    def extra_repr(self) -> str:
        inputs = "int8" if self.activation_limbs == 1 else "two-limb int8"
        return (f"{self.irreps_in} -> {self.irreps_out}, int8 weights, {self.input_mode} {inputs} inputs, "
                f"bias={self.bias is not None}, backend={self.backend}, gemm={self.gemm}, "
                f"backward={self.backward_kernel}")


class Int8ScalarLinear(_Int8LinearBase):
    """INT8 twin of :class:`qeq_ase.model.layers.ScalarLinear`: ``[..., in] -> [..., out]`` float32.

    The input is quantized with the static step ``input_step`` (LSQ), codes in ``[-127, 127]``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self.irreps_in = o3.Irreps(f"{in_features}x0e")
        self.irreps_out = o3.Irreps(f"{out_features}x0e")
        self.refresh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._apply_int8(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dequantized float layer (any dtype, autograd): for tests only."""
        step = self.input_step.to(x.dtype)
        xq = fake_quantize_limbs(x, step, self.input_qmax, self.activation_limbs)
        w = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        b = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(xq, w, b)

    @classmethod
    def from_qat(cls, layer: nn.Module, input_quantizer: LSQQuantizer | None = None, **kwargs) -> "Int8ScalarLinear":
        """Convert a trained :class:`qeq_ase.quant.qat.QATScalarLinear`.

        ``input_quantizer``: the observer whose step the layer uses when its own input
        quantizer was linked away (``layer.input_observer`` names it; see
        :func:`qeq_ase.quant.qat.link_observers`).
        """
        quantizer = layer.input_quantizer if layer.input_quantizer is not None else input_quantizer
        if not isinstance(quantizer, LSQQuantizer) or not quantizer.signed:
            raise ValueError(f"{type(layer).__name__} has no signed LSQ input quantizer; pass the observer "
                             f"{getattr(layer, 'input_observer', None)!r} as input_quantizer")
        codes, scale = quantize_weight(layer.weight, layer.weight_bits, layer.per_channel)
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, input_qmax=quantizer.qp, **kwargs)
        new.input_step.fill_(quantizer.effective_step())
        new._set_weight(codes, scale.float() / math.sqrt(layer.in_features), layer.bias)
        return new.to(layer.weight.device)


class Int8VectorLinear(_Int8LinearBase):
    """INT8 twin of :class:`qeq_ase.model.layers.VectorLinear`: ``[N, 3, in] -> [N, 3, out]``, no bias.

    ``input_mode="atom"`` (MDDQ scheme): codes on a per-atom grid ``max_f |v[n,:,f]| / 127``,
    invariant under rotations; ``mddq`` (optional) is a float MDDQ quantizer applied first
    (when the QAT layer quantized its own input; when an observer upstream did, it is None).
    ``input_mode="static"`` (naive scheme): every component on one per-tensor grid.
    """

    def __init__(self, in_features: int, out_features: int, input_mode: str = "atom",
                 mddq: MDDQQuantizer | None = None, **kwargs):
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, not {input_mode!r}")
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self.input_mode = input_mode
        self.mddq = mddq
        self.irreps_in = o3.Irreps(f"{in_features}x1o")
        self.irreps_out = o3.Irreps(f"{out_features}x1o")
        self.refresh()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 3 or v.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects vectors [N, 3, F], got {tuple(v.shape)}")
        if self.mddq is not None and self.activation_limbs == 1:  # two limbs: the fine grid replaces MDDQ
            v = self.mddq(v)
        y = self._apply_int8(v.reshape(-1, self.in_features))
        return y.view(v.shape[0], 3, self.out_features)

    def reference_forward(self, v: torch.Tensor) -> torch.Tensor:
        """The dequantized float layer (any dtype, autograd): for tests only."""
        if self.mddq is not None and self.activation_limbs == 1:
            v = self.mddq(v)
        if self.input_mode == "atom" and self.activation_limbs == 1:
            vq = fake_quantize_per_atom(v, bits=int(math.log2(self.input_qmax + 1)) + 1)  # qmax = 2^(b-1) - 1
        elif self.input_mode == "atom":
            scale = per_atom_scale(v, self.input_qmax)
            vq = fake_quantize_limbs(v, scale, self.input_qmax, 2)
        else:
            vq = fake_quantize_limbs(v, self.input_step.to(v.dtype), self.input_qmax, self.activation_limbs)
        w = self.weight_int8.to(v.dtype) * self.weight_scale.to(v.dtype)[:, None]
        return nn.functional.linear(vq, w)

    @classmethod
    def from_qat(cls, layer: nn.Module, input_quantizer: nn.Module | None = None, **kwargs) -> "Int8VectorLinear":
        """Convert a trained :class:`qeq_ase.quant.qat.QATVectorLinear`.

        * MDDQ scheme (``layer.requantize_per_atom``): per-atom int8 inputs. If the layer
          holds its own MDDQ quantizer, a copy runs (in float) before the GEMM; if an observer
          upstream quantized its input, nothing is needed here.
        * Naive scheme: the static per-tensor step of the layer's LSQ input quantizer, or of
          ``input_quantizer`` (the linked observer).
        """
        import copy

        quantizer = layer.input_quantizer if layer.input_quantizer is not None else input_quantizer
        codes, scale = quantize_weight(layer.weight, layer.weight_bits, layer.per_channel)
        if layer.requantize_per_atom:
            mddq = None
            if layer.input_quantizer is not None:
                if not isinstance(layer.input_quantizer, MDDQQuantizer):
                    raise ValueError("per-atom requantization expects an MDDQ input quantizer (or none)")
                mddq = copy.deepcopy(layer.input_quantizer).eval().requires_grad_(False)
                mddq.enabled, mddq.calibrating = True, False  # always on at inference
                mddq.effective_step()                         # raises if never initialised
            new = cls(layer.in_features, layer.out_features, "atom", mddq,
                      input_qmax=2 ** (layer.activation_bits - 1) - 1, **kwargs)
        else:
            if not isinstance(quantizer, LSQQuantizer) or not quantizer.signed:
                raise ValueError(f"{type(layer).__name__} has no signed LSQ input quantizer; pass the observer "
                                 f"{getattr(layer, 'input_observer', None)!r} as input_quantizer")
            new = cls(layer.in_features, layer.out_features, "static", None, input_qmax=quantizer.qp, **kwargs)
            new.input_step.fill_(quantizer.effective_step())
        new._set_weight(codes, scale.float() / math.sqrt(layer.in_features), None)
        return new.to(layer.weight.device)
