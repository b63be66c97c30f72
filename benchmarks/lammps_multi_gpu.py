"""LAMMPS on 1 vs 2 GPUs of one host (issue #8): exactness and timesteps/s.

    python benchmarks/lammps_multi_gpu.py LMP MPIRUN PLUGIN MODEL64.pt MODEL32.pt WORKDIR

Periodic water box of 24,576 atoms, ``pair_style transip device cuda``: one rank (``ghosts map``)
vs ``mpirun -np 2`` (``ghosts halo``; the plugin gives each node-local rank its own GPU, round
robin). Compares energy, pressure and forces of the float64 model (``run 0``), then times 40
``fix nve`` steps of the float32 model on 1 and 2 GPUs. Prints the numbers. Needs a machine with
two GPUs; LMP/MPIRUN may come from a carried LAMMPS bundle (see benchmarks/lammps_gpu_smoke.sh).
"""
import re, subprocess, sys, time
import numpy as np
sys.path.insert(0, "lammps_examples")
from make_water_box import write_lammps_data
from transip_md.systems import water_box
lmp, mpirun, plugin, m64, m32, out = sys.argv[1:7]
atoms = water_box(8192, seed=0)
write_lammps_data(f"{out}/w.data", atoms)
print("atoms", len(atoms), flush=True)
HEAD = f"units metal\natom_style atomic\nread_data {out}/w.data\nplugin load {plugin}\npair_style transip device cuda\n"
def lmprun(tag, np_, body):
    open(f"{out}/in.{tag}", "w").write(HEAD + body)
    cmd = ([mpirun, "-np", str(np_)] if np_ > 1 else []) + [lmp, "-in", f"{out}/in.{tag}", "-log", "none"]
    t = time.time(); p = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    dev = [l for l in p.stdout.splitlines() if "TransIP" in l and ("cuda" in l.lower() or "device" in l.lower())][:2]
    print(f"{tag}: rc={p.returncode} wall {time.time()-t:.1f}s {dev}", flush=True)
    if p.returncode: print(p.stdout[-1500:], p.stderr[-1500:], flush=True)
    return p.stdout
def forces(tag, np_):
    s = lmprun(tag, np_, f"pair_coeff * * {m64} O H\nthermo_style custom step pe press\nthermo_modify format float %.15g\n"
               f"dump d all custom 1 {out}/{tag}.dump id fx fy fz\ndump_modify d sort id format float %.17g\nrun 0\n")
    pe = [l.split() for l in s.splitlines() if l.strip().startswith("0 ")][-1]
    L = open(f"{out}/{tag}.dump").read().splitlines(); i = max(k for k, l in enumerate(L) if l.startswith("ITEM: ATOMS"))
    return float(pe[1]), float(pe[2]), np.array([[float(v) for v in l.split()] for l in L[i + 1:]])[:, 1:]
e1, p1, f1 = forces("f64_np1", 1)
e2, p2, f2 = forces("f64_np2", 2)
print(f"float64: |dE| = {abs(e1-e2):.3e} eV (E = {e1:.6f}), |dP| = {abs(p1-p2):.3e} bar, max|dF| = {np.abs(f1-f2).max():.3e} eV/A (|F|max {np.abs(f1).max():.2f})", flush=True)
rates = {}
for np_ in (1, 2):
    s = lmprun(f"f32_np{np_}", np_, f"pair_coeff * * {m32} O H\nneighbor 1.0 bin\nvelocity all create 300 1\nfix 1 all nve\ntimestep 0.0005\nthermo 50\nrun 5\nrun 40\n")
    loops = re.findall(r"Loop time of ([0-9.eE+-]+) on \d+ procs for (\d+) steps", s)
    if len(loops) >= 2:
        rates[np_] = int(loops[-1][1]) / float(loops[-1][0])
        print(f"float32 np{np_}: {rates[np_]:.2f} timesteps/s", flush=True)
if len(rates) == 2:
    print(f"speedup 2 GPUs / 1 GPU = {rates[2]/rates[1]:.2f}, parallel efficiency {rates[2]/rates[1]/2:.2f}", flush=True)
