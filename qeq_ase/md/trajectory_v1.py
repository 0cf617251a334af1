"""Reader of the first qeq-md trajectory layout (``format_version`` 1), for files written before H5MD.

That layout kept every dataset at the root of the file, in ASE units::

    /step [F] int64, /time [F] fs, /positions [F, N, 3] Å, /velocities [F, N, 3] Å/fs,
    /forces [F, N, 3] eV/Å, /potential_energy, /kinetic_energy, /total_energy [F] eV,
    /temperature [F] K, /numbers [N], /masses [N] amu, /cell [3, 3] Å
    attrs: format, format_version, pbc, n_frames, rng_state (JSON) and the run settings

``qeq-md convert old.h5 new.h5`` rewrites such a file in the current layout.
"""

from __future__ import annotations

import h5py

FORMAT_VERSION = 1

#: Per-frame datasets of the layout, named as :func:`qeq_ase.md.trajectory.read_trajectory` returns them.
FRAME_NAMES = ("step", "time", "positions", "velocities", "forces", "potential_energy", "kinetic_energy",
               "total_energy", "temperature")


def read_v1(h5: h5py.File, fields: tuple[str, ...]) -> dict:
    """The complete frames (``fields``), ``numbers``, ``masses``, ``cell`` and the root attributes."""
    n = int(h5.attrs["n_frames"])
    out = {name: h5[name][:n] for name in fields}
    for name in ("numbers", "masses", "cell"):
        out[name] = h5[name][()]
    out["attrs"] = dict(h5.attrs)
    return out
