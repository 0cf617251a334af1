"""The INT8 inference model: export a QAT model to real int8 layers, save it, rebuild it.

:func:`convert_to_int8` turns a trained QAT model (:mod:`qeq_ase.quant.qat`) into a model of
the same architecture (:mod:`qeq_ase.model.potential`; :class:`~qeq_ase.model.network.QEqModel`
for the shipped files) whose linear layers are the real int8 layers of
:mod:`qeq_ase.quant.int8_linear`; :func:`build_int8_model` rebuilds the same model from a config
and an int8 state dict, without the QAT model. The model code is not changed: the modules of a
float model built from the config are swapped in place. The quantization scheme
(:mod:`qeq_ase.quant.schemes`) is the one the QAT model was built with, and the file records its name.

What becomes what (``F`` channels, per interaction layer unless said):

=================================  ==========================================================
QAT module                         INT8 model
=================================  ==========================================================
``QATScalarLinear`` (``qkv``,      :class:`~qeq_ase.quant.int8_linear.Int8ScalarLinear`: int8 codes,
``out``, ``edge_filter``, FFN,     per-output-channel float32 scales, static input step
readout)                           (the linear's own LSQ step, or that of its linked observer)
``QATVectorLinear``                :class:`~qeq_ase.quant.int8_linear.Int8VectorLinear`: per-atom
(``vector_mix``)                   int8 input grid (``full``) or the static step (``naive``)
linked scalar observers            identity (:class:`~qeq_ase.model.layers.FeatureObserver`): the
(``scalar_in``, ``scalar_out``,    int8 layer quantizes its own input with the same step, so
``ffn_in``, ``readout_in``)        the codes are those of QAT
``vector_in`` (MDDQ / naive)       kept as a float fake quantizer: the vector messages use its
                                   output too (:data:`FLOAT_OBSERVERS`)
an observer that never saw a       identity: its input has always been zero (layer 0's
nonzero input (``step == 0``)      ``vector_in``: ``v`` starts at 0), and zero has code 0
embedding, ``radial_embedding``    float32 (``radial_embedding`` has ``K = num_radial``: an
(``nn.Linear``), LayerNorms,       int8 GEMM that narrow is slower than float, see
temperatures, energy scale         ``shared/notes/int8-on-cpu.md``); reference energies float64
=================================  ==========================================================

The state dict (:func:`int8_state_dict`) holds, per int8 layer, ``weight_int8`` (torch.int8
``[out, in]``), ``weight_scale`` (float32 ``[out]``, ``1/sqrt(in)`` folded in), ``bias`` and
``input_step`` (float32), plus the float parts above and the steps of the kept float
quantizers. It holds no float copy of a quantized weight: for the 128-channel, 4-layer
default model it is 0.265x the bytes of the float32 state dict (:func:`state_dict_nbytes`).

The model computes in float32 only (the int8 layers take float32 inputs).

>>> from qeq_ase.model.network import ModelConfig
>>> config = ModelConfig(species=[1, 6, 8], num_features=16, num_layers=1, num_heads=2, num_radial=8)
>>> model = build_int8_model(config, int8_model_skeleton(config).state_dict())
>>> report = int8_kernel_report(model, build_kernels=False)
>>> report["int8_gemm_layers"], report["float_gemm_layers"]
(8, 1)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..model.layers import FeatureObserver, ScalarLinear, VectorLinear
from ..model.network import ModelConfig, QEqModel
from ..model.potential import Potential, build_potential
from .int8_linear import ACTIVATION_LIMBS, BACKWARD_KERNELS, Int8ScalarLinear, Int8VectorLinear, _Int8LinearBase
from .qat import QATScalarLinear, QATVectorLinear, qat_scheme, quantization_state
from .quantizers import LSQQuantizer, MDDQQuantizer, qrange
from .schemes import QuantScheme, get_scheme

#: Observers whose output is also used by float operations, not only by the linear they
#: feed: the int8 model keeps them as float fake quantizers. ``vector_in``: the vector
#: messages ``v_j * g`` use the quantized ``v`` (``attention.py``). Every other linked
#: observer feeds exactly one linear (``qat.OBSERVER_FEEDS``) and becomes an identity.
FLOAT_OBSERVERS = ("vector_in",)

ACTIVATION_ENCODINGS = {
    1: "one int8 code per GEMM input (W8A8)",
    2: "two int8 codes per GEMM input, hi on the learned grid and lo on a 254x finer one "
       "(one _int_mm on twice the rows; energy smooth in the positions)",
}


def quantization_metadata(scheme: str | QuantScheme, activation_bits: int = 8, weight_bits: int = 8) -> dict:
    """The ``quantization`` entry of an int8 potential file's metadata (one-limb inputs)."""
    return {**get_scheme(scheme).metadata(activation_bits, weight_bits),
            "activation_limbs": 1, "activation_encoding": ACTIVATION_ENCODINGS[1]}


