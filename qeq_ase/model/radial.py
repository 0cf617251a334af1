"""Radial features of an edge: a Bessel basis and a smooth cutoff envelope.

Why an envelope: the Bessel functions ``sin(n pi r / r_c) / r`` vanish at the cutoff but
their slope does not, so an atom crossing ``r_c`` would make the forces jump and spoil
energy conservation. Every message is multiplied by the cosine envelope
``C(r) = (cos(pi r / r_c) + 1) / 2``, which goes to zero with zero slope at ``r_c``:
energies and forces stay continuous as neighbours enter and leave.
"""

from __future__ import annotations

import math

import torch
from e3nn.math import soft_one_hot_linspace
from torch import nn


def cosine_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``(cos(pi r / cutoff) + 1) / 2`` inside the cutoff, 0 beyond; C(r_c) = C'(r_c) = 0."""
    inside = r < cutoff
    return torch.where(inside, 0.5 * (torch.cos(math.pi * r / cutoff) + 1.0), torch.zeros_like(r))


class RadialBasis(nn.Module):
    """``num_basis`` Bessel functions on ``[0, cutoff]`` (``e3nn.math.soft_one_hot_linspace``)."""

    def __init__(self, cutoff: float, num_basis: int):
        super().__init__()
        self.cutoff, self.num_basis = float(cutoff), int(num_basis)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        # e3nn's Bessel basis is sqrt(2/c) sin(n pi r/c) / r; scaled by sqrt(c) to O(1) values.
        basis = soft_one_hot_linspace(r, 0.0, self.cutoff, self.num_basis, basis="bessel", cutoff=True)
        return basis * math.sqrt(self.cutoff)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff} Å, num_basis={self.num_basis}"


class ExpNormalBasis(nn.Module):
    """``num_basis`` exponential-normal functions ``exp(-beta (exp(-alpha r) - mu_k)^2)`` (PhysNet,
    TorchMD-Net), ``alpha = 5 / cutoff``, the ``mu_k`` evenly spaced on ``[exp(-5), 1]``: finer
    resolution at short distances, where bonds are. Fixed, not trained."""

    def __init__(self, cutoff: float, num_basis: int):
        super().__init__()
        self.cutoff, self.num_basis = float(cutoff), int(num_basis)
        self.alpha = 5.0 / self.cutoff
        start = math.exp(-self.alpha * self.cutoff)
        self.register_buffer("means", torch.linspace(start, 1.0, self.num_basis), persistent=False)
        self.beta = (2.0 / self.num_basis * (1.0 - start)) ** -2

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.beta * (torch.exp(-self.alpha * r)[:, None] - self.means) ** 2)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff} Å, num_basis={self.num_basis}"


RADIAL_BASES = {"bessel": RadialBasis, "expnorm": ExpNormalBasis}
