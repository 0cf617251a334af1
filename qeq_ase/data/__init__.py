"""Reference data and graphs: rMD17 and extended-XYZ frames in eV/Å (``dataset``), reference
energies, the local frame of a structure, neighbour lists and batched molecular graphs.
"""
