"""OpenMM steps/s through OpenMM-Torch's TorchForce, with and without CUDA graphs.

  python benchmarks/openmm_gpu.py --platform CUDA --nvrtc-stub libnvrtc.so.12 \\
      --json benchmarks/results/openmm_gpu_h200.json

Periodic water boxes (``transip_md.systems.water_box``: 64 .. 8,192 molecules = 192 .. 24,576
atoms by default), the shipped trained model (``--model``: another exported file, reference or
fused), so that the dynamics stay physical: at 0.5 fs a random-weight model drives two atoms
together within a few hundred steps. Each box is first relaxed on the dynamic path (a short
energy minimisation, then ``--equilibrate`` Langevin steps at high friction), because
``water_box`` is a lattice, not a liquid. From that state, for graphs off and on: energy
agreement of the static (graph) path with the dynamic one, the static path's neighbour search
(all pairs, or the cell list's grid and capacities), and steps/s (median of ``--repeats`` timed
blocks of ``--steps`` after warm-up). A NaN on the static path (a capacity exceeded, see
``make_torch_force``) or an OpenMM error is reported in its row, not raised. Prints a table
and writes JSON (``--json``; default ``benchmarks/results/openmm_gpu_<platform>.json``).

A random-weight model (what ``gpu_bench.py`` times without ``--model``) is run with
``--no-relax --timestep-fs 0.001``: no minimisation or equilibration, velocities drawn at 300 K
on the lattice, and a near-zero step, so that no two atoms meet. The cost of a step does not
depend on how far the atoms move (both TransIP paths search neighbours at every step), so
steps/s are unchanged; ns/day is then quoted for ``--ns-per-day-timestep-fs`` (0.5).
"""

import argparse
import ctypes
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch  # before openmm, so that OpenMM-Torch's plugins find torch's libraries

RESULTS = Path(__file__).resolve().parent / "results"
TIMESTEP_FS = 0.5  # default --timestep-fs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="exported model file (default: the shipped model)")
    p.add_argument("--dtype", default="float32", help="dtype of the shipped model's export")
    p.add_argument("--platform", default="CUDA")
    p.add_argument("--precision", default=None, help="OpenMM CUDA/CPU precision (single, mixed, double)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 2048, 8192], help="water molecules")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--equilibrate", type=int, default=200, help="Langevin steps before timing")
    p.add_argument("--timestep-fs", type=float, default=TIMESTEP_FS,
                   help="Langevin timestep (fs) of the relaxation and the timed runs")
    p.add_argument("--relax", action=argparse.BooleanOptionalAction, default=True,
                   help="minimise and equilibrate each box on the dynamic path before timing "
                        "(--no-relax: time from the lattice, velocities at 300 K)")
    p.add_argument("--ns-per-day-timestep-fs", type=float, default=None,
                   help="timestep (fs) that ns/day is quoted for (default: --timestep-fs)")
    p.add_argument("--nvrtc-stub", default=None, help="preload this libnvrtc.so.12 (test machines)")
    p.add_argument("--graph-warmup", type=int, default=None,
                   help="OpenMM-Torch CUDAGraphWarmupSteps (plain calls before the graph is captured)")
    p.add_argument("--json", default=None)
    return p.parse_args()


def model_path(args) -> str:
    if args.model:
        return args.model
    from transip_md.export import default_model_path

    return str(default_model_path(args.dtype))


def make_context(openmm, unit, atoms, force, platform, precision, friction_per_ps=1.0,
                 timestep_fs=TIMESTEP_FS):
    from transip_md.units import ANGSTROM_PER_NM

    system = openmm.System()
    for mass in atoms.get_masses():
        system.addParticle(float(mass))
    box_nm = atoms.cell.array / ANGSTROM_PER_NM
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box_nm])
    system.addForce(force)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, friction_per_ps / unit.picosecond,
                                                 timestep_fs * unit.femtosecond)
    properties = {"Precision": precision} if precision else {}
    return openmm.Context(system, integrator, platform, properties), integrator


