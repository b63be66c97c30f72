"""Total-energy conservation (NVE, velocity Verlet, 0.5 fs) of the shipped model in ASE, OpenMM
and LAMMPS, for its float64 and float32 exports.

  python benchmarks/nve_drift.py                       # water64, 50 ps per engine and dtype (hours on CPU)
  python benchmarks/nve_drift.py --ps 1 --out runs/nve # a quick check
  python benchmarks/nve_drift.py --engines lammps --dtypes float64
  python benchmarks/nve_drift.py --system ethanol --ps 50 --nvt-ps 5 --out runs/nve_ethanol_50ps

On the GPU (issue #18; ``benchmarks/long_runs.sh`` starts these side by side on one H200)::

  python benchmarks/nve_drift.py --engines openmm --openmm-platform CUDA --cuda-graphs \
      --dtypes float64 --model m64.pt --nvt-ps 5 --ps 50 --sample-fs 10 --budget-s 940 --out R
  python benchmarks/nve_drift.py --engines lammps --lammps-device cuda ...   # pair_style ... device cuda
  python benchmarks/nve_drift.py --engines ase --ase-device cuda ...

``--openmm-platform CUDA`` uses Precision ``double`` for a float64 model (else TorchForce gets
float32 positions) and ``mixed`` for float32 (``--openmm-precision`` to choose). ``--budget-s``:
the run stops its NVE part when the process's wall budget is spent, records
``stopped_by_budget`` and the ps reached (LAMMPS: ``timer timeout``), and every 30 s rewrites
``nve_drift.json`` with the run so far (``partial``), so that a collect step can read it. Each
result also carries the block-average drift fit of ``benchmarks/analyse_long_runs.py``
(``drift_block_ev_per_atom_per_ps`` +- ``drift_sigma_ev_per_atom_per_ps``).

``--system`` (all three engines; ``waterN`` for N waters, e.g. ``water512`` = 1,536 atoms):

* ``water64`` (default): the periodic box of 64 waters (``transip_md.systems.water_box(64,
  seed=7)``, 192 atoms, 1 g/cm^3); LAMMPS ``boundary p p p``.
* ``ethanol``: one ``ase.build.molecule("CH3CH2OH")`` (9 atoms), neutral singlet, in vacuum: ASE
  with ``pbc`` False, OpenMM without a periodic box, LAMMPS ``boundary s s s`` (shrink-wrapped,
  no images; data file in a 40 Å cube) with ``pair_style transip charge 0 multiplicity 1``, as in
  ``lammps_examples/in.molecule``. Net momentum *and* rotation are removed at the start and again
  after the thermostat (ASE ``Stationary``/``ZeroRotation``; OpenMM: the same projection on
  the Context's velocities; LAMMPS ``velocity ... mom yes rot yes`` and ``velocity all zero
  linear/angular``), and temperatures are over 3N - 6 degrees of freedom (3N - 3 for water).
  The model is not rotation-invariant by construction (learned equivariance), so the angular
  momentum is only approximately conserved afterwards; the total energy is (forces are -dE/dx).

Each run starts from 300 K velocities, equilibrates with a thermostat for ``--nvt-ps`` (ASE
Langevin with ``FixCom``, OpenMM LangevinMiddle, LAMMPS Nosé-Hoover), then runs NVE for ``--ps``:

* ASE: ``VelocityVerlet`` + ``TransIPCalculator``;
* OpenMM: ``VerletIntegrator`` on the CPU platform, ``TorchForce`` from ``transip_openmm``;
* LAMMPS: ``fix nve``, one rank (no mpirun), ``pair_style transip`` plugin.

**Shared start** (issue #18's GPU runs, ``benchmarks/long_runs.sh``)::

  python benchmarks/nve_drift.py --engines openmm --openmm-platform CUDA --cuda-graphs \
      --dtypes float64 --nvt-ps 5 --write-state state.extxyz     # thermalise once, write the state
  python benchmarks/nve_drift.py --start-state state.extxyz --engines lammps ...  # NVE from it

``--write-state`` runs only the NVT (OpenMM Langevin) and writes positions and velocities
(extended XYZ, atomically, never over an existing file); ``--start-state`` makes every engine
start its NVE from them, without a thermostat of its own, so that drifts of different engines
start from one state. ASE and LAMMPS then begin with the same total energy (to LAMMPS' 5.5e-8
force-to-acceleration constant, ``tests/test_shared_start.py``). OpenMM's first total energy
differs (0.1 eV for the 192-atom box): its VerletIntegrator is a leapfrog, so it takes the velocities as
those of half a step earlier and reports the kinetic energy at the step from them; the drift
is not affected. ``--ase-cuda-graphs``: ``TransIPCalculator(cuda_graphs=True)``.

``--threads`` (default 1) limits every engine to that many CPU threads: ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` (set before torch is imported, and passed to the LAMMPS process),
``torch.set_num_threads`` and the OpenMM CPU platform's ``Threads``.

Measured from E_total(t) sampled every ``--sample-fs``: the drift (slope of a linear fit,
eV/atom/ps) and the fluctuation (standard deviation around the fit, eV/atom). Goals for 50 ps
runs: |drift| <= 1e-6 eV/atom/ps in float64 and <= 1e-4 in float32. Writes ``OUT/nve_drift.json``
(summary, time series of E_total and T; rewritten after every run) and ``OUT/nve_drift.png``
(E_total(t) - E_0 per engine, one panel per dtype, with a ~1 ps running mean and the linear fit)
and prints a table.

Long runs (``benchmarks/results/nve_drift_50ps_ethanol_cpu.{json,png}``): ethanol, 5 ps NVT +
50 ps NVE (100,000 steps) per engine and dtype, ``--threads 1``, one run after another on the
2-core development CPU (shared with other jobs); ~5-10 min of NVE per run (160-370 steps/s).
The 192-atom water box is too slow on this machine for 50 ps (see nve_drift_2ps_cpu.json).

  engine  dtype    drift eV/atom/ps  fluctuation eV/atom  <T> K
  ase     float64        2.1e-09          9.3e-05           406
  openmm  float64       -3.9e-07          7.3e-05           312
  lammps  float64        2.5e-07          1.2e-04           416
  ase     float32       -3.5e-07          9.9e-05           384
  openmm  float32       -4.0e-09          7.5e-05           296
  lammps  float32       -2.1e-06          1.0e-04           355

All six meet the goals. The resolution of the drift over 50 ps is about +-2e-7 eV/atom/ps (a
fit to 1 ps block means), so the float64 drifts are consistent with zero; only LAMMPS float32
(-2.1e-6 +- 0.2e-6) is a resolved drift, 50x below its goal. The fluctuation (~1e-4 eV/atom,
i.e. ~1 meV for the molecule) is the usual O(dt^2) Verlet oscillation, not a trend. <T> differs
between engines because a 9-atom NVE trajectory keeps the one total energy it had after the
thermostat (canonical spread of that energy ~ +-20 %); T shows no trend within any run.
The ASE and OpenMM float32 runs were repeated in a second invocation (the first attempt hit a
model-file format change made in the working tree meanwhile); the JSON's ``note`` says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from transip_md.md_analysis import energy_drift

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyse_long_runs import block_drift  # noqa: E402  (the long-run fit, benchmarks/)

DT_FS = 0.5
TEMPERATURE_K = 300.0
ENGINES = ("ase", "openmm", "lammps")
DTYPES = ("float64", "float32")
SYSTEMS = ("water64", "ethanol")  # and waterN for any N: water_box(N, seed=7), e.g. water512
FLUSH_S = 30.0  # partial results are written at least this often (long runs, see --budget-s)
GOALS = {"float64": 1e-6, "float32": 1e-4}  # |drift| eV/atom/ps for long runs
VACUUM_BOX_A = 40.0  # cubic cell the molecule is centred in (written to LAMMPS' data file only)


def water64():
    return water(64)


def water(n_molecules: int):
    from transip_md.systems import water_box

    return water_box(n_molecules, seed=7)


def water_molecules(name: str) -> Optional[int]:
    """N of a ``waterN`` system name (None for other names)."""
    match = re.fullmatch(r"water(\d+)", name)
    return int(match.group(1)) if match and int(match.group(1)) > 0 else None


def build_system(name: str):
    """The ``--system``: ``water64`` (periodic, 192 atoms), ``waterN`` (N molecules, e.g.
    ``water512``: 1,536 atoms) or ``ethanol`` (vacuum, 9 atoms)."""
    if water_molecules(name):
        return water(water_molecules(name))
    if name == "ethanol":
        from ase.build import molecule

        atoms = molecule("CH3CH2OH")  # ASE's G2 geometry, pbc False
        atoms.pbc = False
        atoms.info["charge"] = 0  # neutral singlet
        atoms.info["spin"] = 1
        return atoms
    raise ValueError(f"unknown system {name!r}")


def system_label(name: str, atoms) -> str:
    kind = "periodic" if atoms.pbc.any() else "vacuum"
    return f"{name} {kind} ({len(atoms)} atoms)"


def kinetic_dof(atoms) -> int:
    """Degrees of freedom for the temperature: centre-of-mass motion is removed in every engine,
    and for a molecule in vacuum also the overall rotation (3N - 6)."""
    return 3 * len(atoms) - (3 if atoms.pbc.any() else 6)


def zero_momentum(masses, positions, velocities, rotation: bool):
    """``velocities`` with the centre-of-mass velocity and (``rotation``) the rigid-body angular
    velocity about the centre of mass removed (numpy arrays, any consistent units)."""
    m = np.asarray(masses, dtype=np.float64)[:, None]
    v = np.asarray(velocities, dtype=np.float64)
    v = v - (m * v).sum(0) / m.sum()
    if rotation:
        r = np.asarray(positions, dtype=np.float64)
        r = r - (m * r).sum(0) / m.sum()
        ang = (m * np.cross(r, v)).sum(0)
        inertia = (m[:, 0, None, None] * ((r * r).sum(1)[:, None, None] * np.eye(3)
                                          - r[:, :, None] * r[:, None, :])).sum(0)
        v = v - np.cross(np.linalg.solve(inertia, ang), r)
    return v


# ----------------------------------------------------------------------------- shared start
# A state thermalised once (``--write-state``: OpenMM's Langevin NVT, the fastest engine on a
# GPU) and read by every engine's NVE run (``--start-state``): the engines' drifts then come
# from the same initial condition, and no engine's own thermostat (LAMMPS: Nose-Hoover) can
# leave a slow relaxation that the drift fit would take for non-conservation.
def write_start_state(path: Path, atoms, nvt_ps: float, engine: str, seed: int) -> None:
    """``atoms`` (positions, velocities, cell) as extended XYZ, atomically, never over a file
    this script did not write (``transip_md.atomic_io``)."""
    from ase.io import write

    from transip_md.atomic_io import atomic_output

    atoms = atoms.copy()
    atoms.info.update(nvt_ps=float(nvt_ps), thermalised_by=engine, seed=int(seed),
                      temperature_k=TEMPERATURE_K)
    if atoms.pbc.all():
        atoms.wrap()  # periodic images are the same state; LAMMPS' data file wants atoms inside
    with atomic_output(path) as tmp:
        write(tmp, atoms, format="extxyz")


def read_start_state(path: Path, system_name: str):
    """The state of ``--start-state``, checked against ``--system`` (same atoms, same cell)."""
    from ase.io import read

    atoms = read(str(path), format="extxyz")
    expected = build_system(system_name)
    if len(atoms) != len(expected) or (atoms.numbers != expected.numbers).any():
        raise ValueError(f"--start-state {path}: {len(atoms)} atoms, not the {len(expected)} "
                         f"atoms of --system {system_name}")
    if np.abs(atoms.cell.array - expected.cell.array).max() > 1e-6 or (atoms.pbc != expected.pbc).any():
        raise ValueError(f"--start-state {path}: its cell/pbc differ from --system {system_name}")
    if atoms.get_momenta().any() == 0:
        raise ValueError(f"--start-state {path} has no velocities (momenta)")
    atoms.info.setdefault("charge", expected.info.get("charge", 0))
    atoms.info.setdefault("spin", expected.info.get("spin", 1))
    return atoms


class Clock:
    """Wall-clock budget and partial-result writer shared by the engines' NVE loops:
    ``expired()`` once the process's budget is spent (the run then stops and reports the ps
    reached), ``due()`` every FLUSH_S seconds (the loop then hands a partial record to
    ``progress`` so that a collect step can read a run that is still going)."""

    def __init__(self, deadline: Optional[float] = None, progress=None, flush_s: float = FLUSH_S):
        self.deadline, self.progress, self.flush_s = deadline, progress, flush_s
        self._last = time.perf_counter()

    def expired(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def remaining(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - time.perf_counter()

    def maybe_flush(self, make_record) -> None:
        if self.progress is not None and time.perf_counter() - self._last >= self.flush_s:
            self.progress(make_record())
            self._last = time.perf_counter()


def nve_record(engine: str, system_name: str, atoms, steps: int, nvt_steps: int, done: int,
               seconds: float, times, totals, temps, stopped: bool) -> Dict:
    return {"engine": engine, "system": system_label(system_name, atoms), "n_atoms": len(atoms),
            "steps": steps, "steps_done": done, "nvt_steps": nvt_steps, "seconds": seconds,
            "stopped_by_budget": stopped, "times_ps": list(times), "total_energy_ev": list(totals),
            "temperature_k": list(temps),
            "mean_temperature_k": float(np.mean(temps)) if len(temps) else float("nan")}


# ----------------------------------------------------------------------------- ASE
def run_ase(model: Path, ps: float, nvt_ps: float, sample_every: int, seed: int,
            system_name: str, device: str = "cpu", clock: Optional[Clock] = None,
            start=None, cuda_graphs: bool = False) -> Dict:
    from ase import units
    from ase.constraints import FixCom
    from ase.md import velocitydistribution as vd
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    from transip_md.calculator import TransIPCalculator

    atoms = build_system(system_name) if start is None else start.copy()
    molecule = not atoms.pbc.any()
    atoms.calc = TransIPCalculator(str(model), device=device, cuda_graphs=cuda_graphs)
    rng = np.random.default_rng(seed)
    if start is not None:  # the shared thermalised state: its velocities, no thermostat here
        vd.Stationary(atoms, preserve_temperature=False)
        nvt_ps = 0.0
    elif hasattr(vd, "thermalize_momenta"):
        vd.thermalize_momenta(atoms, TEMPERATURE_K, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=TEMPERATURE_K, rng=rng)
    if start is None:
        vd.Stationary(atoms)
    if molecule:
        vd.ZeroRotation(atoms, preserve_temperature=start is None)
    nvt_steps = int(round(nvt_ps * 1000 / DT_FS))
    if nvt_steps:  # centre of mass held at rest by FixCom (ASE >= 3.28 deprecates fixcm=True)
        atoms.set_constraint(FixCom())
        Langevin(atoms, DT_FS * units.fs, temperature_K=TEMPERATURE_K, friction=0.01 / units.fs,
                 fixcm=False, rng=rng).run(nvt_steps)
        atoms.set_constraint()
    if molecule:  # the Langevin noise spins the molecule up; start NVE without rotation
        vd.Stationary(atoms, preserve_temperature=False)
        vd.ZeroRotation(atoms, preserve_temperature=False)
    steps = int(round(ps * 1000 / DT_FS))
    dyn = VelocityVerlet(atoms, DT_FS * units.fs)
    dof = kinetic_dof(atoms)
    times, totals, temps = [], [], []

    def sample():
        ke = atoms.get_kinetic_energy()
        times.append(dyn.nsteps * DT_FS / 1000.0)
        totals.append(atoms.get_potential_energy() + ke)
        temps.append(2 * ke / (dof * units.kB))

    clock = clock or Clock()
    t0 = time.perf_counter()

    def record():
        r = nve_record("ase", system_name, atoms, steps, nvt_steps, dyn.nsteps,
                       time.perf_counter() - t0, times, totals, temps, stopped)
        r.update(cuda_graphs=cuda_graphs)
        return r

    stopped = False
    sample()
    while dyn.nsteps < steps:  # run() continues from dyn.nsteps (ASE >= 3.23)
        dyn.run(min(sample_every, steps - dyn.nsteps))
        sample()
        if clock.expired():
            stopped = True
            break
        clock.maybe_flush(record)
    return record()


# ----------------------------------------------------------------------------- OpenMM
def openmm_properties(platform: str, dtype: str, threads: int, precision: str = "auto") -> Dict[str, str]:
    """Platform properties: CPU threads; on CUDA the precision (auto: double for a float64
    model, which else would get float32 positions; mixed for float32, i.e. float32 forces with
    the integration in double, OpenMM's usual choice for energy conservation)."""
    if platform == "CPU":
        return {"Threads": str(threads)}
    if platform in ("CUDA", "OpenCL"):
        if precision == "auto":
            precision = "double" if dtype == "float64" else "mixed"
        return {"Precision": precision}
    return {}


def run_openmm(model: Path, ps: float, nvt_ps: float, sample_every: int, seed: int,
               system_name: str, threads: int, platform_name: str = "CPU", cuda_graphs: bool = False,
               precision: str = "auto", dtype: str = "float64", clock: Optional[Clock] = None,
               start=None, write_state: Optional[Path] = None) -> Dict:
    """NVE in OpenMM; ``start``: begin from that state (no thermostat here); ``write_state``:
    stop after the NVT and write its end state there (the shared start of the other runs)."""
    import openmm
    import openmm.unit as u

    from transip_md.units import ANGSTROM_PER_NM, ASE_VELOCITY_PER_NM_PER_PS, KJ_PER_MOL_PER_EV
    from transip_openmm import make_torch_force, topology_from_ase

    atoms = build_system(system_name) if start is None else start.copy()
    ase_per_openmm_velocity = ASE_VELOCITY_PER_NM_PER_PS
    periodic = bool(atoms.pbc.any())
    topology, positions = topology_from_ase(atoms)
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass)
    if periodic:
        box = [openmm.Vec3(*(row / 10.0)) for row in np.asarray(atoms.cell)] * u.nanometer
        system.setDefaultPeriodicBoxVectors(*box)
    # cuda_graphs: the static-shape path (cell list sized from this box; NVT keeps the volume)
    system.addForce(make_torch_force(str(model), topology, charge=0, multiplicity=1,
                                     cuda_graphs=cuda_graphs))
    system.addForce(openmm.CMMotionRemover())  # Verlet conserves total momentum anyway
    platform = openmm.Platform.getPlatformByName(platform_name)
    props = openmm_properties(platform_name, dtype, threads, precision)
    masses = np.array([system.getParticleMass(i).value_in_unit(u.dalton)
                       for i in range(system.getNumParticles())])

    def zero(context):  # centre-of-mass velocity, and rotation for a molecule in vacuum
        st = context.getState(getPositions=True, getVelocities=True)
        v = zero_momentum(masses, st.getPositions(asNumpy=True).value_in_unit(u.nanometer),
                          st.getVelocities(asNumpy=True).value_in_unit(u.nanometer / u.picosecond),
                          rotation=not periodic)
        context.setVelocities(v * (u.nanometer / u.picosecond))

    nvt_steps = 0 if start is not None else int(round(nvt_ps * 1000 / DT_FS))
    langevin = openmm.LangevinMiddleIntegrator(TEMPERATURE_K * u.kelvin, 10.0 / u.picosecond,
                                               DT_FS * u.femtosecond)
    langevin.setRandomNumberSeed(seed)
    context = openmm.Context(system, langevin, platform, props)
    context.setPositions(positions)
    if start is not None:
        context.setVelocities(start.get_velocities() / ase_per_openmm_velocity
                              * (u.nanometer / u.picosecond))
    else:
        context.setVelocitiesToTemperature(TEMPERATURE_K * u.kelvin, seed)
    zero(context)
    if nvt_steps:
        langevin.step(nvt_steps)
    zero(context)
    state = context.getState(getPositions=True, getVelocities=True)
    del context
    if write_state is not None:
        end = atoms.copy()
        end.positions = state.getPositions(asNumpy=True).value_in_unit(u.nanometer) * ANGSTROM_PER_NM
        end.set_velocities(state.getVelocities(asNumpy=True).value_in_unit(u.nanometer / u.picosecond)
                           * ase_per_openmm_velocity)
        write_state_path = Path(write_state)
        write_start_state(write_state_path, end, nvt_ps, f"openmm-{platform_name}", seed)
        return {"engine": "openmm", "wrote_state": str(write_state_path), "nvt_steps": nvt_steps}

    verlet = openmm.VerletIntegrator(DT_FS * u.femtosecond)
    context = openmm.Context(system, verlet, platform, props)
    if periodic:
        context.setPeriodicBoxVectors(*state.getPeriodicBoxVectors())
    context.setPositions(state.getPositions())
    context.setVelocities(state.getVelocities())
    steps = int(round(ps * 1000 / DT_FS))
    dof = kinetic_dof(atoms)
    kb = u.MOLAR_GAS_CONSTANT_R.value_in_unit(u.kilojoule_per_mole / u.kelvin)
    times, totals, temps = [], [], []
    clock = clock or Clock()
    start = time.perf_counter()
    done, stopped = 0, False

    def record():
        r = nve_record("openmm", system_name, atoms, steps, nvt_steps, done,
                       time.perf_counter() - start, times, totals, temps, stopped)
        r.update(platform=platform_name, cuda_graphs=cuda_graphs, openmm_properties=props)
        return r

    while True:
        s = context.getState(getEnergy=True)
        ke = s.getKineticEnergy().value_in_unit(u.kilojoule_per_mole)
        pe = s.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
        times.append(done * DT_FS / 1000.0)
        totals.append((ke + pe) / KJ_PER_MOL_PER_EV)
        temps.append(2 * ke / (dof * kb))
        if not np.isfinite(totals[-1]):
            raise RuntimeError(f"OpenMM: non-finite total energy at NVE step {done}")
        if done >= steps:
            break
        if clock.expired():
            stopped = True
            break
        clock.maybe_flush(record)
        n = min(sample_every, steps - done)
        verlet.step(n)
        done += n
    return record()


