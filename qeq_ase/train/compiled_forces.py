"""Energy and forces as one compiled graph, for training on forces.

A force loss needs the second derivative: forces are ``-dE/dx`` and the loss is then
differentiated with respect to the weights. ``torch.compile`` cannot compile a function that
calls ``torch.autograd.grad(..., create_graph=True)``, so training normally runs thousands of
small eager ops per step. Here the force computation is unfolded first: ``make_fx`` traces
energy *and* its gradient into one flat graph of aten ops (the backward written out as
forward ops), and that graph is compiled (TorchInductor: fused C++ loops on the CPU). A
loss on its outputs then needs only a first-order backward, which the compiler also builds.
NequIP compiles its training the same way.

Shapes stay dynamic (``tracing_mode="symbolic"``): one compiled graph serves every batch,
whatever its numbers of atoms and edges. Compiling takes one to two minutes on two cores,
once per process; it pays off in runs of more than a few minutes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx.experimental._config
from torch.func import functional_call

from ..model.attention import scatter_sum
from ..model.potential import Potential


@torch.library.custom_op("qeq_ase::index_add", mutates_args=())
def index_add(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``x.index_add(dim, index, src)``, opaque to the compiler (see :func:`_opaque_index_add`)."""
    return x.index_add(dim, index, src)


@index_add.register_fake
def _(x, dim, index, src):
    return torch.empty_like(x)


def _index_add_setup(ctx, inputs, output):
    _, ctx.dim, index, _ = inputs
    ctx.save_for_backward(index)


def _index_add_backward(ctx, grad):
    index, = ctx.saved_tensors
    return grad, None, None, grad.index_select(ctx.dim, index)


index_add.register_autograd(_index_add_backward, setup_context=_index_add_setup)


def _opaque_index_add(graph_module: torch.fx.GraphModule) -> None:
    """Run every ``aten.index_add`` of the graph as the ATen kernel, in place.

    TorchInductor (torch 2.13, CPU) rewrites ``index_add`` into an accumulating ``index_put``
    and generates wrong sums for some of this model's graphs: forces off by ~5% in float64 for
    a four-layer model (``tests/test_compiled_forces.py``). A custom op is left as a call.
    """
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs.get("alpha", 1) != 1:
            continue
        # an in-place add into a fresh buffer that nothing else reads (``scatter_sum``) is the same sum
        in_place_alone = node.target is torch.ops.aten.index_add_.default and len(node.args[0].users) == 1
        if node.target is torch.ops.aten.index_add.default or in_place_alone:
            node.target, node.kwargs = torch.ops.qeq_ase.index_add.default, {}
    graph_module.recompile()


def _drop_detaches(graph_module: torch.fx.GraphModule) -> None:
    """Make every ``aten.detach`` of the traced graph an identity, in place.

    Autograd saves the outputs it needs for a backward (``exp``'s result, a norm) as detached
    tensors, so the traced force graph reads them through ``detach`` nodes, and a loss on the
    forces would get no gradient through them. The model's one deliberate detach, the max
    shift inside :func:`~qeq_ase.model.attention.sink_softmax`, is a shift that the softmax does not
    depend on, so its gradient is zero either way (to rounding).
    """
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default and not any(
                user.target is torch.ops.aten.scatter_reduce.two for user in node.users):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph_module.recompile()


class CompiledEnergyForces:
    """``model.energy_and_forces(..., training=True)`` for a float model, as one compiled graph.

    Built lazily on the first call (its shapes seed the trace). The live parameters are
    inputs of the graph, so optimizer updates are seen; buffers (``energy_scale``, the
    species map) are read at trace time and must not change afterwards.

    ``backend``: a ``torch.compile`` backend (``"inductor"``: generated C++ loops), or ``None``
    to run the traced graph as it is (eager aten ops, no compile time; for tests).
    """

    def __init__(self, model: Potential, backend: str | None = "inductor"):
        self.model, self.backend = model, backend
        self._names = [name for name, _ in model.named_parameters()]
        self._fn: Callable | None = None

    def _energy_forces(self, params: list[torch.Tensor], positions: torch.Tensor, species: torch.Tensor,
                       edge_index: torch.Tensor):
        weights = dict(zip(self._names, params))
        atomic = functional_call(self.model, weights, (positions, species, edge_index))
        grad, = torch.autograd.grad(atomic.sum(), positions, create_graph=True)
        return atomic, -grad

    def _build(self, params, positions, species, edge_index) -> Callable:
        from torch.fx.experimental.proxy_tensor import make_fx

        def energy_forces(params, positions, species, edge_index):  # make_fx wants a plain function
            return self._energy_forces(params, positions, species, edge_index)

        # No duck sizing: by default equal sizes share one symbol, so a first batch of as many atoms
        # as the model has features (salicylic acid: batches of 8 x 16 atoms, F = 128) fixed the atom count
        # of every later batch ("shape '[384, 128]' is invalid").
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            traced = make_fx(energy_forces, tracing_mode="symbolic", _allow_non_fake_inputs=True)(
                [p.detach() for p in params], positions.detach().requires_grad_(True), species, edge_index)
        _drop_detaches(traced)
        _opaque_index_add(traced)
        if self.backend is None:
            return traced
        return torch.compile(traced, backend=self.backend, dynamic=True)

    def __call__(self, positions: torch.Tensor, species: torch.Tensor, edge_index: torch.Tensor,
                 batch: torch.Tensor, num_graphs: int) -> dict[str, torch.Tensor]:
        """``interaction_energy`` ``[num_graphs]`` and ``forces`` ``[N, 3]``, differentiable in the weights."""
        params = list(self.model.parameters())
        if self._fn is None:
            self._fn = self._build(params, positions, species, edge_index)
        atomic, forces = self._fn(params, positions.detach().requires_grad_(True), species, edge_index)
        return {"interaction_energy": scatter_sum(atomic, batch, num_graphs), "forces": forces}
