"""Equivariant multi-head attention layer over neighbours (scalar l=0 + vector l=1 channels).

The anatomy follows the equivariant transformer of TorchMD-Net and PaiNN: node features
``s [N, F]`` (invariant) and ``v [N, 3, F]`` (equivariant) are updated residually by
messages from the neighbours within the cutoff.

Attention normalisation (arXiv:2601.02213): queries and the filtered keys are
L2-normalised per head and their cosine is divided by a learned temperature, so every
logit lies in ``[-1/tau, 1/tau]`` whatever the scale of the features. Bounded logits are
what make attention robust when features are quantized to 8 bits; ``normalize=False``
gives the usual ``q.k / sqrt(d)`` logits for ablations.

Two ways to turn logits into attention weights (``activation``):

- ``"silu"`` (TorchMD-Net's equivariant transformer): ``a_ij = C_ij silu(l_ij)``, a gate
  per edge with no normalisation over neighbours, so a sum of messages still counts them.
- ``"softmax"``: a softmax with a "sink" of logit 0 and every term weighted by the cutoff
  envelope ``C(r_ij)``, ``a_ij = C_ij exp(l_ij) / (1 + sum_k C_ik exp(l_ik))``. The sink
  keeps the weights continuous when the last neighbour leaves the cutoff (a plain softmax
  would jump from 1 to 0).

Either way the envelope makes the weights vanish smoothly at ``r_c``.

Given :class:`~qeq_ase.kernels.edge_kernel.EdgeBlock` s (inference, softmax attention) the per-edge
work between the GEMMs runs in the fused C++ kernel of :mod:`qeq_ase.kernels.edge_kernel`, one block
of edges at a time; without them (training, or the model's edge backend ``"eager"``) it runs as the
eager ops below; so does the node update that closes the layer (:mod:`qeq_ase.kernels.node_update`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels.edge_kernel import EdgeBlock, EdgePairs, filtered_edge_attention
from ..kernels.node_update import node_update
from .layers import LayerFactory


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of ``src`` into ``dim_size`` rows by ``index`` (along dim 0)."""
    out = src.new_zeros((dim_size,) + src.shape[1:])
    return out.index_add_(0, index, src)