def _int8_model_modules(model: nn.Module, setting: str):
    """``model.modules()``; ValueError unless ``model`` is an int8 model (``setting`` names what was set)."""
    if not is_int8_model(model):
        raise ValueError(f"{setting} can only be set on an int8 model")
    return model.modules()


def set_activation_limbs(model: nn.Module, limbs: int) -> nn.Module:
    """Choose how every int8 layer of ``model`` encodes its inputs; returns ``model``.

    ``1``: one int8 code per input on the learned grid (W8A8, the paper's setting). The
    energy is then a step function of the positions: each input crossing a rounding
    boundary moves it (tens of meV over 0.04 Å for aspirin), while the forces are the
    straight-through gradient, not the gradient of that energy: NVE totals jump from step to
    step and BFGS does not converge (``docs/quantization.md``, "Smoothness").
    ``2``: two int8 limbs per input (the grid ``2 qmax`` = 254 times finer, ~15 bits), the
    same int8 weights and one int8 GEMM on twice the rows; the float MDDQ rounding of the
    vector messages is skipped, because it is not needed for the GEMM and is a step function too.
    """
    if limbs not in ACTIVATION_LIMBS:
        raise ValueError(f"activation limbs must be one of {ACTIVATION_LIMBS}, not {limbs!r}")
    for module in _int8_model_modules(model, "activation limbs"):
        if isinstance(module, _Int8LinearBase):
            module.set_activation_limbs(limbs)
        elif isinstance(module, (LSQQuantizer, MDDQQuantizer)):
            module.enabled = limbs == 1  # the frozen float quantizers kept by convert_to_int8
    if isinstance(getattr(model, "quantization", None), dict):
        model.quantization["activation_limbs"] = limbs
        model.quantization["activation_encoding"] = ACTIVATION_ENCODINGS[limbs]
    return model


def set_backward_kernel(model: nn.Module, backward: str) -> nn.Module:
    """Choose the input-gradient GEMM (forces) of every int8 layer of ``model``; returns ``model``.

    ``"float"``: fp32 GEMM with the dequantized weight, exact for the straight-through
    gradient. ``"int8"``: ``g * s_w`` quantized per row in two limbs, then the int8 GEMM with
    the int8 weight: the forces change by less than 1e-4 of their RMS (tested; speed in
    ``docs/speed.md``). ``"auto"`` (default): the int8 GEMM in every layer whose GEMM is
    brgemm or an exact ``torch._int_mm`` (the edge filters' gradient comes as two-limb codes
    from the fused edge kernel), the float GEMM elsewhere.
    """
    if backward not in BACKWARD_KERNELS:
        raise ValueError(f"backward must be one of {BACKWARD_KERNELS}, not {backward!r}")
    for module in _int8_model_modules(model, "the backward kernel"):
        if isinstance(module, _Int8LinearBase):
            module.backward_kernel = backward
    return model


def set_int8_gemm(model: nn.Module, gemm: str) -> nn.Module:
    """Choose the int8 GEMM of every int8 layer of ``model``; returns ``model``.

    ``"brgemm"``: oneDNN's brgemm micro-kernel on tiles of 16-32 rows (AMX-INT8 tiles), the
    rescale fused; ``"onednn"``: oneDNN's int8 linear (``qlinear_pointwise``, AMX-INT8);
    ``"int_mm"``: ``torch._int_mm`` (VNNI); ``"auto"`` (the default of every layer): brgemm
    where the CPU has AMX-INT8, else ``_int_mm``. brgemm and ``_int_mm`` give bit-identical
    results, oneDNN's int8 linear agrees with them to float32 rounding (tested); only the
    speed differs (``docs/speed.md``).
    """
    if not is_int8_model(model):
        raise ValueError("the int8 GEMM applies to int8 models only")
    for module in model.modules():
        if isinstance(module, _Int8LinearBase):
            module.set_gemm(gemm)
    return model