# ----------------------------------------------------------------------------- LAMMPS
# water64: periodic box, velocities without net momentum. ethanol: like lammps_examples/in.molecule,
# shrink-wrapped non-periodic box (no images), explicit charge/multiplicity, velocities without net
# momentum or rotation (also zeroed again after the thermostat), temperature over 3N - 6 dof.
LAMMPS_DECK = """\
{timeout}units           metal
atom_style      atomic
boundary        {boundary}
read_data       {data}
plugin          load {plugin}
pair_style      transip{pair_args}
pair_coeff      * * {model} {elements}
neighbor        1.0 bin
neigh_modify    every 1 delay 0 check yes
timestep        {dt_ps}
{velocity}{temp_dof}thermo_style    custom step time temp pe ke etotal
thermo_modify   norm no format float %.12f flush yes
{nvt}{zero_after_nvt}reset_timestep  0
fix             nve all nve
thermo          {every}
print           "NVE_START"
run             {steps}
"""


def parse_nve_log(text: str) -> Tuple[np.ndarray, Optional[float]]:
    """Thermo rows (step time temp pe ke etotal) after NVE_START and the NVE loop time (None
    while the run is going). Works on a log that LAMMPS is still writing."""
    if "NVE_START" not in text:
        return np.zeros((0, 6)), None
    nve = text.split("NVE_START", 1)[1]
    rows, loop_time, inside = [], None, False
    for line in nve.splitlines():
        words = line.split()
        if words[:2] == ["Step", "Time"]:
            inside = True
        elif line.startswith("Loop time of"):
            loop_time = float(words[3])
            inside = False
        elif inside and len(words) == 6 and words[0].isdigit():
            try:
                rows.append([float(w) for w in words])
            except ValueError:  # a line being written
                pass
    return (np.array(rows) if rows else np.zeros((0, 6))), loop_time


