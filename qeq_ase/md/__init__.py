"""Running structures through a potential: the ``qeq-md`` driver, its H5MD trajectories,
batched evaluation of many structures, and the i-PI client (``qeq-ipi``).
"""
