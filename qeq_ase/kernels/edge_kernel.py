"""Fused per-edge attention (C++), used at inference by the float32 and the INT8 models alike.

An energy + forces call of the eager attention layer spends ~75% of its time in the
element-wise ops, gathers and scatters over ``[E, F]``-sized tensors between the GEMMs
(``docs/speed.md``). :func:`edge_attention` does that work of one layer,
from the node-wise ``qkv`` and ``v_in`` and the edge-wise filters to the aggregated
messages, in one C++ pass per receiver (``qeq_ase/kernels/csrc/edge_attention.cpp``), with a
first-order backward that gives forces. It computes what the eager
``EquivariantAttention._messages`` computes (sink softmax, cosine or dot-product logits),
up to float rounding.

It has no double backward (``once_differentiable``): training on forces
(``create_graph=True``) keeps the eager path. The fused path is chosen by
:meth:`qeq_ase.model.network.QEqModel.energy_and_forces` when ``training=False`` and the
model's edge backend (:data:`BACKENDS`, ``QEqModel.set_edge_backend``, or
``QEqCalculator(edge_backend=...)``) resolves to ``"cpp"``. Like the INT8 kernels it is built
on first use (~20-40 s once, then cached); if it cannot be built, ``"auto"`` runs the eager
layer with a warning.

The model hands the kernel its graph through :func:`plan_fused_edges` (edges sorted by
receiver and cut into blocks; for a molecule, the :class:`EdgePairs` that let the radial features
and filters be computed once per atom pair) and its edge filters as layers; an int8 filter layer that
implements :class:`GradientCodesFilter` runs as one autograd node with the kernel
(:func:`filtered_edge_attention`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .cpp_extension import CSRC, OPENMP_FLAGS, LazyExtension
from .node_update import load_node_update_kernel

EXTENSION_NAME = "qeq_edge_attention"
# OpenMP: the kernel's at::parallel_for loops run on torch's threads (-fopenmp also enables the
# omp simd reductions). One layer's backward, 1,344 atoms, 2 threads: 17 ms against 33 ms
# single-threaded (experiments/edge_filter_gradient.py, docs/speed.md).
_CFLAGS = ["-O3", *OPENMP_FLAGS]
BACKENDS = ("auto", "cpp", "eager")
_EXTENSION = LazyExtension(EXTENSION_NAME, CSRC / "edge_attention.cpp", _CFLAGS,
                           "the fused edge-attention kernel", ldflags=OPENMP_FLAGS)


def load_edge_kernel():
    """Build (first call) or load the C++ edge kernel; raise RuntimeError if impossible."""
    return _EXTENSION.load()


def check_edge_backend(choice: str, source: str = "edge_backend") -> str:
    """``choice`` if it is one of :data:`BACKENDS`, else ValueError naming ``source``."""
    if choice not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, not {choice!r}")
    return choice


def default_edge_backend() -> str:
    """The edge backend a new model starts with: ``$QEQ_EDGE_BACKEND`` or ``"auto"``.

    Read once, when a model is built (never per call), for scripts and command lines that
    cannot pass the setting; code sets it explicitly with ``QEqModel.set_edge_backend``.
    """
    return check_edge_backend(os.environ.get("QEQ_EDGE_BACKEND", "auto"), "QEQ_EDGE_BACKEND")


def resolve_edge_backend(choice: str = "auto") -> str:
    """``"cpp"`` or ``"eager"``: what runs the per-edge work at inference for ``choice``.

    ``"auto"`` builds (first use) or loads the fused kernels and falls back to ``"eager"``
    with a warning if they cannot be built; ``"cpp"`` raises RuntimeError instead.
    """
    if check_edge_backend(choice) == "eager":
        return "eager"
    try:
        load_edge_kernel()
        load_node_update_kernel()  # the fused path's node update (qeq_ase/kernels/node_update.py)
    except RuntimeError as err:
        if choice == "cpp":
            raise
        warnings.warn(f"{err} Running the eager attention layers (slower).", RuntimeWarning, stacklevel=2)
        return "eager"
    return "cpp"


class GradientCodesFilter:
    """What :func:`filtered_edge_attention` needs of an edge-filter layer to run it and the kernel
    as one autograd node (the int8 layers of :mod:`qeq_ase.quant.int8_linear` implement it).

    The kernel writes the filter gradient as two-limb int8 codes of ``g * weight_scale``,
    which the layer's int8 input-gradient GEMM takes as they are
    (:meth:`input_grad_from_codes`); with :meth:`in_kernel_operands` the kernel also computes
    the filter rows itself.
    """

    weight_scale: torch.Tensor  # [out] float32, the per-channel scales the codes are taken against
    gradient_tiny: float        # smallest gradient scale the kernel's quantizer uses

    @property
    def takes_gradient_codes(self) -> bool:
        """Whether the layer, as it is set now, takes its output gradient as codes."""
        raise NotImplementedError

    def in_kernel_operands(self) -> dict | None:
        """Keyword arguments for the kernel to compute the layer itself, or None."""
        raise NotImplementedError

    def forward_no_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``(y, clipped)`` without an autograd node; ``clipped``: some input was out of range."""
        raise NotImplementedError

    def planar_gradient_codes(self, rows: int) -> bool:
        """Layout of the codes :meth:`input_grad_from_codes` takes: planar, or interleaved rows."""
        raise NotImplementedError

    def input_grad_from_codes(self, codes: torch.Tensor, scale: torch.Tensor,
                              x: torch.Tensor | None = None) -> torch.Tensor:
        """``dL/dx`` from the kernel's codes ``[2M, out]`` and their per-row scales ``[M]``."""
        raise NotImplementedError


