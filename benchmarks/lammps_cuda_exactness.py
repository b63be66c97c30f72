"""LAMMPS on CUDA equals LAMMPS on the CPU: map, halo and halo+recompute (float64).

    python benchmarks/lammps_cuda_exactness.py LMP MPIRUN PLUGIN MODEL64.pt WORKDIR

1,536-atom periodic water box, ``run 0``; one CPU rank is the reference; prints max |dF|
(eV/Å) of ``device cuda`` with one rank (map) and with ``mpirun -np 2`` (halo, halo +
recompute; both ranks may share one GPU) and of ``device cpu`` with two ranks (halo). Then
STEPS (default 20) steps of NVE (0.5 fs) on one rank, CPU against CUDA: the forces of the last
step, i.e. the per-step input upload (pinned blocks reused between steps) after reuse. Map
mode on CUDA selects the model's edges on the GPU (edges auto = device); ``edges host`` runs
beside it, and the NVE comparison of the two uses a 0.3 Å skin so that the neighbour list (and
with it the GPU's candidate pairs) is rebuilt several times within the steps.
"""
import subprocess, sys, os
import numpy as np
sys.path.insert(0, "lammps_examples")
from make_water_box import write_lammps_data
from transip_md.systems import water_box
lmp, mpirun, plugin, model, out = sys.argv[1:6]
atoms = water_box(512, seed=0)
write_lammps_data(f"{out}/w.data", atoms)
STEPS = int(os.environ.get("STEPS", "20"))
def run(tag, style, np_, steps=0, neighbor=""):
    deck = f"""units metal
atom_style atomic
read_data {out}/w.data
{neighbor}
plugin load {plugin}
pair_style transip {style}
pair_coeff * * {model} O H
thermo_style custom step pe press
thermo_modify format float %.15g
dump d all custom {max(steps, 1)} {out}/{tag}.dump id fx fy fz
dump_modify d sort id format float %.17g
velocity all create 300 7 mom yes rot no dist gaussian
fix nve all nve
timestep 0.0005
run {steps}
"""
    open(f"{out}/in.{tag}", "w").write(deck)
    cmd = ([mpirun, "-np", str(np_)] if np_ > 1 else []) + [lmp, "-in", f"{out}/in.{tag}", "-log", "none"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    pe = [l for l in p.stdout.splitlines() if l.strip().startswith(f"{steps} ")]
    builds = [l.split()[-1] for l in p.stdout.splitlines() if l.startswith("Neighbor list builds")]
    print(tag, p.returncode, pe[-1] if pe else p.stdout[-800:] + p.stderr[-800:],
          f"(neighbour list builds: {builds[-1] if builds else '?'})", flush=True)
    L = open(f"{out}/{tag}.dump").read().splitlines()
    i = max(k for k, l in enumerate(L) if l.startswith("ITEM: ATOMS"))
    return np.array([[float(v) for v in l.split()] for l in L[i + 1:]])[:, 1:]
ref = run("cpu_np1", "device cpu", 1)
for tag, style, n in [("cuda_np1_map", "device cuda", 1),
                      ("cuda_np1_map_host_edges", "device cuda edges host", 1), ("cuda_np2_halo", "device cuda ghosts halo", 2),
                      ("cuda_np2_halo_recompute", "device cuda ghosts halo recompute yes", 2),
                      ("cpu_np2_halo", "device cpu ghosts halo", 2)]:
    f = run(tag, style, n)
    print(f"  {tag}: max|dF| vs cpu np1 = {np.abs(f - ref).max():.3e} eV/A (|F|max {np.abs(ref).max():.2f})", flush=True)
ref = run(f"cpu_np1_{STEPS}steps", "device cpu", 1, STEPS)
f = run(f"cuda_np1_{STEPS}steps", "device cuda", 1, STEPS)
print(f"  after {STEPS} NVE steps, cuda np1 map: max|dF| vs cpu np1 = {np.abs(f - ref).max():.3e} eV/A", flush=True)
small_skin = "neighbor 0.3 bin\nneigh_modify every 1 delay 0 check yes"
f_host = run(f"cuda_np1_{STEPS}steps_host_edges", "device cuda edges host", 1, STEPS, small_skin)
f_dev = run(f"cuda_np1_{STEPS}steps_device_edges", "device cuda edges device", 1, STEPS, small_skin)
print(f"  after {STEPS} NVE steps, skin 0.3: edges device vs host (cuda np1 map): max|dF| = "
      f"{np.abs(f_dev - f_host).max():.3e} eV/A", flush=True)