def int8_gemm(model: nn.Module) -> str:
    """The int8 GEMM the int8 layers of ``model`` run (``"int_mm"``, ``"onednn"`` or ``"brgemm"``)."""
    kinds = {m.gemm for m in model.modules() if isinstance(m, _Int8LinearBase)}
    if len(kinds) != 1:
        raise ValueError(f"expected one int8 GEMM in an int8 model, found {sorted(kinds)}")
    return kinds.pop()


def is_int8_model(model: nn.Module) -> bool:
    """Whether ``model`` runs int8 layers (and no float or fake-quantized twin of them)."""
    has_int8 = any(isinstance(m, _Int8LinearBase) for m in model.modules())
    has_float = any(isinstance(m, (ScalarLinear, VectorLinear)) for m in model.modules())
    return has_int8 and not has_float


# ---------------------------------------------------------------------------------------
# QAT -> INT8
# ---------------------------------------------------------------------------------------

def _frozen_copy(quantizer: nn.Module) -> nn.Module:
    """A float fake quantizer for inference: always on, never calibrating, no gradients."""
    quantizer = copy.deepcopy(quantizer).eval().requires_grad_(False)
    quantizer.enabled, quantizer.calibrating = True, False
    return quantizer


def _zero_input_observer(observer: nn.Module) -> LSQQuantizer:
    """A stand-in for an observer that never saw a nonzero input: any step gives code 0 for 0."""
    stand_in = LSQQuantizer(observer.bits, signed=True, branch=observer.branch)
    stand_in.step.data.fill_(1.0)
    return stand_in


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def convert_to_int8(qat_model: Potential, backend: str = "auto", backward: str = "auto") -> Potential:
    """The int8 inference model of a QAT model (which is not modified).

    Args:
        qat_model: built by :func:`qeq_ase.quant.qat.convert_to_qat` or
            :func:`~qeq_ase.quant.qat.build_qat_model`, calibrated (every step set) and with both
            branches on (:func:`~qeq_ase.quant.qat.set_quantization`).
        backend, backward: of the int8 layers (:class:`qeq_ase.quant.int8_linear.Int8ScalarLinear`).

    Returns a float32 CPU model of the QAT model's architecture, in eval mode, whose
    ``quantization`` attribute holds :func:`quantization_metadata`. It computes what the QAT
    model computes, up to float32 rounding of the rescales (which can move a value across
    a rounding boundary of the next quantizer; ``tests/test_int8_model.py`` measures it).
    """
    state = quantization_state(qat_model)
    if state != {"scalar": True, "vector": True}:
        raise ValueError(f"the int8 model quantizes both branches, but the QAT model has {state}: "
                         "switch them on with qat.set_quantization(model, scalar=True, vector=True)")
    scheme, activation_bits, weight_bits = qat_scheme(qat_model)
    model = build_potential(qat_model.architecture, qat_model.config.to_dict())
    missing, _ = model.load_state_dict({k: v.detach().cpu() for k, v in qat_model.state_dict().items()},
                                       strict=False)
    if missing:
        raise ValueError(f"the QAT model does not fit its own config: missing {sorted(missing)}")

    qat_modules = dict(qat_model.named_modules())
    observers = {path: m.kind for path, m in model.named_modules() if isinstance(m, FeatureObserver)}
    for path, kind in observers.items():
        quantizer = qat_modules[path]
        # a vector observer may never see a nonzero input (layer 0: v starts at 0); a scalar one always does
        if kind == "scalar" and isinstance(quantizer, (LSQQuantizer, MDDQQuantizer)) and not quantizer.initialized:
            raise RuntimeError(f"quantizer {path!r} is not initialised: run a calibration pass "
                               "(qat.calibration) before converting")
    linked = {}  # observer path -> linear path
    for path, module in qat_modules.items():
        if isinstance(module, (QATScalarLinear, QATVectorLinear)) and module.input_observer:
            parent, _ = _split(path)
            linked[f"{parent}.{module.input_observer}" if parent else module.input_observer] = path

    for path, module in list(model.named_modules()):
        parent_path, name = _split(path)
        parent = model.get_submodule(parent_path)
        qat = qat_modules[path]
        if isinstance(module, (ScalarLinear, VectorLinear)):
            observer_path = next((o for o, lin in linked.items() if lin == path), None)
            observer = qat_modules[observer_path] if observer_path else None
            if observer is not None and not observer.initialized:
                observer = _zero_input_observer(observer)
            layer_type = Int8VectorLinear if isinstance(module, VectorLinear) else Int8ScalarLinear
            setattr(parent, name, layer_type.from_qat(qat, input_quantizer=observer, backend=backend,
                                                      backward=backward))
        elif isinstance(module, FeatureObserver) and isinstance(qat, (LSQQuantizer, MDDQQuantizer)):
            if not qat.initialized:
                continue  # never saw a nonzero input: stays an identity (see the module docstring)
            if path in linked and name not in FLOAT_OBSERVERS:
                continue  # the int8 layer quantizes its input with this step: identity here
            setattr(parent, name, _frozen_copy(qat))
    model = model.to(device="cpu", dtype=torch.float32).eval()
    model.quantization = quantization_metadata(scheme, activation_bits, weight_bits)
    return model