@dataclass(frozen=True)
class EdgeCSR:
    """A graph's edges sorted by receiver (``rowptr``) and grouped by sender (``colptr``).

    Built once per forward pass and shared by the layers. ``sender``/``receiver`` are the
    edge endpoints in receiver order; ``sender_order`` lists the edge ids by sender.
    """

    rowptr: torch.Tensor
    sender: torch.Tensor
    receiver: torch.Tensor
    colptr: torch.Tensor
    sender_order: torch.Tensor

    @classmethod
    def from_sorted_edges(cls, edge_index: torch.Tensor, num_nodes: int) -> "EdgeCSR":
        sender, receiver = edge_index[0].contiguous(), edge_index[1].contiguous()
        if receiver.numel() > 1 and bool((receiver[1:] < receiver[:-1]).any()):
            raise ValueError("EdgeCSR needs edges sorted by receiver (see receiver_order)")
        rowptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=receiver.device)
        rowptr[1:] = torch.cumsum(torch.bincount(receiver, minlength=num_nodes), 0)
        colptr = torch.zeros_like(rowptr)
        colptr[1:] = torch.cumsum(torch.bincount(sender, minlength=num_nodes), 0)
        sender_order = torch.argsort(sender, stable=True)
        return cls(rowptr, sender, receiver, colptr, sender_order)


#: Edge blocks are cut so that one block's ``[E_block, 4F]`` float32 filters stay under this
#: size, which bounds the memory of a layer's filters and their gradient for large systems.
#: Below it the whole graph is one block: with the multi-threaded kernel one block is the
#: fastest even with glibc's default malloc, which page-faults large tensors in anew on every
#: call (1,344 atoms, 2 threads, fp32 / int8: 216 / 181 ms against 272 / 243 ms for the 8 MB
#: blocks used before; ``experiments/edge_blocks.py``, ``docs/speed.md``).
BLOCK_BYTES = 1 << 30
#: ...but a block never has fewer edges than this many per node of the graph: every block
#: writes node-sized outputs and gradients (``[N, 4F]``, ``[N, 5F]``, ``[N, 3, F]``), so
#: blocks much smaller than the graph cost O(N) each (at 10,000 atoms 4,096-edge blocks made
#: the fused path slower than the eager one on 2 threads).
MIN_BLOCK_EDGES_PER_NODE = 8


@dataclass(frozen=True)
class EdgeBlock:
    """The edges ``edges`` (a slice of the receiver-sorted edge list) of a run of receivers."""

    edges: slice
    csr: EdgeCSR


