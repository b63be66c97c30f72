"""LAMMPS on one GPU: time per step and peak GPU memory per ghost mode (TransIP-S-sized model).

    python benchmarks/lammps_gpu_memory.py LMP PLUGIN WORKDIR [MODE ...]

Periodic water boxes of 6,144 and 24,576 atoms, a randomly initialised TransIP-S float32 export,
``pair_style transip device cuda <mode>`` on one rank; 20 ``fix nve`` steps timed after 3. Peak
memory is polled from nvidia-smi every 0.1 s (includes the CUDA context and PyTorch's caching
allocator reserve). Default modes: ``ghosts map``, ``ghosts map recompute yes``, ``ghosts halo``,
``ghosts halo recompute yes``.
"""
import subprocess, sys, time, re, threading
from pathlib import Path
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "lammps_examples")
from gpu_bench import random_model_files
from make_water_box import write_lammps_data
from transip_md.systems import water_box
lmp, plugin, out = sys.argv[1:4]
MODES = sys.argv[4:] or ["ghosts map", "ghosts map recompute yes", "ghosts halo", "ghosts halo recompute yes"]
out = Path(out); out.mkdir(parents=True, exist_ok=True)
files = random_model_files("s", out)
def peak_mem(stop, res):
    while not stop.is_set():
        q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
        res.append(int(q.split()[0])); time.sleep(0.1)
for n in (6144, 24576):
    atoms = water_box(n // 3, seed=0); data = out / f"w{n}.data"; write_lammps_data(data, atoms)
    for mode in MODES:
        deck = out / "in.x"
        deck.write_text(f"units metal\natom_style atomic\nread_data {data}\nplugin load {plugin}\npair_style transip device cuda {mode}\npair_coeff * * {files['float32']} O H\nneighbor 1.0 bin\nvelocity all create 300 1\nfix 1 all nve\ntimestep 0.0005\nrun 3\nrun 20\n")
        stop, res = threading.Event(), []
        th = threading.Thread(target=peak_mem, args=(stop, res)); th.start()
        p = subprocess.run([lmp, "-in", str(deck), "-log", "none"], capture_output=True, text=True, timeout=300)
        stop.set(); th.join()
        loops = re.findall(r"Loop time of ([0-9.eE+-]+) on \d+ procs for (\d+) steps", p.stdout)
        ms = 1e3 * float(loops[-1][0]) / int(loops[-1][1]) if len(loops) >= 2 else float("nan")
        print(f"{n:>6} atoms  {mode:<28} {ms:8.1f} ms/step  peak GPU memory {max(res or [0]) / 1024:6.2f} GiB (nvidia-smi, incl. context)"
              + ("" if p.returncode == 0 else "  ERROR " + p.stdout[-300:]), flush=True)
