"""Quantization-aware training: fake-quantized twins of the model's layers, and a schedule.

The model is built from a :class:`qeq_ase.model.layers.LayerFactory`; the factories here build
twins with the same ``irreps_in``/``irreps_out`` and the same parameter names (``weight``,
``bias``), so a float32 state dict loads into the QAT model (only the new quantizer steps
are missing). Two schemes (arXiv:2601.02213):

=========  =======================================  ======================================
scheme     scalars ``[.., F]``                       vectors ``[N, 3, F]``
=========  =======================================  ======================================
``full``   int8 per-channel weights, LSQ inputs      int8 per-channel weights, MDDQ inputs,
                                                     then per-atom int8 grid for the GEMM
``naive``  int8 per-tensor weights, LSQ inputs       int8 per-tensor weights, per-tensor LSQ
                                                     on every Cartesian component
=========  =======================================  ======================================

Observers (:class:`qeq_ase.model.layers.FeatureObserver`) become the scalar/vector quantizers of
the scheme. An observer that feeds a linear layer (``scalar_in -> qkv``, ...) already
quantizes that layer's input; :func:`link_observers` removes the layer's own input
quantizer so the input is not quantized twice (``convert_to_qat`` does this).

Branch-separated schedule: every quantizer and QAT layer belongs to the ``"scalar"`` or
the ``"vector"`` branch, and :func:`set_quantization` switches them independently, e.g.
scalars from the start and vectors after a warm-up::

    model = convert_to_qat(float_model, "full", scalar=True, vector=False)
    with calibration(model):                  # set every step from float statistics,
        model(positions, species, edges)      # before copying the model for an EMA
    ...
    set_quantization(model, vector=True)      # later in training
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..model.layers import LayerFactory, ScalarLinear, VectorLinear
from ..model.potential import build_potential
from .quantizers import (BRANCHES, LSQQuantizer, MDDQQuantizer, NaiveQuantizer, fake_quantize_per_atom,
                         fake_quantize_weight)

# (observer, linear) pairs of attribute names: the observer's output is the linear's input.
# EquivariantAttention: scalar_in -> qkv, vector_in -> vector_mix, scalar_out -> out,
# ffn_in -> ffn_hidden; QEqModel: readout_in -> readout_hidden. Update it when the model's
# wiring changes (tests/test_quantizers.py checks that every pair is found).
OBSERVER_FEEDS = (("scalar_in", "qkv"), ("vector_in", "vector_mix"), ("scalar_out", "out"),
                  ("ffn_in", "ffn_hidden"), ("readout_in", "readout_hidden"), ("combine_in", "combine"))


class _FakeQuantizedWeight:
    """The weight of a QAT linear layer: ``q_W(W) / sqrt(in)`` while ``enabled``, else the float one."""

    weight: torch.Tensor
    weight_bits: int
    per_channel: bool
    enabled: bool
    in_features: int

    def effective_weight(self) -> torch.Tensor:
        w = fake_quantize_weight(self.weight, self.weight_bits, self.per_channel) if self.enabled else self.weight
        return w / math.sqrt(self.in_features)


class QATScalarLinear(_FakeQuantizedWeight, ScalarLinear):
    """:class:`~qeq_ase.model.layers.ScalarLinear` with fake-quantized weights and input.

    ``y = q_x(x) @ (q_W(W) / sqrt(in)).T + b``; with ``enabled=False`` (and the input
    quantizer disabled) it computes exactly what the float layer computes.
    """

    branch = "scalar"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8,
                 activation_bits: int = 8, per_channel: bool = True, input_quantizer: nn.Module | None = None):
        super().__init__(in_features, out_features, bias)
        self.weight_bits, self.activation_bits, self.per_channel = weight_bits, activation_bits, per_channel
        self.enabled = True
        # None: a default signed LSQ quantizer (link_observers may remove it later)
        self.input_quantizer = input_quantizer or LSQQuantizer(activation_bits, signed=True, branch="scalar")
        self.input_observer: str | None = None  # set by link_observers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return nn.functional.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        granularity = "per-channel" if self.per_channel else "per-tensor"
        source = f", input from {self.input_observer}" if self.input_observer else ""
        return f"{super().extra_repr()}, W{self.weight_bits} {granularity}, enabled={self.enabled}{source}"


class QATVectorLinear(_FakeQuantizedWeight, VectorLinear):
    """:class:`~qeq_ase.model.layers.VectorLinear` with fake-quantized weights and input.

    ``requantize_per_atom`` (MDDQ scheme) puts the (MDDQ-quantized) input on the per-atom
    int8 grid the real GEMM uses (:func:`qeq_ase.quant.quantizers.fake_quantize_per_atom`), so
    that QAT sees what :class:`qeq_ase.quant.int8_linear.Int8VectorLinear` computes.
    """

    branch = "vector"

    def __init__(self, in_features: int, out_features: int, weight_bits: int = 8, activation_bits: int = 8,
                 per_channel: bool = True, input_quantizer: nn.Module | None = None,
                 requantize_per_atom: bool = True):
        super().__init__(in_features, out_features)
        self.weight_bits, self.activation_bits, self.per_channel = weight_bits, activation_bits, per_channel
        self.requantize_per_atom = requantize_per_atom
        self.enabled = True
        self.limbs = 1  # 2: the two-limb per-atom grid (set_activation_limbs)
        # None: MDDQ (per-atom scheme) or the naive per-tensor quantizer
        default = MDDQQuantizer if requantize_per_atom else NaiveQuantizer
        self.input_quantizer = input_quantizer or default(activation_bits, branch="vector")
        self.input_observer: str | None = None

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            v = self.input_quantizer(v)
        if self.enabled and self.requantize_per_atom:
            v = fake_quantize_per_atom(v, self.activation_bits, self.limbs)
        return nn.functional.linear(v, self.effective_weight())

    def extra_repr(self) -> str:
        granularity = "per-channel" if self.per_channel else "per-tensor"
        grid = ", per-atom int8 input grid" if self.requantize_per_atom else ""
        source = f", input from {self.input_observer}" if self.input_observer else ""
        return f"{super().extra_repr()}, W{self.weight_bits} {granularity}{grid}, enabled={self.enabled}{source}"


class QATLayerFactory(LayerFactory):
    """Full scheme: per-channel int8 weights, LSQ scalars, MDDQ vectors (arXiv:2601.02213)."""

    scheme = "full"
    per_channel = True
    requantize_per_atom = True

    def __init__(self, weight_bits: int = 8, activation_bits: int = 8):
        self.weight_bits, self.activation_bits = weight_bits, activation_bits

    def scalar_quantizer(self) -> nn.Module:
        return LSQQuantizer(self.activation_bits, signed=True, branch="scalar")

    def vector_quantizer(self) -> nn.Module:
        return MDDQQuantizer(self.activation_bits, branch="vector")

    def scalar_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return QATScalarLinear(in_features, out_features, bias, self.weight_bits, self.activation_bits,
                               self.per_channel, self.scalar_quantizer())

    def vector_linear(self, in_features: int, out_features: int) -> nn.Module:
        return QATVectorLinear(in_features, out_features, self.weight_bits, self.activation_bits,
                               self.per_channel, self.vector_quantizer(), self.requantize_per_atom)

    def observer(self, kind: str, num_features: int) -> nn.Module:
        builders = {"scalar": self.scalar_quantizer, "vector": self.vector_quantizer}
        if kind not in builders:
            raise ValueError(f"observer kind must be one of {sorted(builders)}, not {kind!r}")
        return builders[kind]()


class NaiveQATLayerFactory(QATLayerFactory):
    """Naive baseline: per-tensor weights, per-tensor LSQ on every tensor, vector components included."""

    scheme = "naive"
    per_channel = False
    requantize_per_atom = False

    def vector_quantizer(self) -> nn.Module:
        return NaiveQuantizer(self.activation_bits, branch="vector")



def link_observers(model: nn.Module) -> list[tuple[str, str]]:
    """Let observers quantize the inputs of the linears they feed (:data:`OBSERVER_FEEDS`).

    The linear's own input quantizer is removed (``input_quantizer = None``) and
    ``input_observer`` records the observer's name. Returns the linked
    ``(observer path, linear path)`` pairs.
    """
    linked = []
    for prefix, module in model.named_modules():
        for observer_name, linear_name in OBSERVER_FEEDS:
            observer, linear = getattr(module, observer_name, None), getattr(module, linear_name, None)
            if isinstance(linear, (QATScalarLinear, QATVectorLinear)) and isinstance(
                    observer, (LSQQuantizer, MDDQQuantizer)):
                linear.input_quantizer = None
                linear.input_observer = observer_name
                path = f"{prefix}." if prefix else ""
                linked.append((path + observer_name, path + linear_name))
    return linked


def _switchable(model: nn.Module):
    for module in model.modules():
        if isinstance(module, (LSQQuantizer, MDDQQuantizer, QATScalarLinear, QATVectorLinear)):
            yield module


def set_quantization(model: nn.Module, scalar: bool | None = None, vector: bool | None = None) -> dict:
    """Switch fake quantization of the scalar and vector branches on/off (None: leave as is).

    Covers weights, input quantizers and observers of each branch. Returns
    :func:`quantization_state`.
    """
    wanted = {"scalar": scalar, "vector": vector}
    for module in _switchable(model):
        if wanted[module.branch] is not None:
            module.enabled = bool(wanted[module.branch])
    return quantization_state(model)


def set_activation_limbs(model: nn.Module, limbs: int) -> nn.Module:
    """Fake-quantize activations as the int8 layers with ``limbs`` input codes do; returns ``model``.

    ``1``: the paper's W8A8 grids (LSQ scalars, MDDQ vectors, per-atom vector GEMM input).
    ``2``: what an int8 file exported with ``--activation-limbs 2`` computes: the two-limb
    grid (:func:`qeq_ase.quant.quantizers.fake_quantize_limbs`) on every GEMM input and no MDDQ
    rounding, so that quantization-aware training adapts the weights to the arithmetic they
    will run with (see :func:`qeq_ase.quant.int8_model.set_activation_limbs`).
    """
    if limbs not in (1, 2):
        raise ValueError(f"activation limbs must be 1 or 2, not {limbs!r}")
    for module in model.modules():
        if isinstance(module, (LSQQuantizer, MDDQQuantizer, QATVectorLinear)):
            module.limbs = limbs
    return model


def quantization_state(model: nn.Module) -> dict:
    """``{"scalar": True/False/"mixed"/None, "vector": ...}`` (None: branch absent)."""
    states = {branch: set() for branch in BRANCHES}
    for module in _switchable(model):
        states[module.branch].add(bool(module.enabled))
    return {b: (None if not s else s.pop() if len(s) == 1 else "mixed") for b, s in states.items()}


@contextlib.contextmanager
def calibration(model: nn.Module):
    """Inside the block the model computes in float: every activation quantizer sets its
    step from the batches it sees (:meth:`qeq_ase.quant.quantizers.LSQQuantizer.observe`: the
    largest ``|x|`` of all of them for the default max init) and passes its input through,
    whatever its ``enabled`` switch, and weights are not quantized. Run a few float forward passes here before training, and before
    an EMA copy of the model is made (the EMA of ``train.py`` averages parameters only,
    and a step initialised later in the live model would reach the EMA copy slowly).
    """
    quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    layers = [m for m in model.modules() if isinstance(m, (QATScalarLinear, QATVectorLinear))]
    previous = [q.calibrating for q in quantizers], [m.enabled for m in layers]
    for q in quantizers:
        q.calibrating = True
    for m in layers:  # float weights too: the pass is exactly the float model
        m.enabled = False
    try:
        yield model
    finally:
        for q, flag in zip(quantizers, previous[0]):
            q.calibrating = flag
        for m, flag in zip(layers, previous[1]):
            m.enabled = flag


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned steps (for an optimizer parameter group of their own)."""
    return [m.step for m in model.modules() if isinstance(m, LSQQuantizer)]


