"""Shipped qeq-ase potentials (installed as the ``qeq_ase.potentials`` package data)."""