def potential_energy(context, unit) -> float:
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def relaxed_state(openmm, unit, atoms, model, platform, args):
    """Positions and velocities after a minimisation and a high-friction Langevin run."""
    from transip_md.units import ANGSTROM_PER_NM
    from transip_openmm import make_torch_force

    force = make_torch_force(model, list(atoms.get_chemical_symbols()), periodic=True,
                             box_vectors=atoms.cell.array / ANGSTROM_PER_NM)
    context, integrator = make_context(openmm, unit, atoms, force, platform, args.precision,
                                       friction_per_ps=10.0, timestep_fs=args.timestep_fs)
    context.setPositions(atoms.positions / ANGSTROM_PER_NM)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    integrator.step(args.equilibrate)
    state = context.getState(getPositions=True, getVelocities=True, getEnergy=True)
    return state.getPositions(asNumpy=True), state.getVelocities(asNumpy=True)


def static_plan(model, atoms):
    """The static path's neighbour search for this box (what make_torch_force chooses)."""
    from transip_md.units import ANGSTROM_PER_NM
    from transip_openmm.torchforce import _static_capacity

    from transip_md.export import load_exported

    # through the door: a fused export needs its operator library loaded before torch.jit.load
    cutoff = float(load_exported(model, needs=()).cutoff)
    plan = _static_capacity(len(atoms), cutoff, True, atoms.cell.array / ANGSTROM_PER_NM, None)
    return {"search": "cell list" if plan.uses_cell_list else "all pairs",
            "neighbor_capacity": plan.neighbor_capacity, "cell_capacity": plan.cell_capacity,
            "grid": list(plan.grid)}


def time_steps(context, integrator, unit, steps: int, repeats: int) -> float:
    """Steps/s: median over timed blocks (getState forces the queued work to finish)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        integrator.step(steps)
        context.getState(getEnergy=True)
        times.append(time.perf_counter() - t0)
    return steps / float(np.median(times))


def lattice_state(atoms):
    """--no-relax: the box's own positions (nm); velocities are drawn in each context."""
    from transip_md.units import ANGSTROM_PER_NM

    return atoms.positions / ANGSTROM_PER_NM, None


def run_one(openmm, unit, atoms, model, platform, args, graphs, positions, velocities):
    """(energy at the start state, steps/s or None, error or None) for one path; ``velocities``
    None: drawn at 300 K (seed 1)."""
    from transip_md.units import ANGSTROM_PER_NM
    from transip_openmm import make_torch_force

    force = make_torch_force(model, list(atoms.get_chemical_symbols()), periodic=True,
                             box_vectors=atoms.cell.array / ANGSTROM_PER_NM, cuda_graphs=graphs)
    if graphs and args.graph_warmup is not None:
        force.setProperty("CUDAGraphWarmupSteps", str(args.graph_warmup))
    context, integrator = make_context(openmm, unit, atoms, force, platform, args.precision,
                                       timestep_fs=args.timestep_fs)
    context.setPositions(positions)
    if velocities is None:  # --no-relax: the same seed for both paths
        context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    else:
        context.setVelocities(velocities)
    energy = potential_energy(context, unit)
    if not math.isfinite(energy):
        return energy, None, ("NaN energy: a static-path capacity is exceeded "
                              "(make_torch_force neighbor_capacity= / cell_capacity=)")
    try:
        integrator.step(20)  # warm-up (graph capture happens here)
        context.getState(getEnergy=True)
        rate = time_steps(context, integrator, unit, args.steps, args.repeats)
    except Exception as err:  # OpenMMException: e.g. "atoms i and j are at the same position"
        return energy, None, f"{type(err).__name__}: {str(err)[:300]}"
    final = potential_energy(context, unit)
    if not math.isfinite(final):
        return energy, None, "NaN energy during the run (a capacity exceeded, or unstable dynamics)"
    return energy, rate, None


