"""The in-memory record of one labelled structure, and its conversion to/from ``ase.Atoms``.

Why a separate ``Frame`` type instead of passing ``ase.Atoms`` around: an ``Atoms`` object hides
its labels in a calculator, its total charge and spin in a free-form ``info`` dict, and silently
accepts NaN coordinates. Training code needs all of these explicit, typed and checked once, at
the boundary where data enters the package. Everything downstream can then trust a ``Frame``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator


@dataclass
class Frame:
    """One structure with its reference labels (eV, Å) and electronic state.

    ``charge`` is the total charge in units of e and ``spin`` the spin multiplicity 2S+1,
    the convention OMol25 uses, so both can be fed to the model as global conditions.
    ``source`` is a free provenance label (e.g. ``"g2:CH4@300K"``) used for grouped splits
    and for per-subset error reports.
    """

    numbers: np.ndarray
    positions: np.ndarray
    energy: float | None
    forces: np.ndarray | None
    charge: int = 0
    spin: int = 1
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    source: str = ""

    def __len__(self) -> int:
        return int(len(self.numbers))


def _as_int(value, name: str) -> int:
    """Charges/multiplicities arrive as numpy scalars or floats (``0.0``); accept only integers."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not np.isfinite(as_float) or as_float != round(as_float):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(round(as_float))


def _first_bad_row(array: np.ndarray) -> int:
    """Index of the first atom (row) holding a NaN or inf."""
    return int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])


def _convert(atoms: Atoms, default_charge: int, default_spin: int) -> tuple[Frame, list[str]]:
    """Build a validated Frame and report which of charge/spin fell back to defaults.

    Split out of :func:`frame_from_atoms` so that readers can warn once per file rather than
    once per frame.
    """
    numbers = np.asarray(atoms.numbers, dtype=np.int64).copy()
    if len(numbers) == 0:
        raise ValueError("empty structure (0 atoms)")
    positions = np.asarray(atoms.positions, dtype=np.float64).copy()
    if not np.isfinite(positions).all():
        raise ValueError(f"non-finite position (NaN/inf) at atom index {_first_bad_row(positions)}")

    energy = forces = None
    results = getattr(atoms.calc, "results", None) or {}
    if results.get("energy") is not None:
        energy = float(np.asarray(results["energy"]).reshape(()))
        if not np.isfinite(energy):
            raise ValueError(f"non-finite energy {energy}")
    if results.get("forces") is not None:
        forces = np.asarray(results["forces"], dtype=np.float64).copy()
        if forces.shape != positions.shape:
            raise ValueError(f"forces have shape {forces.shape}, expected {positions.shape}")
        if not np.isfinite(forces).all():
            raise ValueError(f"non-finite force (NaN/inf) at atom index {_first_bad_row(forces)}")

    info = atoms.info
    missing = [key for key in ("charge", "spin") if info.get(key) is None]
    charge = _as_int(info["charge"], "charge") if "charge" not in missing else int(default_charge)
    spin = _as_int(info["spin"], "spin") if "spin" not in missing else int(default_spin)
    if spin < 1:
        raise ValueError(f"spin is the multiplicity 2S+1 and must be >= 1, got {spin}")

    frame = Frame(
        numbers=numbers,
        positions=positions,
        energy=energy,
        forces=forces,
        charge=charge,
        spin=spin,
        cell=np.asarray(atoms.cell.array, dtype=np.float64).copy(),
        pbc=np.asarray(atoms.pbc, dtype=bool).copy(),
        source=str(info.get("source", "") or ""),
    )
    return frame, missing


def frame_from_atoms(atoms: Atoms, default_charge: int = 0, default_spin: int = 1) -> Frame:
    """Convert ``atoms`` into a validated :class:`Frame`.

    Energy/forces come from ``atoms.calc.results`` (no calculation is triggered); charge and
    multiplicity from ``atoms.info["charge"]`` / ``atoms.info["spin"]``. A missing charge or
    spin is not an error (most public data sets are neutral singlets) but it is an assumption,
    so it is announced with a single warning.
    """
    frame, missing = _convert(atoms, default_charge, default_spin)
    if missing:
        warnings.warn(
            f"structure has no {' / '.join(missing)} in atoms.info; using defaults "
            f"charge={default_charge}, spin={default_spin}",
            stacklevel=2,
        )
    return frame


def frame_to_atoms(frame: Frame) -> Atoms:
    """Inverse of :func:`frame_from_atoms`: labels go into a ``SinglePointCalculator``."""
    atoms = Atoms(
        numbers=np.asarray(frame.numbers),
        positions=np.asarray(frame.positions, dtype=np.float64),
        cell=np.asarray(frame.cell, dtype=np.float64),
        pbc=np.asarray(frame.pbc, dtype=bool),
    )
    atoms.info["charge"] = int(frame.charge)
    atoms.info["spin"] = int(frame.spin)
    atoms.info["source"] = str(frame.source)
    results = {}
    if frame.energy is not None:
        results["energy"] = float(frame.energy)
    if frame.forces is not None:
        results["forces"] = np.asarray(frame.forces, dtype=np.float64)
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms
