"""Native kernels and CPU plumbing: lazy builds of the C++ kernels in ``csrc/``, the fused edge
attention and node update kernels, CPU feature detection and glibc malloc settings.
"""