def sink_softmax(logits: torch.Tensor, weight: torch.Tensor, receiver: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``weight * exp(l) / (1 + sum weight * exp(l))`` over the edges of each receiver.

    ``logits`` ``[E, H]``, ``weight`` ``[E]`` (the cutoff envelope). A per-receiver shift
    (detached: the result does not depend on it) keeps ``exp`` finite for any logits.
    """
    shift = torch.zeros(num_nodes, logits.shape[1], dtype=logits.dtype, device=logits.device)
    shift = shift.scatter_reduce(0, receiver[:, None].expand_as(logits), logits.detach(), "amax", include_self=True)
    w = weight[:, None] * torch.exp(logits - torch.index_select(shift, 0, receiver))
    denominator = torch.exp(-shift) + scatter_sum(w, receiver, num_nodes)
    return w / torch.index_select(denominator, 0, receiver)


ATTENTION_ACTIVATIONS = ("softmax", "silu")


class EquivariantAttention(nn.Module):
    """One interaction layer: attention-weighted scalar messages and equivariant vector messages.

    Shapes: ``s [N, F]``, ``v [N, 3, F]``, ``edge_features [E, F]`` (radial embedding),
    ``envelope [E]``, ``unit [E, 3]`` (unit vector from receiver ``i`` to sender ``j``).
    """

    def __init__(self, num_features: int, num_heads: int, normalize: bool = True,
                 temperature: float = 0.2, factory: LayerFactory | None = None, activation: str = "softmax",
                 feed_forward: bool = True):
        super().__init__()
        if num_features % num_heads:
            raise ValueError(f"num_features={num_features} is not divisible by num_heads={num_heads}")
        if activation not in ATTENTION_ACTIVATIONS:
            raise ValueError(f"attention activation must be one of {ATTENTION_ACTIVATIONS}, not {activation!r}")
        self.activation = activation
        factory = factory or LayerFactory()
        F = num_features
        self.num_features, self.num_heads, self.normalize = F, num_heads, normalize
        self.norm = nn.LayerNorm(F)
        self.scalar_in = factory.observer("scalar", F)
        self.vector_in = factory.observer("vector", F)
        self.qkv = factory.scalar_linear(F, 5 * F)            # q, k, and 3 value parts
        self.vector_mix = factory.vector_linear(F, 3 * F, )   # v1, v2, v3
        self.edge_filter = factory.scalar_linear(F, 4 * F, bias=False)  # key filter, 3 value filters
        self.scalar_out = factory.observer("scalar", F)
        self.out = factory.scalar_linear(F, 3 * F)
        # transformer-style node-wise feed-forward block on the scalar channel
        self.feed_forward = feed_forward
        if feed_forward:
            self.ffn_norm = nn.LayerNorm(F)
            self.ffn_in = factory.observer("scalar", F)
            self.ffn_hidden = factory.scalar_linear(F, 2 * F)
            self.ffn_out = factory.scalar_linear(2 * F, F)
        # log(1/temperature) per head; only used with normalize=True
        self.log_inv_temperature = nn.Parameter(torch.full((num_heads,), math.log(1.0 / temperature)))

    def logit_scale(self) -> torch.Tensor:
        """``[H]`` factors of the logits: ``1/temperature`` (normalised) or ``1/sqrt(F/H)``."""
        if self.normalize:
            return self.log_inv_temperature.clamp(max=math.log(100.0)).exp()
        head_dim = self.num_features // self.num_heads
        return self.log_inv_temperature.new_full((self.num_heads,), 1.0 / math.sqrt(head_dim))

    def attention_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``[E, H]`` logits from per-edge queries and keys ``[E, H, F/H]``."""
        if self.normalize:
            cos = (nn.functional.normalize(q, dim=-1) * nn.functional.normalize(k, dim=-1)).sum(-1)
            return cos * self.logit_scale()
        return (q * k).sum(-1) / math.sqrt(q.shape[-1])

    def forward(self, s, v, edge_index, edge_features, envelope, unit, blocks: list[EdgeBlock] | None = None,
                pairs: EdgePairs | None = None):
        F = self.num_features
        s_in = self.scalar_in(self.norm(s))
        v_in = self.vector_in(v)
        qkv = self.qkv(s_in)
        vm = self.vector_mix(v_in)
        if blocks and self.activation == "softmax":  # (no edges at all: the eager ops, on empty tensors)
            agg_s, agg_v = self._fused_messages(qkv, v_in, edge_features, envelope, unit, blocks, pairs)
        else:
            filt = self.edge_filter(edge_features)
            filt = filt if pairs is None else pairs.gather(filt)
            agg_s, agg_v = self._messages(qkv, v_in, filt, edge_index, envelope, unit)
        o = self.out(self.scalar_out(agg_s))
        if blocks is not None:  # the fused inference path: one C++ pass (qeq_ase/kernels/node_update.py)
            s, v = node_update(s, v, vm, o, agg_v)
        else:
            (v1, v2, v3), (o1, o2, o3) = vm.split(F, dim=-1), o.split(F, dim=-1)
            s = s + ((v1 * v2).sum(dim=1) * o2 + o3)
            v = v + (v3 * o1[:, None, :] + agg_v)
        if self.feed_forward:
            s = s + self.ffn_out(nn.functional.silu(self.ffn_hidden(self.ffn_in(self.ffn_norm(s)))))
        return s, v

    def _fused_messages(self, qkv, v_in, edge_features, envelope, unit, blocks: list[EdgeBlock],
                        pairs: EdgePairs | None = None):
        """The fused kernel, block by block of edges (the edge GEMM too, so no [E, 4F] tensor is whole);
        with ``pairs`` (only ever one whole block, never sliced) ``edge_features`` has one row per pair."""
        scale = self.logit_scale()
        agg_s = agg_v = None
        for block in blocks:
            e = block.edges
            edge_tensors = (edge_features, envelope, unit)
            if e.start != 0 or e.stop != envelope.shape[0]:  # (not sliced when whole: a slice's backward
                edge_tensors = tuple(t[e] for t in edge_tensors)  # zero-fills and copies an [E, F] gradient)
            part_s, part_v = filtered_edge_attention(qkv, v_in, edge_tensors[0], self.edge_filter, *edge_tensors[1:],
                                                     scale, block.csr, self.normalize, pairs)
            agg_s = part_s if agg_s is None else agg_s + part_s
            agg_v = part_v if agg_v is None else agg_v + part_v
        return agg_s.to(qkv.dtype), agg_v.to(v_in.dtype)

    def _messages(self, qkv, v_in, filt, edge_index, envelope, unit):
        """Eager per-edge work: aggregated scalar ``[N, F]`` and vector ``[N, 3, F]`` messages."""
        sender, receiver = edge_index
        N, F, H = qkv.shape[0], self.num_features, self.num_heads
        q, k, values = qkv.split([F, F, 3 * F], dim=-1)
        key_filter, value_filter = filt.split([F, 3 * F], dim=-1)
        value_filter = value_filter * envelope[:, None]

        # index_select, not x[index]: its backward is a fast index_add_, not index_put_
        k_j, values_j = torch.index_select(torch.cat([k, values], dim=-1), 0, sender).split([F, 3 * F], dim=-1)
        q_i = torch.index_select(q, 0, receiver)
        logits = self.attention_logits(q_i.view(-1, H, F // H), (k_j * key_filter).view(-1, H, F // H))
        if self.activation == "silu":
            attn = nn.functional.silu(logits) * envelope[:, None]                  # [E, H]
        else:
            attn = sink_softmax(logits, envelope, receiver, N)

        x, g_vec, g_dir = (values_j * value_filter).split(F, dim=-1)
        msg_s = (x.view(-1, H, F // H) * attn[:, :, None]).view(-1, F)          # [E, F]
        v_j = torch.index_select(v_in, 0, sender)
        msg_v = v_j * g_vec[:, None, :] + unit[:, :, None] * g_dir[:, None, :]  # [E, 3, F]
        return scatter_sum(msg_s, receiver, N), scatter_sum(msg_v, receiver, N)