def edge_blocks(edge_index: torch.Tensor, num_nodes: int, row_bytes: int) -> list[EdgeBlock]:
    """Cut receiver-sorted edges into blocks of whole receivers.

    A block holds about ``max(BLOCK_BYTES / row_bytes, MIN_BLOCK_EDGES_PER_NODE * num_nodes)``
    edges.

    Each block's :class:`EdgeCSR` spans all ``num_nodes`` nodes (receivers outside the block
    have no edges there), so the kernel's outputs of the blocks simply add up.
    """
    max_edges = max(1, BLOCK_BYTES // max(1, row_bytes), MIN_BLOCK_EDGES_PER_NODE * num_nodes)
    counts = torch.bincount(edge_index[1], minlength=num_nodes)
    ends = torch.cumsum(counts, 0)
    block = (ends - counts) // max_edges  # the block of each receiver, by where its edges start
    cuts = torch.nonzero(block[1:] != block[:-1]).flatten() + 1  # first receiver of each new block
    bounds = [0] + ends[cuts - 1].tolist() + [edge_index.shape[1]] if len(cuts) else [0, edge_index.shape[1]]
    return [EdgeBlock(slice(b0, b1), EdgeCSR.from_sorted_edges(edge_index[:, b0:b1], num_nodes))
            for b0, b1 in zip(bounds[:-1], bounds[1:]) if b1 > b0]


@dataclass(frozen=True)
class EdgePairs:
    """The edges grouped by unordered atom pair ``{i, j}``: an edge and its reverse have the same
    length, so the same radial features and edge filters, which are then computed once per pair.

    ``first [P]``: one edge of each pair; ``row [E]``: the pair of each edge.
    """

    first: torch.Tensor
    row: torch.Tensor

    def gather(self, per_pair: torch.Tensor) -> torch.Tensor:
        """``[P, ...]`` rows, one per pair -> ``[E, ...]``, one per edge."""
        return per_pair.index_select(0, self.row)

    def sum(self, per_edge: torch.Tensor) -> torch.Tensor:
        """``[E, ...]`` rows (gradients) -> ``[P, ...]``, summed over each pair's edges."""
        out = per_edge.new_zeros((self.first.shape[0],) + per_edge.shape[1:])
        return out.index_add_(0, self.row, per_edge)


def edge_pairs(edge_index: torch.Tensor, num_nodes: int) -> EdgePairs | None:
    """:class:`EdgePairs` of edges without periodic shifts, or None where no two edges share a pair."""
    sender, receiver = edge_index
    key = torch.minimum(sender, receiver) * num_nodes + torch.maximum(sender, receiver)
    unique, row = torch.unique(key, return_inverse=True)
    if unique.numel() == key.numel():
        return None
    first = torch.empty_like(unique).scatter_(0, row, torch.arange(key.numel(), device=key.device))
    return EdgePairs(first, row)


def receiver_order(edge_index: torch.Tensor) -> torch.Tensor | None:
    """The permutation that sorts edges by receiver, or ``None`` if they already are."""
    receiver = edge_index[1]
    if receiver.numel() < 2 or not bool((receiver[1:] < receiver[:-1]).any()):
        return None
    return torch.argsort(receiver, stable=True)


def plan_fused_edges(edge_index: torch.Tensor, edge_shift: torch.Tensor | None, num_nodes: int, row_bytes: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None, list[EdgeBlock], EdgePairs | None]:
    """The graph as the fused kernel takes it: ``(edge_index, edge_shift, blocks, pairs)`` with the
    edges sorted by receiver and cut into :func:`edge_blocks` (``row_bytes``: one edge's filters),
    and their :func:`edge_pairs` where the filters are computed once per pair: one block, no
    periodic shifts (an image pair's shift would have to be matched too)."""
    order = receiver_order(edge_index)
    if order is not None:
        edge_index = edge_index[:, order]
        edge_shift = edge_shift[order] if edge_shift is not None else None
    blocks = edge_blocks(edge_index, num_nodes, row_bytes)
    pairs = edge_pairs(edge_index, num_nodes) if edge_shift is None and len(blocks) == 1 else None
    return edge_index, edge_shift, blocks, pairs


def _forward(ctx, qkv, vin, filt, envelope, unit, scale, csr: EdgeCSR, normalize: bool, *extra, **in_kernel):
    """Run the kernel and save what its backward needs (plus ``extra`` tensors, saved last).
    ``in_kernel``: the in-kernel filter's arguments (then ``filt`` is empty)."""
    graph = (csr.rowptr, csr.sender, csr.receiver, csr.colptr, csr.sender_order)
    agg_s, agg_v, *saved = load_edge_kernel().forward(qkv, vin, filt, envelope, unit, scale, *graph, normalize,
                                                      **in_kernel)
    if in_kernel:  # the kernel computed the filter rows (the backward's filt) from extra[0], its input
        clipped, filt = bool(saved.pop()), saved.pop()
        if not clipped:  # the input is kept only for LSQ's STE mask, when some was clipped
            extra = (None,) + extra[1:]
    ctx.save_for_backward(qkv, vin, filt, envelope, unit, scale, *saved, *graph, *extra)
    ctx.normalize = normalize
    return agg_s, agg_v


def _backward(ctx, grad_s, grad_v, n_extra: int = 0, **codes):
    """The kernel's backward from what :func:`_forward` saved: its eight outputs and the extra tensors."""
    saved = ctx.saved_tensors
    kernel_inputs, extra = saved[:len(saved) - n_extra], saved[len(saved) - n_extra:]
    qkv, vin = kernel_inputs[:2]
    if grad_s is None:
        grad_s = torch.zeros(qkv.shape[0], qkv.shape[1] // 5, dtype=qkv.dtype)
    if grad_v is None:
        grad_v = torch.zeros_like(vin)
    grads = load_edge_kernel().backward(grad_s.contiguous(), grad_v.contiguous(), *kernel_inputs, ctx.normalize,
                                        **codes)
    return grads, extra


class _EdgeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, vin, filt, envelope, unit, scale, csr: EdgeCSR, normalize: bool):
        return _forward(ctx, qkv, vin, filt, envelope, unit, scale, csr, normalize)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s, grad_v):
        (dqkv, dvin, dfilt, denv, dunit, dscale, _, _), _ = _backward(ctx, grad_s, grad_v)
        return dqkv, dvin, dfilt, denv, dunit, dscale, None, None