@torch.no_grad()
def widen_activation_steps(model: nn.Module, margin: float) -> None:
    """Multiply every calibrated activation step by ``margin`` (>= 1).

    Headroom for inputs larger than any of the calibration batches held (test frames,
    MD away from the training data): a clipped input has a zero straight-through
    gradient, so it drops out of the forces. On the two-limb grid a margin of 2 costs one
    of its ~15 bits.
    """
    if margin < 1.0:
        raise ValueError(f"step margin must be >= 1, not {margin!r}")
    for step in quantizer_parameters(model):
        step.mul_(margin)


def _quantizer_keys(model: nn.Module) -> set[str]:
    return {f"{name}.step" if name else "step" for name, m in model.named_modules() if isinstance(m, LSQQuantizer)}


def build_qat_model(config, scheme="full", weight_bits: int = 8, activation_bits: int = 8,
                    architecture: str = "qeq-transformer"):
    """A QAT model of ``architecture`` (:mod:`qeq_ase.model.potential`) for ``config``, observers
    linked; ``scheme`` is a name or a :class:`qeq_ase.quant.schemes.QuantScheme`, recorded in
    ``model.quantization_scheme`` (its name)."""
    from .schemes import get_scheme  # schemes.py holds this module's factories

    scheme = get_scheme(scheme)
    model = build_potential(architecture, config, scheme.layer_factory(weight_bits, activation_bits))
    model.quantization_scheme = scheme.name
    link_observers(model)
    return model


