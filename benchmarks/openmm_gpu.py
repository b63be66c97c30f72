"""OpenMM steps/s through OpenMM-Torch's TorchForce, with and without CUDA graphs.

  python benchmarks/openmm_gpu.py --model model.pt --platform CUDA --sizes 512 2048 --json out.json

Periodic water boxes (``transip_md.systems.water_box``), LangevinMiddleIntegrator at 0.5 fs.
For each size: energy agreement of the static (graph) path with the dynamic path, and steps/s
of both (median of --repeats timed blocks of --steps after warm-up). Prints a table, writes JSON.
"""

import argparse
import ctypes
import json
import os
import time

import numpy as np
import torch  # before openmm, so that OpenMM-Torch's plugins find torch's libraries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--platform", default="CUDA")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048], help="water molecules")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nvrtc-stub", default=None, help="preload this libnvrtc.so.12 (test machines)")
    p.add_argument("--graph-warmup", type=int, default=None,
                   help="OpenMM-Torch CUDAGraphWarmupSteps (plain calls before the graph is captured)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.nvrtc_stub:
        ctypes.CDLL(os.path.abspath(args.nvrtc_stub), mode=ctypes.RTLD_GLOBAL)
    import openmm
    import openmm.unit as unit

    from transip_md.systems import water_box
    from transip_md.units import ANGSTROM_PER_NM
    from transip_openmm import make_torch_force

    platform = openmm.Platform.getPlatformByName(args.platform)
    rows = []
    for n_mol in args.sizes:
        atoms = water_box(n_mol, seed=0)
        box_nm = atoms.cell.array / ANGSTROM_PER_NM
        row = {"molecules": n_mol, "atoms": len(atoms)}
        energies = {}
        for graphs in (False, True):
            system = openmm.System()
            for mass in atoms.get_masses():
                system.addParticle(float(mass))
            system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*r) for r in box_nm])
            force = make_torch_force(args.model, list(atoms.get_chemical_symbols()),
                                     periodic=True, box_vectors=box_nm, cuda_graphs=graphs)
            if graphs and args.graph_warmup is not None:
                force.setProperty("CUDAGraphWarmupSteps", str(args.graph_warmup))
            system.addForce(force)
            integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                                         0.5 * unit.femtosecond)
            context = openmm.Context(system, integrator, platform)
            context.setPositions(atoms.positions / ANGSTROM_PER_NM)
            energies[graphs] = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(
                unit.kilojoule_per_mole)
            integrator.step(20)  # warm-up (graph capture happens here)
            context.getState(getEnergy=True)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                integrator.step(args.steps)
                context.getState(getEnergy=True)
                times.append(time.perf_counter() - t0)
            rate = args.steps / float(np.median(times))
            row["steps_per_s_graphs" if graphs else "steps_per_s"] = rate
            row["ns_per_day_graphs" if graphs else "ns_per_day"] = rate * 0.5e-6 * 86400
            del context, integrator
        row["energy_rel_diff_graphs_vs_dynamic"] = abs(energies[True] - energies[False]) / abs(energies[False])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'atoms':>7} {'steps/s':>9} {'steps/s graphs':>15} {'ns/day graphs':>14} {'|dE|/|E|':>10}")
    for r in rows:
        print(f"{r['atoms']:>7} {r['steps_per_s']:>9.1f} {r['steps_per_s_graphs']:>15.1f} "
              f"{r['ns_per_day_graphs']:>14.2f} {r['energy_rel_diff_graphs_vs_dynamic']:>10.1e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