# ---------------------------------------------------------------------------------------
# state dict <-> model
# ---------------------------------------------------------------------------------------

def int8_model_skeleton(config: ModelConfig, scheme: str | QuantScheme = "full", activation_bits: int = 8,
                        float_observers: tuple[str, ...] = (), backend: str = "auto",
                        backward: str = "auto", architecture: str = QEqModel.architecture) -> Potential:
    """An int8 model of ``architecture`` with zero codes: the module layout :func:`build_int8_model` fills.

    ``float_observers``: paths of the observers kept as float fake quantizers (the scheme's
    observer of that kind: MDDQ or naive for vectors, a signed LSQ quantizer for scalars).
    """
    scheme = get_scheme(scheme)
    observers = scheme.layer_factory(activation_bits=activation_bits)
    _, qmax = qrange(activation_bits, signed=True)
    model = build_potential(architecture, config)
    for path, module in list(model.named_modules()):
        parent_path, name = _split(path)
        parent = model.get_submodule(parent_path)
        if isinstance(module, ScalarLinear):
            new = Int8ScalarLinear(module.in_features, module.out_features, module.bias is not None,
                                   input_qmax=qmax, backend=backend, backward=backward)
        elif isinstance(module, VectorLinear):
            new = Int8VectorLinear(module.in_features, module.out_features, scheme.vector_input_mode,
                                   input_qmax=qmax, backend=backend, backward=backward)
        elif isinstance(module, FeatureObserver) and path in float_observers:
            new = _frozen_copy(observers.observer(module.kind, module.num_features))
        else:
            continue
        setattr(parent, name, new)
    model.quantization = quantization_metadata(scheme, activation_bits)
    return model.eval()


def _observer_paths(config: ModelConfig, state_dict: dict, architecture: str) -> tuple[str, ...]:
    """Observers that the state dict holds a step for (the float quantizers kept)."""
    reference = build_potential(architecture, config)
    return tuple(path for path, m in reference.named_modules() if isinstance(m, FeatureObserver)
                 and (f"{path}.step" in state_dict or f"{path}.magnitude.step" in state_dict))


def _check_int8_tensors(model: QEqModel, state_dict: dict) -> None:
    """Refuse what ``load_state_dict`` would silently cast or accept: float codes, bad scales."""
    for path, m in model.named_modules():
        if isinstance(m, LSQQuantizer):  # a kept float quantizer (or MDDQ's magnitude): a set step
            step = state_dict[f"{path}.step"]
            if not bool(torch.isfinite(step) and step != 0):
                raise ValueError(f"{path}.step must be a finite nonzero step, got {float(step)}")
        if not isinstance(m, _Int8LinearBase):
            continue
        codes, scale = state_dict[f"{path}.weight_int8"], state_dict[f"{path}.weight_scale"]
        step = state_dict[f"{path}.input_step"]
        if codes.dtype != torch.int8:
            raise ValueError(f"{path}.weight_int8 must be torch.int8, got {codes.dtype}")
        if scale.dtype != torch.float32 or not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"{path}.weight_scale must be finite positive float32 scales")
        if m.input_mode == "static" and not bool(torch.isfinite(step) and step > 0):
            raise ValueError(f"{path}.input_step must be a finite positive step, got {float(step)}")


