"""Fake quantizers for quantization-aware training (QAT) and the integer codes they stand for.

Everything here runs in float: a fake quantizer returns ``code * step`` with the same value
that the INT8 inference layers (:mod:`qeq_ase.quant.int8_linear`) compute from real ``int8``
codes, and lets gradients through with a straight-through estimator (STE). All of it is
written with differentiable torch operations (``x + (round(x) - x).detach()``), so the
force loss, which differentiates ``-dE/dx`` again (``create_graph=True``), works.

Three quantizers, one per kind of feature (arXiv:2601.02213):

* :class:`LSQQuantizer` -- invariant (``l=0``) features ``[..., F]``: symmetric signed
  ``b``-bit codes with one learned step per tensor (LSQ, Esser et al., ICLR 2020).
* :class:`MDDQQuantizer` -- equivariant (``l=1``) features ``[N, 3, F]``: magnitude and
  direction quantized separately, so the magnitude is exactly rotation invariant and the
  direction is kept to 8-bit accuracy.
* :class:`NaiveQuantizer` -- the baseline: one per-tensor LSQ step for every tensor,
  vector components included, as if they were scalars.

Weights use :func:`fake_quantize_weight` (symmetric, per output channel or per tensor).
Vectors entering an int8 GEMM are re-quantized with :func:`fake_quantize_per_atom`, one
rotation-invariant scale per atom (see ``docs/quantization.md`` for why).

Why a per-tensor grid breaks equivariance, and MDDQ does not (doctest)::

    >>> import torch
    >>> step = 0.1
    >>> h = torch.tensor([0.26, 0.0, 0.0])            # length 0.26, along x
    >>> c, s = 2 ** -0.5, 2 ** -0.5                     # rotate by 45 degrees about z
    >>> R = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    >>> grid = lambda v: torch.round(v / step) * step  # naive: every component on the grid
    >>> round(grid(h).norm().item(), 4), round(grid(R @ h).norm().item(), 4)
    (0.3, 0.2828)

The naive quantizer gives the same vector two different lengths depending on how the
molecule is oriented. MDDQ quantizes the length ``|h|`` itself (invariant) and only the
unit direction per component, with a step of ``1/127`` on ``[-1, 1]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Smallest step, scale or norm any quantizer divides by. A zero row (an atom without
# vector features, a weight row of zeros) gets this scale and all-zero codes.
TINY = 1e-30

BRANCHES = ("scalar", "vector")
INIT_METHODS = ("max", "percentile", "lsq")


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """``(Qn, Qp)``: codes lie in ``[-Qn, Qp]``. Signed codes are symmetric (``-127..127``
    for 8 bits, never ``-128``), so that ``-x`` has the code ``-q``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 (int8 storage), got {bits}")
    if signed:
        return 2 ** (bits - 1) - 1, 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even) in the forward pass, identity gradient (straight through).

    ``x + (round(x) - x)`` is exactly ``round(x)`` in floating point (the difference of two
    close floats is exact), so fake-quantized values equal ``code * step`` bit for bit.
    """
    return x + (torch.round(x) - x).detach()


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``scale`` (differentiable backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """LSQ's gradient scaling: ``x`` unchanged, its gradient times ``scale``."""
    return _GradScale.apply(x, scale)