def run_lammps(model: Path, ps: float, nvt_ps: float, sample_every: int, seed: int,
               workdir: Path, system_name: str, threads: int, device: str = "cpu",
               clock: Optional[Clock] = None, start=None) -> Dict:
    """NVE in LAMMPS after its own Nose-Hoover NVT, or (``start``) from that state's positions
    and velocities, written into the data file (metal units: Å/ps)."""
    from ase.io import write

    from transip_md.lammps import lammps_env, lmp_executable, plugin_path

    atoms = build_system(system_name) if start is None else start.copy()
    molecule = not atoms.pbc.any()
    elements = sorted(set(atoms.get_chemical_symbols()), key=lambda e: (e != "O", e))  # O, then A-Z
    data = workdir / f"{system_name}.data"
    if molecule:  # the data file needs a box; the s s s boundary shrink-wraps it anyway
        atoms = atoms.copy()
        atoms.cell = np.eye(3) * VACUUM_BOX_A
        atoms.center()
    write(data, atoms, format="lammps-data", specorder=elements, masses=True,
          velocities=start is not None, units="metal")
    nvt_steps = 0 if start is not None else int(round(nvt_ps * 1000 / DT_FS))
    velocity = "velocity        all zero linear\n" if start is not None else (
        f"velocity        all create {TEMPERATURE_K} {seed} mom yes rot "
        f"{'yes' if molecule else 'no'} dist gaussian\n")
    nvt = "" if start is not None else (
        f"thermo          {max(1, nvt_steps)}\n"
        f"fix             nvt all nvt temp {TEMPERATURE_K} {TEMPERATURE_K} 0.05\n"
        f"run             {nvt_steps}\nunfix           nvt\n")
    steps = int(round(ps * 1000 / DT_FS))
    tag = f"{system_name}_{Path(model).stem}"
    deck = workdir / f"in.nve_{tag}"
    clock = clock or Clock()
    remaining = clock.remaining()
    # the budget: LAMMPS stops the running run gracefully at the timeout and skips later runs
    timeout = ("" if remaining is None else
               f"timer           timeout {max(1, int(remaining))} every 10\n")
    pair_args = (" charge 0 multiplicity 1" if molecule else "") + (
        f" device {device}" if device != "cpu" else "")
    deck.write_text(LAMMPS_DECK.format(
        timeout=timeout,
        boundary="s s s" if molecule else "p p p", data=data, plugin=plugin_path(),
        pair_args=pair_args, model=model,
        elements=" ".join(elements), dt_ps=DT_FS / 1000.0, velocity=velocity, nvt=nvt,
        temp_dof="compute_modify  thermo_temp extra/dof 6\n" if molecule else "",
        zero_after_nvt="velocity        all zero linear\nvelocity        all zero angular\n"
        if molecule else "",
        every=sample_every, steps=steps))
    log = workdir / f"lammps_{tag}.log"
    env = lammps_env()
    env["OMP_NUM_THREADS"] = str(threads)  # libtorch intra-op threads; one MPI rank (no mpirun)
    t0 = time.perf_counter()
    screen = workdir / f"lammps_{tag}.screen"
    nve_wall = None  # wall time at which NVE_START appeared (steps/s of a partial run)

    def record(text: str, loop_time: Optional[float]) -> Dict:
        rows, _ = parse_nve_log(text)
        done = int(rows[-1, 0]) if len(rows) else 0
        seconds = loop_time if loop_time is not None else (
            time.perf_counter() - nve_wall if nve_wall else 0.0)
        r = nve_record("lammps", system_name, atoms, steps, nvt_steps, done, seconds,
                       rows[:, 1], rows[:, 5], rows[:, 2], done < steps)
        r.update(device=device, log=str(log))
        return r

    with open(screen, "w") as out:
        proc = subprocess.Popen([str(lmp_executable()), "-in", str(deck), "-log", str(log), "-nocite"],
                                env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            time.sleep(1.0)
            if nve_wall is None and log.exists() and "NVE_START" in log.read_text():
                nve_wall = time.perf_counter()
            if nve_wall is not None:
                clock.maybe_flush(lambda: record(log.read_text(), None))
    if proc.returncode != 0:
        tail = "\n".join(screen.read_text().strip().splitlines()[-8:])
        raise RuntimeError(f"LAMMPS failed (log {log}):\n{tail}")
    text = log.read_text()
    rows, loop_time = parse_nve_log(text)
    if len(rows) == 0:
        raise RuntimeError(f"LAMMPS wrote no NVE rows (log {log}); the NVT part used up the "
                           "wall budget?" if timeout else f"LAMMPS wrote no NVE rows (log {log})")
    r = record(text, loop_time if loop_time is not None else time.perf_counter() - t0)
    return r


# ----------------------------------------------------------------------------- output
def plot(results: List[Dict], path: Path, system_name: str = "") -> None:
    """E_total(t) - E_0 (meV/atom) per engine, one panel per dtype, with the linear drift fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if "total_energy_ev" in r]
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in done)] or ["float64"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.0 * len(dtypes), 4.5), squeeze=False)
    colours = {"ase": "C0", "openmm": "C1", "lammps": "C2"}
    labels = sorted({r["system"] for r in done}) or [system_name]
    for ax, dtype in zip(axes[0], dtypes):
        for r in (r for r in done if r["dtype"] == dtype):
            t = np.asarray(r["times_ps"])
            e = (np.asarray(r["total_energy_ev"]) - r["total_energy_ev"][0]) / r["n_atoms"] * 1e3
            c = colours.get(r["engine"], None)
            ax.plot(t, e, "-", lw=0.3, alpha=0.3, color=c)
            # running mean over ~1 ps (at most 1/20 of the run) so that the engines stay readable
            per_ps = (len(t) - 1) / max(t[-1] - t[0], 1e-12)
            w = int(max(1, min(per_ps, len(t) / 20)))
            smooth = np.convolve(e, np.ones(w) / w, mode="valid")
            ax.plot(t[w // 2: w // 2 + len(smooth)], smooth, "-", lw=1.3, color=c,
                    label=f"{r['engine']}: drift {r['drift_ev_per_atom_per_ps']:.1e} eV/atom/ps, "
                          f"fluct. {r['fluctuation_ev_per_atom']:.1e} eV/atom")
            slope, icpt = np.polyfit(t, e, 1)
            ax.plot(t, slope * t + icpt, "--", lw=1.0, color=c)
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_xlabel("NVE time (ps)")
        ax.set_ylabel("E_total(t) - E_0 (meV/atom)")
        ax.set_title(f"{dtype} (goal |drift| <= {GOALS[dtype]:.0e} eV/atom/ps)", fontsize=10)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"shipped transip-demo, {', '.join(labels)}: NVE, velocity Verlet {DT_FS} fs\n"
                 "(faint: every sample; solid: ~1 ps running mean; dashed: linear fit)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: List[Dict]) -> str:
    head = (f"{'engine':<7} {'dtype':<8} {'system':<28} {'NVE ps':>7} {'steps':>7} {'NVE s':>7} "
            f"{'drift eV/atom/ps':>17} {'fluct eV/atom':>14} {'<T> K':>6} {'steps/s':>8} {'goal':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['engine']:<7} {r['dtype']:<8} FAILED: {r['error'].splitlines()[-1][:80]}")
            continue
        ok = "met" if abs(r["drift_ev_per_atom_per_ps"]) <= GOALS[r["dtype"]] else "NOT met"
        lines.append(f"{r['engine']:<7} {r['dtype']:<8} {r['system']:<28} {r.get('ps_reached', r['ps']):>7.3g} "
                     f"{r.get('steps_done', r['steps']):>7d} {r['seconds']:>7.0f} "
                     f"{r['drift_ev_per_atom_per_ps']:>17.2e} {r['fluctuation_ev_per_atom']:>14.2e} "
                     f"{r['mean_temperature_k']:>6.0f} {r.get('steps_done', r['steps']) / r['seconds']:>8.1f} {ok:>8}"
                     + (f"  SHORT: {r['ps_reached']:.3g} of {r['ps']:g} ps (wall budget)"
                        if r.get("stopped_by_budget") else ""))
    return "\n".join(lines)


def engine_variant(engine: str, args) -> str:
    """Label of an engine's configuration, e.g. openmm-CUDA-graphs, lammps-cuda, ase-cpu."""
    if engine == "openmm":
        return f"openmm-{args.openmm_platform}" + ("-graphs" if args.cuda_graphs else "")
    if engine == "lammps":
        return f"lammps-{args.lammps_device}"
    return f"ase-{args.ase_device}" + ("-graphs" if args.ase_cuda_graphs else "")


def write_json(out: Path, results: List[Dict], system_name: str, threads: int) -> None:
    """nve_drift.json, atomically (a collect step may read it while the run goes on)."""
    tmp = out / "nve_drift.json.tmp"
    tmp.write_text(json.dumps(
        {"system": system_name, "timestep_fs": DT_FS, "temperature_k": TEMPERATURE_K,
         "threads": threads, "goals_ev_per_atom_per_ps": GOALS, "results": results}, indent=1))
    tmp.replace(out / "nve_drift.json")


def write_outputs(out: Path, results: List[Dict], system_name: str, threads: int) -> None:
    write_json(out, results, system_name, threads)
    plot(results, out / "nve_drift.png", system_name)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ps", type=float, default=50.0, help="NVE length per run (ps)")
    p.add_argument("--nvt-ps", type=float, default=None,
                   help="thermostatted equilibration before NVE (ps; default min(2, ps/5))")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma list of ase,openmm,lammps")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of float64,float32")
    p.add_argument("--system", default="water64",
                   help="water64: periodic 64-water box (192 atoms); waterN: N waters (water512: "
                        "1,536 atoms); ethanol: one molecule in vacuum (all engines)")
    p.add_argument("--model", default=None,
                   help="exported model file (one --dtypes entry; default: the shipped model's "
                        "cached export of each dtype)")
    p.add_argument("--openmm-platform", default="CPU", choices=("CPU", "Reference", "CUDA", "OpenCL"))
    p.add_argument("--openmm-precision", default="auto",
                   help="CUDA/OpenCL Precision: auto (double for float64, mixed for float32), "
                        "single, mixed, double")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="OpenMM: static-shape TorchForce with CUDA graphs (CUDA platform)")
    p.add_argument("--lammps-device", default="cpu", choices=("cpu", "cuda"),
                   help="pair_style transip device")
    p.add_argument("--ase-device", default="cpu", help="TransIPCalculator device (cpu, cuda)")
    p.add_argument("--ase-cuda-graphs", action="store_true",
                   help="ASE: TransIPCalculator(cuda_graphs=True) (static-shape path replayed "
                        "from a CUDA graph; --ase-device cuda)")
    p.add_argument("--write-state", default=None,
                   help="only thermalise (--nvt-ps of OpenMM Langevin, one --dtypes entry) and "
                        "write the end state (extended XYZ with velocities) to this file")
    p.add_argument("--start-state", default=None,
                   help="start every engine's NVE from this state (a --write-state file) "
                        "instead of its own thermostat run")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of this process (s): NVE stops when it is spent and "
                        "the ps reached are reported; partial results are written every 30 s")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per engine (torch/OpenMP, OpenMM CPU platform); LAMMPS runs one rank")
    p.add_argument("--sample-fs", type=float, default=5.0, help="energy sampling interval (fs)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", default="runs/nve_drift")
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [e for e in engines if e not in ENGINES] + [d for d in dtypes if d not in DTYPES]
    if bad or args.ps <= 0 or args.threads < 1:
        p.error(f"unknown engine/dtype {bad}" if bad else "--ps and --threads must be positive")
    if args.system not in SYSTEMS and not water_molecules(args.system):
        p.error(f"unknown --system {args.system!r}: water64, waterN (N molecules) or ethanol")
    if args.model and len(dtypes) != 1:
        p.error("--model is one file: give exactly one --dtypes entry (its dtype)")
    if args.model and not Path(args.model).is_file():
        p.error(f"--model {args.model}: no such file")
    if args.write_state and (engines != ["openmm"] or len(dtypes) != 1 or args.start_state):
        p.error("--write-state thermalises with one engine: --engines openmm, one --dtypes entry, "
                "no --start-state")
    if args.write_state and Path(args.write_state).exists():
        p.error(f"--write-state {args.write_state} exists; this script writes only new files")
    if args.start_state and not Path(args.start_state).is_file():
        p.error(f"--start-state {args.start_state}: no such file")
    if args.ase_cuda_graphs and not args.ase_device.startswith("cuda"):
        p.error("--ase-cuda-graphs needs --ase-device cuda")
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    # before torch is first imported (libgomp reads it once), and for the LAMMPS subprocess
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set
        pass
    nvt_ps = min(2.0, args.ps / 5) if args.nvt_ps is None else args.nvt_ps
    sample_every = max(1, int(round(args.sample_fs / DT_FS)))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from transip_md.export import default_model_path

    start = read_start_state(Path(args.start_state), args.system) if args.start_state else None
    if start is not None:  # the NVT happened where the state was made
        nvt_ps = float(start.info.get("nvt_ps", 0.0))
    if args.write_state:
        model = Path(args.model).resolve() if args.model else default_model_path(dtypes[0])
        r = run_openmm(model, 0.0, nvt_ps, sample_every, args.seed, args.system, args.threads,
                       args.openmm_platform, args.cuda_graphs, args.openmm_precision, dtypes[0],
                       write_state=Path(args.write_state))
        print(f"{nvt_ps:g} ps NVT ({r['nvt_steps']} steps, OpenMM {args.openmm_platform}); "
              f"wrote {r['wrote_state']}")
        return 0

    results: List[Dict] = []
    for dtype in dtypes:
        model = Path(args.model).resolve() if args.model else default_model_path(dtype)
        for engine in engines:
            variant = engine_variant(engine, args)
            print(f"{variant} {dtype} {args.system}: {nvt_ps:g} ps NVT + {args.ps:g} ps NVE ...",
                  flush=True)
            wall = time.perf_counter()
            meta = dict(variant=variant, dtype=dtype, ps=args.ps, nvt_ps=nvt_ps, dt_fs=DT_FS,
                        model=str(model), threads=args.threads, budget_s=args.budget_s,
                        start_state=(dict(path=str(args.start_state), **{
                            k: (start.info[k].item() if hasattr(start.info[k], "item") else start.info[k])
                            for k in ("thermalised_by", "seed", "nvt_ps") if k in start.info})
                            if start is not None else None))

            def progress(partial, meta=meta, wall=wall):  # a run still going: readable by collect
                partial.update(meta, partial=True, wall_seconds=time.perf_counter() - wall)
                write_json(out, results + [partial], args.system, args.threads)

            clock = Clock(deadline, progress)
            try:
                if engine == "ase":
                    r = run_ase(model, args.ps, nvt_ps, sample_every, args.seed, args.system,
                                args.ase_device, clock, start, args.ase_cuda_graphs)
                elif engine == "openmm":
                    r = run_openmm(model, args.ps, nvt_ps, sample_every, args.seed, args.system,
                                   args.threads, args.openmm_platform, args.cuda_graphs,
                                   args.openmm_precision, dtype, clock, start)
                else:
                    r = run_lammps(model, args.ps, nvt_ps, sample_every, args.seed, out,
                                   args.system, args.threads, args.lammps_device, clock, start)
                if len(r["times_ps"]) < 3:  # e.g. the wall budget ran out in NVT: keep the record
                    raise RuntimeError(f"only {len(r['times_ps'])} NVE samples in the wall budget "
                                       f"({r['steps_done']} NVE steps)")
                r.update(energy_drift(r["times_ps"], r["total_energy_ev"], r["n_atoms"]))
                fit = block_drift(r["times_ps"], r["total_energy_ev"], r["n_atoms"])
                r.update(drift_block_ev_per_atom_per_ps=fit["drift"],
                         drift_sigma_ev_per_atom_per_ps=fit["sigma"], drift_blocks=fit["n_blocks"])
            except Exception as exc:  # one failing engine does not lose the others' numbers
                traceback.print_exc()
                r = {"engine": engine, "system": args.system, "error": f"{type(exc).__name__}: {exc}"}
            r.update(meta, wall_seconds=time.perf_counter() - wall)  # incl. NVT, setup
            if "error" not in r:
                r["ps"] = args.ps
                r["ps_reached"] = r["times_ps"][-1] if r["times_ps"] else 0.0
            results.append(r)
            if "error" not in r:
                short = (f", STOPPED at the wall budget after {r['ps_reached']:.3g} of {args.ps:g} ps"
                         if r.get("stopped_by_budget") else "")
                print(f"  drift {r['drift_ev_per_atom_per_ps']:.2e} eV/atom/ps (block fit "
                      f"{r['drift_block_ev_per_atom_per_ps']:.2e} +- {r['drift_sigma_ev_per_atom_per_ps']:.1e}), "
                      f"fluctuation {r['fluctuation_ev_per_atom']:.2e} eV/atom, "
                      f"{r['steps_done'] / max(r['seconds'], 1e-9):.1f} steps/s{short}", flush=True)
            write_outputs(out, results, args.system, args.threads)  # after every run

    print("\n" + table(results))
    if args.ps < 10:
        print(f"\nnote: {args.ps:g} ps is a short run; drift goals (|drift| <= 1e-6 float64, 1e-4 "
              "float32 eV/atom/ps) refer to 50 ps runs, where the fit is not dominated by the "
              "bond-vibration oscillation of E_total.")
    print(f"\nwrote {out / 'nve_drift.json'} and {out / 'nve_drift.png'}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