class _Int8FilterEdgeAttention(torch.autograd.Function):
    """The filter GEMM and the kernel as one node, for an int8 filter layer that takes gradient codes.

    Backward: the kernel writes the filter gradient times the layer's weight scales as
    two-limb int8 codes per edge, which go straight into the layer's int8 input-gradient
    GEMM; the ``[E, 4F]`` float gradient is never stored, nor read again to be quantized.

    With the brgemm GEMM (``layer.in_kernel_operands()``) the kernel goes further: it
    quantizes the edge features and computes the filter rows itself, a window of edges at
    a time, uses them while they are in cache and streams them to memory for the backward,
    and its backward runs the layer's input-gradient GEMM on each window of senders'
    gradient codes: no separate filter GEMM, no codes tensor. Same arithmetic, same results
    (tested bit for bit).
    """

    @staticmethod
    def forward(ctx, qkv, vin, edge_features, envelope, unit, scale, csr: EdgeCSR, normalize: bool, layer,
                pairs: EdgePairs | None):
        ctx.layer, ctx.pairs = layer, pairs
        ctx.in_kernel = layer.in_kernel_operands()
        if ctx.in_kernel is not None:  # (per edge: the kernel computes the rows it uses)
            x = edge_features if pairs is None else pairs.gather(edge_features)
            return _forward(ctx, qkv, vin, qkv.new_empty(0), envelope, unit, scale, csr, normalize, x, filter_x=x,
                            **{k: ctx.in_kernel[k] for k in ("filter_w", "filter_w_scale", "filter_step",
                                                             "filter_qmax")})
        filt, clipped = layer.forward_no_grad(edge_features)
        clipped_input = edge_features if clipped else None  # kept for LSQ's STE mask, only when needed
        if pairs is not None:
            filt = pairs.gather(filt)
            clipped_input = pairs.gather(clipped_input) if clipped else None
        return _forward(ctx, qkv, vin, filt, envelope, unit, scale, csr, normalize, clipped_input)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s, grad_v):
        layer = ctx.layer
        if ctx.in_kernel is not None:
            clipped_input = ctx.saved_tensors[-1]  # the extra tensor of _forward (None: nothing clipped)
            grads, _ = _backward(ctx, grad_s, grad_v, n_extra=1, filt_col_scale=layer.weight_scale,
                                 tiny=layer.gradient_tiny, filter_mask_x=clipped_input,
                                 **{k: ctx.in_kernel[k] for k in ("filter_w_bwd", "filter_step", "filter_qmax")})
            dqkv, dvin, dfeatures, denv, dunit, dscale, _, _ = grads
        else:
            n_edges = ctx.saved_tensors[2].shape[0]
            grads, (clipped_input,) = _backward(ctx, grad_s, grad_v, n_extra=1, filt_col_scale=layer.weight_scale,
                                                tiny=layer.gradient_tiny, planar=layer.planar_gradient_codes(n_edges))
            dqkv, dvin, _, denv, dunit, dscale, codes, code_scale = grads
            dfeatures = (layer.input_grad_from_codes(codes, code_scale, clipped_input) if ctx.needs_input_grad[2]
                         else None)
        if dfeatures is not None and ctx.pairs is not None:
            dfeatures = ctx.pairs.sum(dfeatures)
        return dqkv, dvin, dfeatures, denv, dunit, dscale, None, None, None, None


