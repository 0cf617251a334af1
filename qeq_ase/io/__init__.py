"""Potential files: the versioned file format (``checkpoint``) and the shipped, named potentials
(``registry``).
"""
