"""Quantization schemes as objects: what each one fakes in training, runs in INT8 and records.

A :class:`QuantScheme` owns the three things that must agree for a scheme: the layer factory
of its quantization-aware training (:mod:`qeq_ase.quant.qat`), the input grid of its int8
vector layers (:mod:`qeq_ase.quant.int8_model`) and the description written into a potential
file. Files record the scheme by name (``metadata["quantization"]["scheme"]``) and the loader
looks it up in :data:`SCHEMES`; a new scheme is one :func:`register_scheme` call.

>>> get_scheme("full").vector_input_mode
'atom'
>>> sorted(SCHEMES)
['full', 'naive']
"""

from __future__ import annotations

from dataclasses import dataclass

from .qat import NaiveQATLayerFactory, QATLayerFactory

VECTOR_INPUT_MODES = ("atom", "static")


@dataclass(frozen=True)
class QuantScheme:
    """One quantization scheme (arXiv:2601.02213 and its naive baseline).

    ``qat_factory`` builds the fake-quantized layers and observers (constructed with
    ``(weight_bits, activation_bits)``); its ``per_channel`` and ``requantize_per_atom`` are
    what a QAT model of this scheme has in every layer. ``vector_input_mode`` is the input
    grid of the int8 vector layers: ``"atom"`` (one rotation-invariant step per atom) or
    ``"static"`` (one learned step per tensor). ``weights``, ``activations`` and ``vector``
    describe it in words, for the file's metadata.
    """

    name: str
    qat_factory: type[QATLayerFactory]
    vector_input_mode: str
    weights: str
    activations: str
    vector: str

    def __post_init__(self) -> None:
        if self.vector_input_mode not in VECTOR_INPUT_MODES:
            raise ValueError(f"vector_input_mode must be one of {VECTOR_INPUT_MODES}, not {self.vector_input_mode!r}")

    def layer_factory(self, weight_bits: int = 8, activation_bits: int = 8) -> QATLayerFactory:
        """The factory that builds this scheme's QAT layers and observers."""
        return self.qat_factory(weight_bits, activation_bits)

    def metadata(self, activation_bits: int = 8, weight_bits: int = 8) -> dict:
        """The scheme's part of ``metadata["quantization"]``: its name, description and bits."""
        return {"scheme": self.name, "weights": self.weights, "activations": self.activations,
                "vector": self.vector, "weight_bits": int(weight_bits), "activation_bits": int(activation_bits)}


#: The registered schemes by name (:func:`register_scheme`).
SCHEMES: dict[str, QuantScheme] = {}


def register_scheme(scheme: QuantScheme) -> QuantScheme:
    """Make ``scheme`` known to QAT, the INT8 converter and the file loader; returns it."""
    if scheme.name in SCHEMES and SCHEMES[scheme.name] != scheme:
        raise ValueError(f"a different quantization scheme named {scheme.name!r} is already registered")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(scheme: str | QuantScheme) -> QuantScheme:
    """The registered scheme of that name (a :class:`QuantScheme` is returned as it is)."""
    if isinstance(scheme, QuantScheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {sorted(SCHEMES)}")
    return SCHEMES[scheme]


FULL = register_scheme(QuantScheme(
    "full", QATLayerFactory, "atom",
    weights="int8 per-output-channel symmetric",
    activations="int8 symmetric, one learned static step per tensor (LSQ)",
    vector="MDDQ (8-bit magnitude with a learned step, 8-bit direction), then a per-atom "
           "int8 grid (largest vector length of the atom / 127) for the GEMM",
))
NAIVE = register_scheme(QuantScheme(
    "naive", NaiveQATLayerFactory, "static",
    weights="int8 per-tensor symmetric",
    activations="int8 symmetric, one learned static step per tensor (LSQ)",
    vector="naive: one learned per-tensor step on every Cartesian component (not rotation invariant)",
))
