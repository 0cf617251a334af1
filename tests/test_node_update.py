"""The fused node update (C++) against the eager ops it replaces at inference."""

import pytest
import torch

from qeq_ase.kernels.node_update import node_update


def eager_node_update(s, v, vm, o, agg_v):
    F = s.shape[1]
    (v1, v2, v3), (o1, o2, o3) = vm.split(F, dim=-1), o.split(F, dim=-1)
    return s + ((v1 * v2).sum(dim=1) * o2 + o3), v + (v3 * o1[:, None, :] + agg_v)


def random_inputs(dtype, N=7, F=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(N, F), (N, 3, F), (N, 3, 3 * F), (N, 3 * F), (N, 3, F)]
    return [torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True) for shape in shapes]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_node_update_and_its_gradients_equal_the_eager_ops(dtype, tol):
    x = random_inputs(dtype)
    fused, eager = node_update(*x), eager_node_update(*x)
    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in eager]
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    g_fused = torch.autograd.grad(fused, x, cotangents)
    g_eager = torch.autograd.grad(eager, x, cotangents)
    for name, a, b in zip(("s", "v", "vm", "o", "agg_v"), g_fused, g_eager):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"d/d{name}: {m}")


def test_node_update_passes_gradcheck():
    assert torch.autograd.gradcheck(node_update, random_inputs(torch.float64, N=3, F=4, seed=2))


def test_unused_vector_output_gives_the_eager_gradients():
    # the last layer's v' feeds nothing: its gradient arrives as None, not as zeros
    x = random_inputs(torch.float64, seed=3)
    g_fused = torch.autograd.grad(node_update(*x)[0].sum(), x, allow_unused=True)
    g_eager = torch.autograd.grad(eager_node_update(*x)[0].sum(), x, allow_unused=True)
    for a, b in zip(g_fused, g_eager):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_node_update_rejects_mismatched_shapes():
    s, v, vm, o, agg_v = random_inputs(torch.float64)
    with pytest.raises(RuntimeError, match=r"vm must be \[N, 3, 3F\]"):
        node_update(s, v, vm[..., :-1], o, agg_v)
