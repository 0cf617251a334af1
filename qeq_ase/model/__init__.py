"""The equivariant network: radial basis, linear layers, the attention layer and
:class:`~qeq_ase.model.network.QEqModel` (energy, autograd forces and, for periodic cells, stress).
"""
