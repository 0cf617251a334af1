"""Start structures shipped with qeq-ase: the rMD17 molecules relaxed with their own float32
potentials (extended XYZ, Å; written by ``python -m qeq_ase.tools.relax_structures``)."""
