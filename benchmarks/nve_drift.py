"""Total-energy conservation (NVE, velocity Verlet, 0.5 fs) of the shipped model in ASE, OpenMM
and LAMMPS, for its float64 and float32 exports.

  python benchmarks/nve_drift.py                       # 50 ps per engine and dtype (hours on CPU)
  python benchmarks/nve_drift.py --ps 1 --out runs/nve # a quick check
  python benchmarks/nve_drift.py --engines lammps --dtypes float64

Systems: the periodic box of 64 waters (``transip_md.systems.water_box(64, seed=7)``, 192
atoms, 1 g/cm^3) in ASE and LAMMPS; OpenMM runs the same box by default (``--openmm-system
ethanol`` for ethanol in vacuum). Each run starts from 300 K velocities, equilibrates with a
thermostat for ``--nvt-ps`` (ASE Langevin, OpenMM LangevinMiddle, LAMMPS Nosé-Hoover), then
runs NVE for ``--ps``:

* ASE: ``VelocityVerlet`` + ``TransIPCalculator``;
* OpenMM: ``VerletIntegrator`` on the CPU platform, ``TorchForce`` from ``transip_openmm``;
* LAMMPS: ``fix nve``, one rank, ``pair_style transip`` plugin.

Measured from E_total(t) sampled every ``--sample-fs``: the drift (slope of a linear fit,
eV/atom/ps) and the fluctuation (standard deviation around the fit, eV/atom). Goals for 50 ps
runs: |drift| <= 1e-6 eV/atom/ps in float64 and <= 1e-4 in float32. Writes ``OUT/nve_drift.json``
(summary and time series) and ``OUT/nve_drift.png`` (E_total(t) - E_0 per engine and dtype) and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from transip_md.md_analysis import energy_drift

DT_FS = 0.5
TEMPERATURE_K = 300.0
ENGINES = ("ase", "openmm", "lammps")
DTYPES = ("float64", "float32")
GOALS = {"float64": 1e-6, "float32": 1e-4}  # |drift| eV/atom/ps for long runs


def water64():
    from transip_md.systems import water_box

    return water_box(64, seed=7)


# ----------------------------------------------------------------------------- ASE
def run_ase(model: Path, ps: float, nvt_ps: float, sample_every: int, seed: int) -> Dict:
    from ase import units
    from ase.md import velocitydistribution as vd
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    from transip_md.calculator import TransIPCalculator

    atoms = water64()
    atoms.calc = TransIPCalculator(str(model))
    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):
        vd.thermalize_momenta(atoms, TEMPERATURE_K, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=TEMPERATURE_K, rng=rng)
    vd.Stationary(atoms)
    nvt_steps = int(round(nvt_ps * 1000 / DT_FS))
    if nvt_steps:
        Langevin(atoms, DT_FS * units.fs, temperature_K=TEMPERATURE_K, friction=0.01 / units.fs,
                 rng=rng).run(nvt_steps)
    steps = int(round(ps * 1000 / DT_FS))
    dyn = VelocityVerlet(atoms, DT_FS * units.fs)
    times, totals, temps = [], [], []

    def sample():
        times.append(dyn.nsteps * DT_FS / 1000.0)
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        temps.append(atoms.get_temperature())

    dyn.attach(sample, interval=sample_every)
    start = time.perf_counter()
    dyn.run(steps)
    return {"engine": "ase", "system": f"water64 periodic ({len(atoms)} atoms)", "n_atoms": len(atoms),
            "steps": steps, "nvt_steps": nvt_steps, "seconds": time.perf_counter() - start,
            "times_ps": times, "total_energy_ev": totals, "mean_temperature_k": float(np.mean(temps))}


# ----------------------------------------------------------------------------- OpenMM
def run_openmm(model: Path, ps: float, nvt_ps: float, sample_every: int, seed: int,
               system_name: str) -> Dict:
    import openmm
    import openmm.unit as u
    from ase.build import molecule

    from transip_md.units import KJ_PER_MOL_PER_EV
    from transip_openmm import make_torch_force, topology_from_ase

    atoms = water64() if system_name == "water" else molecule("CH3CH2OH")
    topology, positions = topology_from_ase(atoms)
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass)
    if atoms.pbc.any():
        box = [openmm.Vec3(*(row / 10.0)) for row in np.asarray(atoms.cell)] * u.nanometer
        system.setDefaultPeriodicBoxVectors(*box)
    system.addForce(make_torch_force(str(model), topology, charge=0, multiplicity=1))
    system.addForce(openmm.CMMotionRemover())  # Verlet conserves total momentum anyway
    platform = openmm.Platform.getPlatformByName("CPU")
    props = {"Threads": str(os.cpu_count() or 1)}

    nvt_steps = int(round(nvt_ps * 1000 / DT_FS))
    langevin = openmm.LangevinMiddleIntegrator(TEMPERATURE_K * u.kelvin, 10.0 / u.picosecond,
                                               DT_FS * u.femtosecond)
    langevin.setRandomNumberSeed(seed)
    context = openmm.Context(system, langevin, platform, props)
    context.setPositions(positions)
    context.setVelocitiesToTemperature(TEMPERATURE_K * u.kelvin, seed)
    if nvt_steps:
        langevin.step(nvt_steps)
    state = context.getState(getPositions=True, getVelocities=True)
    del context

    verlet = openmm.VerletIntegrator(DT_FS * u.femtosecond)
    context = openmm.Context(system, verlet, platform, props)
    context.setPeriodicBoxVectors(*state.getPeriodicBoxVectors())
    context.setPositions(state.getPositions())
    context.setVelocities(state.getVelocities())
    steps = int(round(ps * 1000 / DT_FS))
    dof = 3 * len(atoms) - 3
    kb = u.MOLAR_GAS_CONSTANT_R.value_in_unit(u.kilojoule_per_mole / u.kelvin)
    times, totals, temps = [], [], []
    start = time.perf_counter()
    done = 0
    while True:
        s = context.getState(getEnergy=True)
        ke = s.getKineticEnergy().value_in_unit(u.kilojoule_per_mole)
        pe = s.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
        times.append(done * DT_FS / 1000.0)
        totals.append((ke + pe) / KJ_PER_MOL_PER_EV)
        temps.append(2 * ke / (dof * kb))
        if done >= steps:
            break
        n = min(sample_every, steps - done)
        verlet.step(n)
        done += n
    label = f"water64 periodic ({len(atoms)} atoms)" if system_name == "water" else \
        f"ethanol vacuum ({len(atoms)} atoms)"
    return {"engine": "openmm", "system": label, "n_atoms": len(atoms), "steps": steps,
            "nvt_steps": nvt_steps, "seconds": time.perf_counter() - start, "times_ps": times,
            "total_energy_ev": totals, "mean_temperature_k": float(np.mean(temps))}


# ----------------------------------------------------------------------------- LAMMPS
LAMMPS_DECK = """\
units           metal
atom_style      atomic
boundary        p p p
read_data       {data}
plugin          load {plugin}
pair_style      transip
pair_coeff      * * {model} O H
neighbor        1.0 bin
neigh_modify    every 1 delay 0 check yes
timestep        {dt_ps}
velocity        all create {temp} {seed} mom yes rot no dist gaussian
thermo_style    custom step time temp pe ke etotal
thermo_modify   norm no format float %.12f
thermo          {thermo_nvt}
fix             nvt all nvt temp {temp} {temp} 0.05
run             {nvt_steps}
unfix           nvt
reset_timestep  0
fix             nve all nve
thermo          {every}
print           "NVE_START"
run             {steps}
"""


def run_lammps(model: Path, ps: float, nvt_ps: float, sample_every: int, seed: int,
               workdir: Path) -> Dict:
    from ase.io import write

    from transip_md.lammps import lammps_env, lmp_executable, plugin_path

    atoms = water64()
    data = workdir / "water64.data"
    write(data, atoms, format="lammps-data", specorder=["O", "H"], masses=True)
    nvt_steps = int(round(nvt_ps * 1000 / DT_FS))
    steps = int(round(ps * 1000 / DT_FS))
    tag = Path(model).stem
    deck = workdir / f"in.nve_{tag}"
    deck.write_text(LAMMPS_DECK.format(data=data, plugin=plugin_path(), model=model,
                                       dt_ps=DT_FS / 1000.0, temp=TEMPERATURE_K, seed=seed,
                                       thermo_nvt=max(1, nvt_steps), nvt_steps=nvt_steps,
                                       every=sample_every, steps=steps))
    log = workdir / f"lammps_{tag}.log"
    env = lammps_env()
    start = time.perf_counter()
    proc = subprocess.run([str(lmp_executable()), "-in", str(deck), "-log", str(log), "-nocite"],
                          env=env, cwd=workdir, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"LAMMPS failed (log {log}):\n{tail}")
    text = log.read_text()
    nve = text.split("NVE_START", 1)[1]
    rows, loop_time, inside = [], None, False
    for line in nve.splitlines():
        words = line.split()
        if words[:2] == ["Step", "Time"]:
            inside = True
        elif line.startswith("Loop time of"):
            loop_time = float(words[3])
            inside = False
        elif inside and words and words[0].isdigit():
            rows.append([float(w) for w in words])
    rows = np.array(rows)
    return {"engine": "lammps", "system": f"water64 periodic ({len(atoms)} atoms)",
            "n_atoms": len(atoms), "steps": steps, "nvt_steps": nvt_steps,
            "seconds": loop_time if loop_time is not None else elapsed,
            "times_ps": rows[:, 1].tolist(), "total_energy_ev": rows[:, 5].tolist(),
            "mean_temperature_k": float(rows[:, 2].mean()), "log": str(log)}


# ----------------------------------------------------------------------------- output
def plot(results: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in results:
        if "total_energy_ev" not in r:
            continue
        e = np.asarray(r["total_energy_ev"])
        style = "-" if r["dtype"] == "float64" else "--"
        ax.plot(r["times_ps"], (e - e[0]) / r["n_atoms"] * 1000.0, style,
                label=f"{r['engine']} {r['dtype']} ({r['system'].split(' (')[0]})")
    ax.set_xlabel("NVE time (ps)")
    ax.set_ylabel("E_total(t) - E_0 (meV/atom)")
    ax.set_title(f"shipped transip-demo, velocity Verlet {DT_FS} fs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: List[Dict]) -> str:
    head = (f"{'engine':<7} {'dtype':<8} {'system':<28} {'NVE ps':>7} {'drift eV/atom/ps':>17} "
            f"{'fluct eV/atom':>14} {'<T> K':>6} {'steps/s':>8} {'goal':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['engine']:<7} {r['dtype']:<8} FAILED: {r['error'].splitlines()[-1][:80]}")
            continue
        ok = "met" if abs(r["drift_ev_per_atom_per_ps"]) <= GOALS[r["dtype"]] else "NOT met"
        lines.append(f"{r['engine']:<7} {r['dtype']:<8} {r['system']:<28} {r['ps']:>7.3g} "
                     f"{r['drift_ev_per_atom_per_ps']:>17.2e} {r['fluctuation_ev_per_atom']:>14.2e} "
                     f"{r['mean_temperature_k']:>6.0f} {r['steps'] / r['seconds']:>8.1f} {ok:>8}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ps", type=float, default=50.0, help="NVE length per run (ps)")
    p.add_argument("--nvt-ps", type=float, default=None,
                   help="thermostatted equilibration before NVE (ps; default min(2, ps/5))")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma list of ase,openmm,lammps")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of float64,float32")
    p.add_argument("--openmm-system", choices=("water", "ethanol"), default="water")
    p.add_argument("--sample-fs", type=float, default=5.0, help="energy sampling interval (fs)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", default="runs/nve_drift")
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [e for e in engines if e not in ENGINES] + [d for d in dtypes if d not in DTYPES]
    if bad or args.ps <= 0:
        p.error(f"unknown engine/dtype {bad}" if bad else "--ps must be positive")
    nvt_ps = min(2.0, args.ps / 5) if args.nvt_ps is None else args.nvt_ps
    sample_every = max(1, int(round(args.sample_fs / DT_FS)))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from transip_md.export import default_model_path

    results: List[Dict] = []
    for dtype in dtypes:
        model = default_model_path(dtype)
        for engine in engines:
            print(f"{engine} {dtype}: {nvt_ps:g} ps NVT + {args.ps:g} ps NVE ...", flush=True)
            try:
                if engine == "ase":
                    r = run_ase(model, args.ps, nvt_ps, sample_every, args.seed)
                elif engine == "openmm":
                    r = run_openmm(model, args.ps, nvt_ps, sample_every, args.seed, args.openmm_system)
                else:
                    r = run_lammps(model, args.ps, nvt_ps, sample_every, args.seed, out)
                r.update(energy_drift(r["times_ps"], r["total_energy_ev"], r["n_atoms"]))
            except Exception as exc:  # one failing engine does not lose the others' numbers
                traceback.print_exc()
                r = {"engine": engine, "error": f"{type(exc).__name__}: {exc}"}
            r.update(dtype=dtype, ps=args.ps, nvt_ps=nvt_ps, dt_fs=DT_FS, model=str(model))
            results.append(r)
            if "error" not in r:
                print(f"  drift {r['drift_ev_per_atom_per_ps']:.2e} eV/atom/ps, fluctuation "
                      f"{r['fluctuation_ev_per_atom']:.2e} eV/atom, {r['steps'] / r['seconds']:.1f} steps/s",
                      flush=True)

    print("\n" + table(results))
    if args.ps < 10:
        print(f"\nnote: {args.ps:g} ps is a short run; drift goals (|drift| <= 1e-6 float64, 1e-4 "
              "float32 eV/atom/ps) refer to 50 ps runs, where the fit is not dominated by the "
              "bond-vibration oscillation of E_total.")
    (out / "nve_drift.json").write_text(json.dumps(
        {"timestep_fs": DT_FS, "temperature_k": TEMPERATURE_K, "goals_ev_per_atom_per_ps": GOALS,
         "results": results}, indent=1))
    plot(results, out / "nve_drift.png")
    print(f"\nwrote {out / 'nve_drift.json'} and {out / 'nve_drift.png'}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
