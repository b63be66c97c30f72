"""Reference data from GFN2-xTB: Langevin MD sampling of recipe systems, labelled by xTB.

Why MD sampling rather than random displacements: a potential used for production MD must be
accurate on the configurations MD visits, including the anharmonic, hot ones. Running short
xTB Langevin trajectories at 300-1000 K gives thermally distributed geometries for free.

Why re-label each sampled frame with a fresh calculator: the MD calculator restarts each SCF
from the previous step's wavefunction, so its numbers depend slightly on trajectory history.
A fresh, tighter-converged single point makes every label reproducible from the geometry
alone, which is what the finite-difference check in the tests relies on.

Determinism: each (system, temperature) trajectory owns a numpy Generator seeded by
``(seed, task index)``, and xTB runs on one OpenMP thread (threaded reductions in tblite
change energies at the 1e-11 eV level from run to run, which MD then amplifies). So a given
``(recipe, n, seed)`` always yields the same file, bit for bit. For molecules this small one
thread is also no slower.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.optimize import BFGS
from tqdm.auto import tqdm

from .frames import Frame
from .readers import _XYZ_SUFFIXES, _check_parent, write_frames
from .recipes import System, get_recipe, system_kind

log = logging.getLogger(__name__)

XTB_METHOD = "GFN2-xTB"
TEMPERATURES_K = (300.0, 500.0, 700.0, 1000.0)
#: tblite's default accuracy (1.0) leaves force errors ~1e-4 eV/Å; 0.1 costs about the same.
LABEL_ACCURACY = 0.1
RELAX_FMAX = 0.05  # eV/Å; "relaxed-ish" is enough, MD equilibration does the rest
RELAX_STEPS = 60


class GenerationError(RuntimeError):
    """xTB failed so often for one trajectory that sampling was abandoned."""


def xtb_calculator(charge: int, mult: int, accuracy: float = 1.0):
    """A quiet GFN2-xTB calculator for the given total charge and multiplicity."""
    from tblite.ase import TBLite  # imported lazily: only data generation needs tblite

    return TBLite(
        method=XTB_METHOD, charge=charge, multiplicity=mult, accuracy=accuracy, verbosity=0
    )


def xtb_label(positions: np.ndarray, system: System, source: str) -> Frame | None:
    """Energy and forces of one geometry from a fresh xTB single point, or None on failure."""
    atoms = Atoms(system.atoms.numbers, positions=np.array(positions, dtype=np.float64))
    atoms.calc = xtb_calculator(system.charge, system.mult, LABEL_ACCURACY)
    try:
        energy = float(atoms.get_potential_energy())
        forces = np.array(atoms.get_forces(), dtype=np.float64)
    except RuntimeError:  # ase CalculationFailed/InputError: SCF not converged, bad geometry
        return None
    if not (np.isfinite(energy) and np.isfinite(forces).all()):
        return None
    return Frame(
        numbers=np.asarray(atoms.numbers, dtype=np.int64),
        positions=np.array(atoms.positions),
        energy=energy,
        forces=forces,
        charge=int(system.charge),
        spin=int(system.mult),
        source=source,
    )


@contextlib.contextmanager
def _single_openmp_thread():
    """Run tblite on one OpenMP thread inside the block (see module docstring for why).

    tblite links the system GNU OpenMP runtime; setting its thread count through ctypes works
    after import, unlike ``OMP_NUM_THREADS``. Elsewhere this quietly does nothing.
    """
    try:
        import tblite.ase  # noqa: F401  - loads libtblite and with it libgomp

        gomp = ctypes.CDLL("libgomp.so.1")
        previous = int(gomp.omp_get_max_threads())
    except (ImportError, OSError, AttributeError):
        yield
        return
    gomp.omp_set_num_threads(1)
    try:
        yield
    finally:
        gomp.omp_set_num_threads(previous)


def _relax(system: System) -> Atoms:
    """Short BFGS relaxation with xTB; falls back to the input geometry if xTB fails."""
    atoms = Atoms(system.atoms.numbers, positions=system.atoms.positions.copy())
    atoms.calc = xtb_calculator(system.charge, system.mult)
    try:
        BFGS(atoms, logfile=None, maxstep=0.2).run(fmax=RELAX_FMAX, steps=RELAX_STEPS)
    except RuntimeError:
        log.warning("xTB relaxation of %s failed; starting MD from the built geometry", system.label)
        return Atoms(system.atoms.numbers, positions=system.atoms.positions.copy())
    return Atoms(atoms.numbers, positions=atoms.positions.copy())


def _interleave_by_kind(systems: Sequence[System]) -> list[System]:
    """Round-robin over kinds (g2, water, ion, ...) so the first few systems span all kinds."""
    by_kind: dict[str, list[System]] = {}
    for system in systems:
        by_kind.setdefault(system_kind(system.label), []).append(system)
    queues = list(by_kind.values())
    ordered = []
    for i in range(max(map(len, queues), default=0)):
        ordered += [queue[i] for queue in queues if i < len(queue)]
    return ordered


def plan_tasks(
    n_systems: int, temperatures: Sequence[float], n: int
) -> list[tuple[int, int, float, int]]:
    """Distribute ``n`` frames over (system, temperature) trajectories.

    Returns ``(task_id, system_index, temperature, count)`` for tasks with ``count > 0``.
    Task ``j`` uses system ``j % S`` and a temperature that shifts by one per system, so the
    first ``S`` tasks visit every system once with temperatures rotating; any ``n`` therefore
    spreads evenly over systems first, then temperatures.
    """
    n_t = len(temperatures)
    n_tasks = n_systems * n_t
    tasks = []
    for j in range(min(n, n_tasks)):
        s = j % n_systems
        temperature = temperatures[(s + j // n_systems) % n_t]
        count = n // n_tasks + (1 if j < n % n_tasks else 0)
        tasks.append((j, s, float(temperature), count))
    return tasks


def _sample_trajectory(
    start: Atoms,
    system: System,
    temperature: float,
    count: int,
    rng: np.random.Generator,
    source: str,
    *,
    stride: int,
    equil_steps: int,
    timestep_fs: float,
    friction_per_fs: float,
    on_frame: Callable[[], None],
) -> tuple[list[Frame], int]:
    """Run Langevin MD with xTB forces and label ``count`` frames taken every ``stride`` steps.

    A frame whose label fails is dropped and MD simply continues to the next stride; if xTB
    fails inside the MD itself the trajectory restarts from ``start``. Returns the frames and
    the number of failures.
    """
    frames: list[Frame] = []
    failures = 0
    max_failures = 5 * count + 5
    while len(frames) < count:
        atoms = start.copy()
        atoms.set_constraint(FixCom())  # ASE's recommended replacement for Langevin(fixcm=True)
        atoms.calc = xtb_calculator(system.charge, system.mult)
        thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
        Stationary(atoms)
        dyn = Langevin(
            atoms,
            timestep=timestep_fs * units.fs,
            temperature_K=temperature,
            friction=friction_per_fs / units.fs,
            fixcm=False,
            rng=rng,
        )
        try:
            dyn.run(equil_steps)
            while len(frames) < count:
                dyn.run(stride)
                frame = xtb_label(atoms.positions, system, source)
                if frame is None:
                    failures += 1
                    if failures > max_failures:
                        break
                    continue
                frames.append(frame)
                on_frame()
        except RuntimeError:  # xTB failed during MD: restart the trajectory
            failures += 1
        if failures > max_failures:
            raise GenerationError(
                f"{source}: xTB failed {failures} times; giving up on this trajectory"
            )
    return frames, failures


def generate(
    recipe: str | Callable[[int], list[System]],
    n: int,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    *,
    temperatures: Sequence[float] = TEMPERATURES_K,
    stride: int = 10,
    equil_steps: int = 20,
    timestep_fs: float = 0.5,
    friction_per_fs: float = 0.01,
) -> list[Frame]:
    """Generate ``n`` xTB-labelled configurations from ``recipe`` and write them to ``out``.

    ``recipe`` is a registered name (see :data:`transip_md.data.recipes.RECIPES`) or a
    callable ``seed -> list[System]``. Frames are returned in trajectory order; ``out`` (an
    .extxyz path) is written atomically, and checked before any expensive work starts.
    Sources read like ``"g2:CH3OH@500K"``, ``"water5@300K"``, ``"ion:OH-@700K"``.
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    n = int(n)
    if not temperatures or any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be positive, got {list(temperatures)}")
    if stride < 1 or equil_steps < 0:
        raise ValueError("stride must be >= 1 and equil_steps >= 0")
    if out is not None:
        out = Path(out)
        if out.suffix.lower() not in _XYZ_SUFFIXES:
            raise ValueError(f"output must be .extxyz or .xyz, got {out}")
        _check_parent(out)

    recipe_fn = get_recipe(recipe) if isinstance(recipe, str) else recipe
    name = recipe if isinstance(recipe, str) else getattr(recipe, "__name__", "recipe")
    systems = _interleave_by_kind(recipe_fn(seed))
    if not systems:
        raise ValueError(f"recipe {name!r} produced no systems")

    relaxed: dict[int, Atoms] = {}
    frames: list[Frame] = []
    failures = 0
    bar = tqdm(total=n, desc=f"xTB {name}", unit="frame", disable=not progress)
    with bar, _single_openmp_thread():
        for task_id, s, temperature, count in plan_tasks(len(systems), temperatures, n):
            system = systems[s]
            if s not in relaxed:
                relaxed[s] = _relax(system)
            rng = np.random.default_rng([seed, task_id])
            source = f"{system.label}@{temperature:g}K"
            new, n_failed = _sample_trajectory(
                relaxed[s],
                system,
                temperature,
                count,
                rng,
                source,
                stride=stride,
                equil_steps=equil_steps,
                timestep_fs=timestep_fs,
                friction_per_fs=friction_per_fs,
                on_frame=lambda: bar.update(1),
            )
            frames += new
            failures += n_failed
    if failures:
        log.warning("%d xTB evaluations failed or gave non-finite forces and were re-sampled", failures)
    if out is not None:
        write_frames(frames, out)
    return frames
