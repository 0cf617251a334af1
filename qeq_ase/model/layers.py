"""The one place that defines the model's linear layers and feature "activations".

Every matrix multiplication of the network goes through :class:`ScalarLinear` (invariant
``l=0`` features, ``[..., F]``) or :class:`VectorLinear` (equivariant ``l=1`` features,
``[N, 3, F]``), and every point where features are handed from one layer to the next goes
through a :class:`FeatureObserver`. The model is built from a :class:`LayerFactory`;
quantization swaps the factory (or the built modules) for quantized twins that expose
the same ``irreps_in``/``irreps_out``, so the model code never changes.

Vector layout: ``[N, 3, F]``, Cartesian component in the middle and channels last, so a
channel-mixing ``VectorLinear`` is one GEMM over ``3N`` rows. In e3nn terms the features
are ``"Fx1o"`` irreps with a ``(m, mul)`` memory order; the weight normalisation is that
of ``e3nn.o3.Linear`` (``1/sqrt(fan_in)``), so the two agree numerically.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn


class _NormalisedLinear(nn.Module):
    """A weight ``[out, in]`` used as ``W / sqrt(in)`` (e3nn's normalisation)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features))

    def effective_weight(self) -> torch.Tensor:
        # Recomputed on every call. A cache keyed on the weight's version counter misses updates
        # made through ``weight.data``, and on CUDA it evaluated an EMA model with stale weights
        # (docs/training.md, "Training on a GPU"). The divide is a small fraction of a call.
        return self.weight / math.sqrt(self.in_features)


class ScalarLinear(_NormalisedLinear):
    """``y = x W / sqrt(in) + b`` on invariant features (e3nn's normalisation)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features)
        self.irreps_in = o3.Irreps(f"{in_features}x0e")
        self.irreps_out = o3.Irreps(f"{out_features}x0e")
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, bias={self.bias is not None}"


class VectorLinear(_NormalisedLinear):
    """Channel mixing of ``l=1`` features ``[N, 3, F_in] -> [N, 3, F_out]``; no bias (equivariance)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.irreps_in = o3.Irreps(f"{in_features}x1o")
        self.irreps_out = o3.Irreps(f"{out_features}x1o")

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(v, self.effective_weight())

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}"


class FeatureObserver(nn.Module):
    """Identity in float32. Marks a point where features cross a layer boundary.

    ``kind`` is ``"scalar"`` or ``"vector"``; quantization-aware training replaces these
    with fake quantizers (LSQ for scalars, magnitude-direction decoupled for vectors).
    """

    def __init__(self, kind: str, num_features: int):
        super().__init__()
        if kind not in ("scalar", "vector"):
            raise ValueError(f"FeatureObserver kind must be 'scalar' or 'vector', not {kind!r}")
        self.kind, self.num_features = kind, num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.num_features}"


class LayerFactory:
    """Builds the swappable layers. Subclass it to build quantized twins."""

    def scalar_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return ScalarLinear(in_features, out_features, bias)

    def vector_linear(self, in_features: int, out_features: int) -> nn.Module:
        return VectorLinear(in_features, out_features)

    def observer(self, kind: str, num_features: int) -> nn.Module:
        return FeatureObserver(kind, num_features)