def build_int8_model(config: ModelConfig, state_dict: dict, scheme: str | QuantScheme = "full",
                     activation_bits: int = 8, backend: str = "auto", backward: str = "auto",
                     architecture: str = QEqModel.architecture) -> Potential:
    """Rebuild an int8 model from its config and :func:`int8_state_dict` (no QAT model needed).

    ``scheme`` and ``activation_bits`` are those of ``metadata["quantization"]`` (the state
    dict cannot tell the vector input grid of the two schemes apart). Raises ``ValueError``
    for a state dict that does not fit (missing or extra keys, float codes, bad scales).
    """
    model = int8_model_skeleton(config, scheme, activation_bits, _observer_paths(config, state_dict, architecture),
                                backend, backward, architecture)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(f"the state dict does not fit the int8 model of this config ({err})") from err
    _check_int8_tensors(model, state_dict)
    return model


def int8_state_dict(model: QEqModel) -> dict:
    """The tensors of an int8 model to save: int8 codes, float32 scales and steps, float parts."""
    if not is_int8_model(model):
        raise ValueError("not an int8 model (build it with convert_to_int8 or build_int8_model)")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _check_int8_tensors(model, state)
    return state


def check_int8_state_dict(model: QEqModel, state_dict: dict) -> dict:
    """``state_dict`` if it holds what an int8 file of ``model`` must (int8 codes, finite positive
    scales and steps, every key of the model); ``ValueError`` otherwise."""
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"the state dict does not fit the int8 model (missing {missing[:5]}, extra {extra[:5]})")
    _check_int8_tensors(model, state)
    return state


def state_dict_nbytes(state_dict: dict) -> int:
    """Bytes of the tensor data of a state dict (what dominates the file size)."""
    return sum(t.numel() * t.element_size() for t in state_dict.values())


# ---------------------------------------------------------------------------------------
# What runs
# ---------------------------------------------------------------------------------------

FLOAT_GEMM = "float32 GEMM (torch.nn.functional.linear)"


EDGE_KERNELS = {"cpp": "fused C++ (qeq_ase/kernels/csrc/edge_attention.cpp)", "eager": "eager torch ops"}


def int8_kernel_report(model: nn.Module, build_kernels: bool = True) -> dict:
    """Every GEMM layer of ``model`` with the kernel it runs, and the counts.

    Returns ``{"layers": {path: {"kind", "shape", "kernel"}}, "int8_gemm_layers": n,
    "float_gemm_layers": m, "float_quantizers": [paths], "edge_messages": backend}``.
    ``float_quantizers`` are the fake quantizers computed in float (MDDQ of ``vector_in``);
    ``edge_messages`` says what runs the per-edge attention work at inference (the fused C++
    kernel of :mod:`qeq_ase.kernels.edge_kernel`, or eager torch). ``build_kernels=False`` builds
    no C++ kernels (int8 layers then report ``backend=...``, the edge work "not built").
    """
    layers, n_int8, n_float, quantizers = {}, 0, 0, []
    for path, m in model.named_modules():
        if isinstance(m, _Int8LinearBase):
            kernel = m.kernel if build_kernels else f"int8 GEMM {m.gemm}, backend={m.backend}"
            layers[path] = {"kind": f"int8 {type(m).__name__}, {m.input_mode} inputs",
                            "shape": f"{m.in_features} -> {m.out_features}", "kernel": kernel}
            n_int8 += 1
        elif isinstance(m, (nn.Linear, ScalarLinear, VectorLinear)):
            layers[path] = {"kind": f"float {type(m).__name__}", "shape": f"{m.in_features} -> {m.out_features}",
                            "kernel": FLOAT_GEMM}
            n_float += 1
        elif isinstance(m, (LSQQuantizer, MDDQQuantizer)) and not path.endswith(".magnitude"):
            quantizers.append(path)
    edges = "not built"
    if build_kernels and hasattr(model, "edge_backend"):
        edges = EDGE_KERNELS[model.edge_backend()]
    return {"layers": layers, "int8_gemm_layers": n_int8, "float_gemm_layers": n_float,
            "float_quantizers": quantizers, "edge_messages": edges}