def lsq_fake_quantize(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """``clamp(round(x / step), -qn, qp) * step`` with LSQ gradients.

    d/dx: 1 inside ``[-qn, qp] * step``, 0 outside (clipped). d/dstep: ``round(x/s) - x/s``
    inside, ``-qn`` or ``qp`` outside (Esser et al., eq. 3). ``step`` must be positive.
    """
    return round_ste(torch.clamp(x / step, -qn, qp)) * step


def fake_quantize_limbs(x: torch.Tensor, step: torch.Tensor, qmax: int, limbs: int) -> torch.Tensor:
    """Float value of the int8 input codes: ``step * round(y)`` (1 limb) or ``step * (hi + lo / (2 qmax))``
    (2 limbs), ``y = clamp(x / step, -qmax, qmax)``; with LSQ's straight-through gradient."""
    if limbs == 1:
        return lsq_fake_quantize(x, step, qmax, qmax)
    y = torch.clamp(x / step, -qmax, qmax)
    hi = torch.round(y)
    value = (hi + torch.round((y - hi) * (2.0 * qmax)) / (2.0 * qmax)) * step
    return y * step + (value - y * step).detach()


def lsq_codes(x: torch.Tensor, step: float, qn: int, qp: int) -> torch.Tensor:
    """The integer codes behind :func:`lsq_fake_quantize` (float tensor of integers)."""
    return torch.clamp(torch.round(x / step), -qn, qp)


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------

def weight_scale(weight: torch.Tensor, bits: int = 8, per_channel: bool = True) -> torch.Tensor:
    """Symmetric max-abs scale of ``weight [out, in]``: ``[out, 1]`` per channel, else ``[1, 1]``."""
    _, qp = qrange(bits, signed=True)
    w = weight.detach().abs()
    amax = w.amax(dim=1, keepdim=True) if per_channel else w.amax().reshape(1, 1)
    return amax.clamp_min(TINY) / qp


def fake_quantize_weight(weight: torch.Tensor, bits: int = 8, per_channel: bool = True) -> torch.Tensor:
    """``round(W / s) * s`` with ``s = max|W_row| / 127`` (detached); STE gradient (identity)."""
    _, qp = qrange(bits, signed=True)
    scale = weight_scale(weight, bits, per_channel)
    y = weight / scale
    return (y + (torch.round(y).clamp(-qp, qp) - y).detach()) * scale


def quantize_weight(weight: torch.Tensor, bits: int = 8, per_channel: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Real codes of :func:`fake_quantize_weight`: ``(int8 [out, in], float scale [out])``."""
    _, qp = qrange(bits, signed=True)
    scale = weight_scale(weight, bits, per_channel)
    codes = torch.round(weight.detach() / scale).clamp(-qp, qp).to(torch.int8)
    return codes, scale.reshape(-1).expand(weight.shape[0]).contiguous()


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------

class LSQQuantizer(nn.Module):
    """Per-tensor ``b``-bit fake quantizer with a learned step (LSQ).

    Forward: ``clamp(round(x / s), -Qn, Qp) * s``. The step ``s`` is a parameter; its
    gradient is scaled by ``1 / sqrt(x.numel() * Qp)`` (LSQ's ``g``). ``step == 0`` means
    "not initialised": the first batch seen while enabled (or while ``calibrating``, where
    :meth:`observe` widens a max-initialised step over every batch) sets it, from ``x``
    itself so that no hand-chosen range is needed:

    * ``init="max"`` (default): ``s = max|x| / Qp``, nothing clipped. Clipping matters more
      for a potential than for a classifier: the STE gradient of a clipped input is zero,
      so every clipped activation drops out of the forces. LSQ then learns the step.
    * ``init="percentile"``: ``s = quantile(|x|, percentile) / Qp`` (robust to outliers).
    * ``init="lsq"``: ``s = 2 mean|x| / sqrt(Qp)`` (Esser et al.; tuned for 2-4 bits).

    A batch that is all zeros (the vector features before the first layer) leaves the
    step uninitialised; the output is then ``x`` (zeros quantize to zeros with any step).

    Attributes:
        enabled: quantize (True) or pass ``x`` through unchanged (False).
        calibrating: initialise the step if needed and return ``x`` unchanged.
        branch: ``"scalar"`` or ``"vector"``, for :func:`qeq_ase.quant.qat.set_quantization`.
        limbs: 1, or 2 for the two-limb grid of the int8 layers (signed quantizers only;
            :func:`fake_quantize_limbs`, :func:`qeq_ase.quant.qat.set_activation_limbs`).
    """

    def __init__(self, bits: int = 8, signed: bool = True, branch: str = "scalar",
                 init: str = "max", percentile: float = 0.9999):
        super().__init__()
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, not {branch!r}")
        if init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS}, not {init!r}")
        self.bits, self.signed, self.branch = bits, signed, branch
        self.qn, self.qp = qrange(bits, signed)
        self.init, self.percentile = init, percentile
        self.step = nn.Parameter(torch.zeros(()))  # units of x; 0 = not initialised
        self.enabled = True
        self.calibrating = False
        self.limbs = 1

    @property
    def initialized(self) -> bool:
        return bool(self.step.detach() != 0)

    def effective_step(self) -> float:
        """The step the forward pass uses, as a Python float (what INT8 export stores)."""
        if not self.initialized:
            raise RuntimeError(f"{type(self).__name__} step is not initialised: run a calibration batch first")
        return float(self.step.detach().abs())

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the step from a batch (see the class docstring); no-op for an all-zero batch."""
        a = x.detach().abs().flatten().float()
        if a.numel() == 0 or not bool(a.max() > 0):
            return
        if self.init == "lsq":
            step = 2.0 * a.mean() / math.sqrt(self.qp)
        elif self.init == "max":
            step = a.max() / self.qp
        else:
            if a.numel() > 2 ** 20:  # torch.quantile takes at most 2^24 elements; subsample
                a = a[:: a.numel() // 2 ** 20 + 1]
            step = torch.quantile(a, self.percentile) / self.qp
            if not bool(step > 0):  # >99.99% zeros: fall back to the largest value
                step = a.max() / self.qp
        self.step.copy_(step)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Calibration: the first batch initialises the step; with ``init="max"`` later
        batches widen it to the largest ``|x|`` of all of them (nothing they hold is clipped)."""
        if not self.initialized:
            self.initialize(x)
        elif self.init == "max" and x.numel():
            self.step.copy_(torch.maximum(self.step.abs(), x.detach().abs().max().float() / self.qp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.enabled or self.calibrating):
            return x
        if self.calibrating:
            self.observe(x)
            return x
        if not self.initialized:
            self.initialize(x)
            if not self.initialized:
                return x
        g = 1.0 / math.sqrt(max(x.numel(), 1) * self.qp)
        step = grad_scale(self.step, g).abs()
        if self.limbs == 2:
            return fake_quantize_limbs(x, step.to(x.dtype), self.qp, 2)
        return lsq_fake_quantize(x, step.to(x.dtype), self.qn, self.qp)

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"{self.bits}-bit {kind}, branch={self.branch}, enabled={self.enabled}"


class NaiveQuantizer(LSQQuantizer):
    """The naive baseline: one signed per-tensor LSQ step for any tensor.

    Applied to vectors ``[N, 3, F]`` it puts every Cartesian component on the same grid,
    which makes the quantized length depend on the orientation (module doctest).
    """

    def __init__(self, bits: int = 8, branch: str = "scalar", **kwargs):
        super().__init__(bits, signed=True, branch=branch, **kwargs)


def _magnitude_switch(name: str) -> property:
    """A boolean attribute that reads and writes ``self.magnitude.<name>``."""
    return property(lambda self: getattr(self.magnitude, name),
                    lambda self, value: setattr(self.magnitude, name, bool(value)))


class MDDQQuantizer(nn.Module):
    """Magnitude-direction decoupled quantization of vector features ``h [N, 3, F]``.

    Per atom ``n`` and channel ``f`` (arXiv:2601.02213, Sec. "MDDQ")::

        r = sqrt(|h|^2 + eps^2)                         magnitude, invariant
        u = h / r                                       direction, |u| <= 1
        r~ = clamp(round(r / s_r), 0, 2^b - 1) * s_r    unsigned LSQ, learned step s_r
        c = round(127 u)                                direction codes in [-127, 127]^3
        u~ = c / |c|                                    back to unit length (0 if c = 0)
        h~ = r~ u~

    * Magnitude: ``r`` depends only on ``|h|``, so ``r~`` is unchanged by any rotation.
    * Direction: each component of ``u`` moves by at most ``1/254``, so the angle between
      ``u`` and ``u~`` is at most ``asin(sqrt(3)/254) = 6.8e-3`` rad (0.39 degrees);
      re-normalising does not change the angle.
    * ``h -> 0``: ``eps`` keeps ``r > 0`` (no 0/0), ``r~`` rounds to 0 and the output and
      all gradients are finite; ``|c|`` is taken through a masked ``sqrt`` so that a zero
      direction code has neither a NaN value nor a NaN gradient.

    Gradients are straight-through: in ``u`` (the rounding of ``c``), and LSQ in ``r``.
    ``eps`` is in the units of ``h``; it only matters for ``|h| < ~10 eps``. With
    ``limbs = 2`` the quantizer still calibrates its step but passes ``h`` through, as the
    two-limb int8 layers do (their per-atom input grid replaces MDDQ).
    """

    def __init__(self, bits: int = 8, eps: float = 1e-6, branch: str = "vector",
                 init: str = "max", percentile: float = 0.9999):
        super().__init__()
        self.bits, self.eps, self.branch = bits, eps, branch
        self.direction_levels = 2 ** (bits - 1) - 1  # 127: direction step 1/127 on [-1, 1]
        self.magnitude = LSQQuantizer(bits, signed=False, branch=branch, init=init, percentile=percentile)
        self.limbs = 1

    # enabled / calibrating are those of the magnitude quantizer: one switch per module
    enabled = _magnitude_switch("enabled")
    calibrating = _magnitude_switch("calibrating")

    @property
    def initialized(self) -> bool:
        return self.magnitude.initialized

    def effective_step(self) -> float:
        return self.magnitude.effective_step()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3 or h.shape[1] != 3:
            raise ValueError(f"MDDQQuantizer expects vectors [N, 3, F], got {tuple(h.shape)}")
        if not (self.enabled or self.calibrating):
            return h
        if self.calibrating or not self.initialized:  # from |h| itself, not from the eps-floored r
            self.magnitude.observe(torch.sqrt((h.detach() ** 2).sum(dim=1)))
            if not self.initialized:
                return h
        if self.calibrating or self.limbs == 2:
            return h
        r = torch.sqrt((h * h).sum(dim=1, keepdim=True) + self.eps ** 2)  # [N, 1, F]
        r_q = self.magnitude(r)
        codes = round_ste(h / r * self.direction_levels)                  # [N, 3, F]
        n2 = (codes * codes).sum(dim=1, keepdim=True)
        norm = torch.sqrt(torch.where(n2 > 0, n2, torch.ones_like(n2)))   # |c|, 1 where c = 0
        return r_q * (codes / norm)

    def extra_repr(self) -> str:
        return f"{self.bits}-bit magnitude (unsigned, learned step), direction step 1/{self.direction_levels}"


def fake_quantize_per_atom(v: torch.Tensor, bits: int = 8, limbs: int = 1) -> torch.Tensor:
    """Re-quantize vectors ``[N, 3, F]`` with one rotation-invariant scale per atom.

    ``scale[n] = max_f |v[n, :, f]| / 127``: the largest vector length of the atom, which a
    rotation does not change (a max over x/y/z components would). This is the int8 input
    of the vector GEMM (:class:`qeq_ase.quant.int8_linear.Int8VectorLinear`); the gradient is the
    identity (the scale is detached and nothing is clipped). ``limbs=2``: the two-limb grid.
    """
    _, qp = qrange(bits, signed=True)
    scale = per_atom_scale(v, qp)
    if limbs == 2:
        return fake_quantize_limbs(v, scale, qp, 2)
    y = v / scale
    return (y + (torch.round(y).clamp(-qp, qp) - y).detach()) * scale


def per_atom_scale(v: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """``[N, 1, 1]`` scale of :func:`fake_quantize_per_atom`: ``max(max_f |v[n,:,f]|, TINY) / qmax``."""
    v = v.detach()
    max_r2 = (v * v).sum(dim=1).amax(dim=-1)                               # [N] largest |v|^2
    # sqrt in float64, then rounded: the correctly rounded float32 sqrt of the C++ kernel.
    # (torch's vectorised float32 sqrt is off by one ulp for some inputs.)
    max_r = torch.sqrt(max_r2.double()).to(v.dtype)
    return (max_r.clamp_min(TINY) / qmax).reshape(-1, 1, 1)