def print_table(rows) -> None:
    def fmt(value, spec):
        return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])

    print(f"\n{'atoms':>7} {'search':>10} {'steps/s':>9} {'steps/s graphs':>15} {'speed-up':>9} "
          f"{'ns/day graphs':>14} {'|dE|/|E|':>10}")
    for r in rows:
        plain, graphs = r.get("steps_per_s"), r.get("steps_per_s_graphs")
        speedup = graphs / plain if plain and graphs else None
        print(f"{r['atoms']:>7} {r['static_plan']['search']:>10} {fmt(plain, '9.1f')} "
              f"{fmt(graphs, '15.1f')} {fmt(speedup, '9.2f')} {fmt(r.get('ns_per_day_graphs'), '14.2f')} "
              f"{fmt(r.get('energy_rel_diff_graphs_vs_dynamic'), '10.1e')}")
        for key, text in (("static plan error", r["static_plan"].get("error")),
                          ("error", r.get("error")), ("error_graphs", r.get("error_graphs"))):
            if text:
                print(f"{'':>7} {key}: {text}")


def main() -> None:
    args = parse_args()
    if args.nvrtc_stub:
        ctypes.CDLL(os.path.abspath(args.nvrtc_stub), mode=ctypes.RTLD_GLOBAL)
    import openmm
    import openmm.unit as unit

    from transip_md.systems import water_box
    from transip_openmm import import_openmmtorch

    import_openmmtorch()  # reloads OpenMM-Torch's platform plugins if openmm came first
    platform = openmm.Platform.getPlatformByName(args.platform)
    model = model_path(args)
    per_day_fs = args.ns_per_day_timestep_fs or args.timestep_fs
    out = Path(args.json) if args.json else RESULTS / f"openmm_gpu_{args.platform.lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    header = {"args": vars(args), "model": model, "device": device, "torch": torch.__version__,
              "openmm": openmm.__version__, "timestep_fs": args.timestep_fs, "relaxed": args.relax,
              "ns_per_day_timestep_fs": per_day_fs}
    if per_day_fs != args.timestep_fs:
        header["note"] = (f"timed with a {args.timestep_fs:g} fs step; the cost of a step does not "
                          f"depend on it, ns/day is quoted for {per_day_fs:g} fs")
    rows = []
    for n_mol in args.sizes:
        atoms = water_box(n_mol, seed=0)
        row = {"molecules": n_mol, "atoms": len(atoms)}
        try:
            row["static_plan"] = static_plan(model, atoms)
        except Exception as err:  # e.g. a box too small for the static path
            row["static_plan"] = {"search": "-", "error": f"{type(err).__name__}: {str(err)[:300]}"}
        t0 = time.perf_counter()
        if args.relax:
            positions, velocities = relaxed_state(openmm, unit, atoms, model, platform, args)
            row["relax_s"] = time.perf_counter() - t0
        else:
            positions, velocities = lattice_state(atoms)
        energies = {}
        for graphs in (False, True):
            suffix = "_graphs" if graphs else ""
            try:
                energy, rate, error = run_one(openmm, unit, atoms, model, platform, args, graphs,
                                              positions, velocities)
            except Exception as err:  # building the force or the context: report, go on
                energy, rate, error = None, None, f"{type(err).__name__}: {str(err)[:300]}"
            energies[graphs] = energy
            row["energy_kj_mol" + suffix] = energy
            row["steps_per_s" + suffix] = rate
            row["ns_per_day" + suffix] = rate * per_day_fs * 1e-6 * 86400 if rate else None
            row["error" + suffix] = error
        e_plain, e_graphs = energies[False], energies[True]
        row["energy_rel_diff_graphs_vs_dynamic"] = (
            abs(e_graphs - e_plain) / abs(e_plain)
            if e_plain is not None and e_graphs is not None and e_plain != 0 else None)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out, "w") as fh:  # after every box: a run stopped later keeps these rows
            json.dump(dict(header, rows=rows), fh, indent=1)
    print_table(rows)
    with open(out, "w") as fh:
        json.dump(dict(header, rows=rows), fh, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