def qat_scheme(model: nn.Module) -> tuple[str, int, int]:
    """``(scheme, activation_bits, weight_bits)`` of a QAT model: the scheme it was built with,
    checked against its layers; ValueError if it has none, or layers that do not fit it."""
    from .schemes import get_scheme

    layers = [m for m in model.modules() if isinstance(m, (QATScalarLinear, QATVectorLinear))]
    name = getattr(model, "quantization_scheme", None)
    if not layers or name is None:
        raise ValueError("not a QAT model: build it with qat.convert_to_qat or qat.build_qat_model")
    factory = get_scheme(name).qat_factory
    bits = {(m.activation_bits, m.weight_bits) for m in layers}
    fits = all(m.per_channel == factory.per_channel for m in layers) and all(
        m.requantize_per_atom == factory.requantize_per_atom for m in layers if isinstance(m, QATVectorLinear))
    if len(bits) != 1 or not fits:
        raise ValueError(f"the QAT layers do not all follow the {name!r} scheme it was built with (bits "
                         f"{sorted(bits)}, per-channel weights, per-atom vector grid)")
    (activation_bits, weight_bits), = bits
    return name, activation_bits, weight_bits


def convert_to_qat(float_model: nn.Module, scheme: str = "full", scalar: bool = True, vector: bool = True,
                   weight_bits: int = 8, activation_bits: int = 8):
    """The QAT twin of a float model (:class:`~qeq_ase.model.potential.Potential`): same
    architecture and config, its weights loaded.

    Quantizer steps start uninitialised (see :func:`calibration`). The result is on the
    float model's device and dtype and in its train/eval mode.
    """
    config = type(float_model.config).from_dict(float_model.config.to_dict())
    model = build_qat_model(config, scheme, weight_bits, activation_bits, float_model.architecture)
    reference = next(float_model.parameters())
    model.to(device=reference.device, dtype=reference.dtype)
    missing, unexpected = model.load_state_dict(float_model.state_dict(), strict=False)
    not_quantizer = sorted(set(missing) - _quantizer_keys(model))
    if unexpected or not_quantizer:
        raise RuntimeError(f"float weights do not fit the QAT model: missing {not_quantizer}, "
                           f"unexpected {sorted(unexpected)}")
    set_quantization(model, scalar=scalar, vector=vector)
    return model.train(float_model.training)