def edge_attention(qkv: torch.Tensor, vin: torch.Tensor, filt: torch.Tensor, envelope: torch.Tensor,
                   unit: torch.Tensor, scale: torch.Tensor, csr: EdgeCSR, normalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregated scalar ``[N, F]`` and vector ``[N, 3, F]`` messages of one attention layer.

    ``qkv [N, 5F]`` (q | k | three value parts), ``vin [N, 3, F]``, ``filt [E, 4F]`` (key
    filter | three value filters, before the envelope), ``envelope [E]``, ``unit [E, 3]``,
    ``scale [H]`` (inverse temperatures, or ``1/sqrt(F/H)`` without normalisation).
    Tensors are cast to one float dtype (float32 under bf16 autocast).
    """
    dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    args = [t.to(dtype).contiguous() for t in (qkv, vin, filt, envelope, unit, scale)]
    return _EdgeAttention.apply(*args, csr, normalize)


def filtered_edge_attention(qkv: torch.Tensor, vin: torch.Tensor, edge_features: torch.Tensor,
                            filter_layer: torch.nn.Module, envelope: torch.Tensor, unit: torch.Tensor,
                            scale: torch.Tensor, csr: EdgeCSR, normalize: bool, pairs: EdgePairs | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`edge_attention` with ``filt = filter_layer(edge_features)``; with ``pairs`` the
    features (and the filter GEMM) have one row per pair of edges, gathered for the kernel.

    If the filter layer is a :class:`GradientCodesFilter` that takes its input gradient as int8
    codes now (an int8 layer with static inputs and ``backward="auto"``, the default, or
    ``"int8"``; :mod:`qeq_ase.quant.int8_linear`) and the inputs are float32, the filter GEMM
    and the kernel run as one autograd node whose backward feeds the kernel's int8 filter
    gradient to the layer's int8 GEMM (:class:`_Int8FilterEdgeAttention`).
    """
    if (isinstance(filter_layer, GradientCodesFilter) and filter_layer.takes_gradient_codes
            and qkv.dtype == torch.float32
            and vin.dtype == torch.float32 and edge_features.dtype == torch.float32):
        args = [t.contiguous() for t in (qkv, vin, edge_features, envelope.float(), unit.float(), scale.float())]
        return _Int8FilterEdgeAttention.apply(*args, csr, normalize, filter_layer, pairs)
    filt = filter_layer(edge_features)
    return edge_attention(qkv, vin, filt if pairs is None else pairs.gather(filt), envelope, unit, scale, csr,
                          normalize)
