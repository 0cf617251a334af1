"""The integrators of ``qeq-md``: one :class:`IntegratorSpec` per ensemble, registered by name.

A spec holds all that :func:`qeq_ase.md.driver.run_md` knows of an integrator: its own
settings (each a ``run_md`` keyword, a ``qeq-md`` option and a root attribute of the
trajectory, and checked on resume), how to build the ASE dynamics object, and the state the
integrator keeps beyond positions, velocities and step (JSON-serialisable, saved with every
block of frames and restored on resume). A new integrator is one :func:`register_integrator`
call:

>>> from ase.md.verlet import VelocityVerlet
>>> spec = IntegratorSpec("verlet-copy", "velocity Verlet again",
...                       build=lambda atoms, settings, rng: VelocityVerlet(atoms, settings["timestep_fs"] * units.fs))
>>> register_integrator(spec) is spec and "verlet-copy" in INTEGRATORS
True
>>> del INTEGRATORS["verlet-copy"]
>>> sorted(INTEGRATORS)
['langevin', 'nose-hoover', 'nve']
>>> INTEGRATORS["nose-hoover"].resume_checked
('temperature_K', 'tdamp_fs', 'tchain')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from ase import Atoms, units
from ase.md.md import MolecularDynamics


def check_setting(name: str, value: Any, minimum: float = 0, strict: bool = False,
                  integer: bool = False) -> float | int:
    """``value`` as a float (an int with ``integer``); ValueError naming ``name`` when it is not
    finite, not whole (``integer``) or not ``> minimum`` (``strict``) or ``>= minimum``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if integer and (isinstance(value, bool) or not number.is_integer()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not np.isfinite(number) or number < minimum or (strict and number == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return int(number) if integer else number


@dataclass(frozen=True)
class Setting:
    """A number an integrator takes: the ``run_md`` keyword ``name``, the ``qeq-md`` option
    :attr:`option` and a root attribute of the trajectory; ``default``'s type (int or float)
    is its type."""

    name: str
    default: float | int
    help: str
    minimum: float = 0
    strict: bool = False  # > minimum rather than >= minimum

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def integer(self) -> bool:
        return isinstance(self.default, int)

    def check(self, value: Any) -> float | int:
        """``value`` in this setting's type; ValueError when it is out of range."""
        return check_setting(self.name, value, self.minimum, self.strict, self.integer)


def _no_state(dyn: MolecularDynamics) -> dict:
    return {}


def _restore_nothing(dyn: MolecularDynamics, state: dict) -> None:
    pass


def _accept(settings: Mapping[str, Any]) -> None:
    pass


@dataclass(frozen=True)
class IntegratorSpec:
    """One ensemble of ``qeq-md``.

    ``build(atoms, settings, rng)`` returns the ASE dynamics object; ``settings`` holds
    ``timestep_fs``, ``temperature_K`` and this integrator's own :attr:`settings` by name, and
    ``rng`` is the run's generator (the only source of randomness an integrator may use).
    ``state(dyn)`` returns what the integrator carries from step to step besides positions,
    velocities and the RNG, as JSON-serialisable values; ``restore(dyn, state)`` puts it back
    into a freshly built one. ``validate(settings)`` raises ValueError for combinations the
    ranges of :class:`Setting` do not catch.
    """

    name: str
    description: str
    build: Callable[[Atoms, Mapping[str, Any], np.random.Generator], MolecularDynamics]
    settings: tuple[Setting, ...] = ()
    #: ``temperature_K`` is the thermostat's (checked on resume), not only that of the initial velocities.
    thermostat: bool = False
    state: Callable[[MolecularDynamics], dict] = field(default=_no_state)
    restore: Callable[[MolecularDynamics, dict], None] = field(default=_restore_nothing)
    validate: Callable[[Mapping[str, Any]], None] = field(default=_accept)

    @property
    def resume_checked(self) -> tuple[str, ...]:
        """Settings, besides those of every run, that must agree between a run and its resumption."""
        return (("temperature_K",) if self.thermostat else ()) + tuple(s.name for s in self.settings)

    def own_settings(self, given: Mapping[str, Any]) -> dict[str, float | int]:
        """This integrator's settings: ``given`` (checked) and the defaults of the others;
        ValueError for a name it does not take."""
        names = {s.name: s for s in self.settings}
        unknown = sorted(set(given) - set(names))
        if unknown:
            takes = ", ".join(names) or "no settings of its own"
            raise ValueError(f"ensemble {self.name!r} takes no {', '.join(unknown)} (it takes {takes})")
        return {name: s.check(given[name]) if name in given else s.default for name, s in names.items()}


#: Registered integrators by name (the ``ensemble`` of ``run_md`` and ``qeq-md --ensemble``).
INTEGRATORS: dict[str, IntegratorSpec] = {}


def register_integrator(spec: IntegratorSpec, replace: bool = False) -> IntegratorSpec:
    """Add ``spec`` to :data:`INTEGRATORS`. A setting named as another integrator's must be
    the same setting (the two share one ``qeq-md`` option)."""
    if spec.name in INTEGRATORS and not replace:
        raise ValueError(f"an integrator named {spec.name!r} is registered already; pass replace=True")
    known = all_settings()
    for setting in spec.settings:
        if setting.name == "temperature_K":
            raise ValueError("temperature_K is a setting of every run; set thermostat=True instead")
        if known.get(setting.name, setting) != setting:
            raise ValueError(f"setting {setting.name!r} of {spec.name!r} differs from the one of that name "
                             f"another integrator takes: {known[setting.name]}")
    INTEGRATORS[spec.name] = spec
    return spec


def get_integrator(name: str) -> IntegratorSpec:
    """The spec registered as ``name``; ValueError naming the registered ones otherwise."""
    try:
        return INTEGRATORS[name]
    except KeyError:
        raise ValueError(f"unknown ensemble {name!r}; use one of {', '.join(INTEGRATORS)}") from None


def all_settings() -> dict[str, Setting]:
    """The own settings of every registered integrator, by name."""
    return {s.name: s for spec in INTEGRATORS.values() for s in spec.settings}


def _langevin(atoms: Atoms, settings: Mapping[str, Any], rng: np.random.Generator) -> MolecularDynamics:
    from ase.md.langevin import Langevin

    return Langevin(atoms, settings["timestep_fs"] * units.fs, temperature_K=settings["temperature_K"],
                    friction=settings["friction_per_fs"] / units.fs, fixcm=False, rng=rng)


def _velocity_verlet(atoms: Atoms, settings: Mapping[str, Any], rng: np.random.Generator) -> MolecularDynamics:
    from ase.md.verlet import VelocityVerlet

    return VelocityVerlet(atoms, settings["timestep_fs"] * units.fs)


def _nose_hoover_chain(atoms: Atoms, settings: Mapping[str, Any], rng: np.random.Generator) -> MolecularDynamics:
    from ase.md.nose_hoover_chain import NoseHooverChainNVT

    # ASE's chain holds the kinetic energy of all 3N degrees of freedom at temperature_K; with
    # constraints (FixCom: 3N - 3) the free ones would run hotter by 3N / dof. Scaling the target
    # makes the temperature of the free degrees of freedom, which ASE reports, temperature_K.
    scale = atoms.get_number_of_degrees_of_freedom() / (3 * len(atoms))
    return NoseHooverChainNVT(atoms, settings["timestep_fs"] * units.fs,
                              temperature_K=settings["temperature_K"] * scale,
                              tdamp=settings["tdamp_fs"] * units.fs, tchain=settings["tchain"])


# ASE keeps the chain's positions and momenta in private attributes of its thermostat
# (ase.md.nose_hoover_chain.NoseHooverChainThermostat); the resume tests catch a rename.
_CHAIN_VARIABLES = ("_eta", "_p_eta")


def _chain_state(dyn: MolecularDynamics) -> dict:
    return {name.lstrip("_"): getattr(dyn._thermostat, name).tolist() for name in _CHAIN_VARIABLES}


def _restore_chain(dyn: MolecularDynamics, state: dict) -> None:
    for name in _CHAIN_VARIABLES:
        values = np.asarray(state[name.lstrip("_")], dtype=np.float64)
        current = getattr(dyn._thermostat, name)
        if values.shape != current.shape:
            raise ValueError(f"saved Nose-Hoover chain has {values.size} elements, this one {current.size}")
        setattr(dyn._thermostat, name, values)


def _positive_temperature(settings: Mapping[str, Any]) -> None:
    if settings["temperature_K"] <= 0:
        raise ValueError(f"nose-hoover needs temperature_K > 0, got {settings['temperature_K']}")


register_integrator(IntegratorSpec(
    "langevin", "Langevin NVT (ase.md.langevin.Langevin)", _langevin,
    settings=(Setting("friction_per_fs", 0.01, "Langevin friction, 1/fs, >= 0"),), thermostat=True))
register_integrator(IntegratorSpec("nve", "velocity Verlet NVE (ase.md.verlet.VelocityVerlet)", _velocity_verlet))
register_integrator(IntegratorSpec(
    "nose-hoover", "Nose-Hoover chain NVT (ase.md.nose_hoover_chain.NoseHooverChainNVT)", _nose_hoover_chain,
    settings=(Setting("tdamp_fs", 100.0, "Nose-Hoover damping time, fs, > 0", strict=True),
              Setting("tchain", 3, "Nose-Hoover chain length, >= 1", minimum=1)),
    thermostat=True, state=_chain_state, restore=_restore_chain, validate=_positive_temperature))
