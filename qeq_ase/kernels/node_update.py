"""The node update of an attention layer as one C++ pass (forward and backward), at inference.

After the messages, a layer updates its nodes residually (``qeq_ase/model/attention.py``)::

    s' = s + (v1 * v2).sum(dim=1) * o2 + o3
    v' = v + v3 * o1 + agg_v

Eager, that is eight passes over ``[N, F]``/``[N, 3, F]`` tensors forward and about fifteen in
the backward; :func:`node_update` does each direction in one (``qeq_ase/kernels/csrc/node_update.cpp``).
It runs wherever the fused edge kernel runs (the same float32 and INT8 inference path, so the
two precisions still share it) and, like that kernel, has no double backward: training keeps
the eager ops.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .cpp_extension import CSRC, OPENMP_FLAGS, LazyExtension

_EXTENSION = LazyExtension("qeq_node_update", CSRC / "node_update.cpp", ["-O3", *OPENMP_FLAGS],
                           "the fused node-update kernel", ldflags=OPENMP_FLAGS)


def load_node_update_kernel():
    """Build (first call) or load the C++ node-update kernel; raise RuntimeError if impossible."""
    return _EXTENSION.load()


class _NodeUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, v, vm, o, agg_v):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(vm, o)
        return tuple(load_node_update_kernel().forward(s, v, vm, o, agg_v))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s, grad_v):
        vm, o = ctx.saved_tensors
        if grad_s is None:
            grad_s = vm.new_zeros(vm.shape[0], vm.shape[2] // 3)
        grad_v = grad_v.contiguous() if grad_v is not None else None
        grad_vm, grad_o = load_node_update_kernel().backward(grad_s.contiguous(), grad_v, vm, o)
        return grad_s, grad_v, grad_vm, grad_o, grad_v


def node_update(s: torch.Tensor, v: torch.Tensor, vm: torch.Tensor, o: torch.Tensor,
                agg_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s', v')`` from ``s [N, F]``, ``v [N, 3, F]``, ``vm = v1 | v2 | v3 [N, 3, 3F]``,
    ``o = o1 | o2 | o3 [N, 3F]`` and ``agg_v [N, 3, F]``, all cast to ``s``'s dtype (float32 under
    bf16 autocast, as in the edge kernel)."""
    dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    return _NodeUpdate.apply(*(t.to(dtype).contiguous() for t in (s, v, vm, o, agg_v)))
