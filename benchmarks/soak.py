"""Soak test: a long NVT run of a periodic water box with the shipped model, logging per block
of --block steps (default 10,000) the steps/s, the GPU memory and the block-mean temperature.

  python benchmarks/soak.py --engine openmm --platform CUDA --cuda-graphs --steps 200000 --out runs/soak_openmm
  python benchmarks/soak.py --engine lammps --device cuda --steps 40000 --out runs/soak_lammps
  python benchmarks/soak.py --engine openmm --platform CPU --n-waters 27 --steps 60 --block 20 --out /tmp/s

Issue #18's goals (checked by benchmarks/analyse_long_runs.py): no NaN, no crash; steps/s and
GPU memory flat within 5 % from the first block to the last; every block's mean temperature
within 2 % of the 300 K target.

* OpenMM: LangevinMiddleIntegrator (300 K, --friction 5/ps, 0.5 fs), TorchForce from
  ``transip_openmm`` (``--cuda-graphs``: static-shape path + OpenMM-Torch CUDA graphs).
* LAMMPS: run in this process through the ``lammps`` Python module (``pair_style transip
  device cuda``), ``fix nvt`` (Nosé-Hoover, 300 K, Tdamp 0.05 ps), ``run --temp-every`` chunks
  (``pre no`` after the first: one setup for the whole soak).

Temperature: both engines sample the kinetic temperature every --temp-every steps (OpenMM over
3N - 3 degrees of freedom, CMMotionRemover on; LAMMPS its thermo temperature, 3N - 3) and
average the samples of a block. GPU memory, per block:
``torch_allocated_mb`` / ``torch_reserved_mb`` are torch's CUDA caching-allocator statistics of
this process. They cover the model's tensors because OpenMM-Torch and the LAMMPS plugin link the
same libtorch as the Python torch in this process (one allocator); they exclude OpenMM's own
buffers and CUDA contexts. ``process_used_mb`` is what nvidia-smi lists for this process's PID
(everything, contexts included; None where nvidia-smi does not list processes, e.g. in a PID
namespace), ``device_used_mb`` the whole GPU (all processes: concurrent runs move it). The block
timer starts after --warmup steps (graph capture, TorchScript profiling runs) and includes
reading the temperature.

Writes ``OUT/soak.json`` after every block (atomically; ``finished`` false until the end) and
stops early, with ``stopped_by_budget``, when --budget-s of wall time would be exceeded by the
next block.

Soaks that share one GPU (``--partners`` their soak.json files) time their blocks under one
load: a soak's first timed block waits, stepping untimed, until every partner is past its
warm-up, and after its last block it keeps stepping (``hold_blocks``, untimed for the goals)
until every partner has ended. Without it the soak that ends first speeds up the other's last
blocks (2026-12-02: +16.8 % for OpenMM once the runs beside it had stopped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

TIMESTEP_FS = 0.5
TEMPERATURE_K = 300.0
MB = 1024.0 * 1024.0


# ----------------------------------------------------------------------------- memory
def gpu_memory() -> Dict[str, Optional[float]]:
    """torch's allocator statistics of this process, its nvidia-smi line, the device total."""
    out: Dict[str, Optional[float]] = {"torch_allocated_mb": None, "torch_reserved_mb": None,
                                       "process_used_mb": None, "device_used_mb": None,
                                       "gpu_processes": None}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["torch_allocated_mb"] = torch.cuda.memory_allocated() / MB
            out["torch_reserved_mb"] = torch.cuda.memory_reserved() / MB
            free, total = torch.cuda.mem_get_info()
            out["device_used_mb"] = (total - free) / MB
    except Exception:  # memory is a diagnostic; never let it end a soak
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
        apps = [[p.strip() for p in line.split(",")] for line in smi.stdout.splitlines()]
        apps = [parts for parts in apps if len(parts) == 2]
        for parts in apps:
            if parts[0] == str(os.getpid()):
                out["process_used_mb"] = float(parts[1])
        if smi.returncode == 0:  # the GPU's load: other runs starting or ending move steps/s
            out["gpu_processes"] = len(apps)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return out


MEMORY_SOURCE = ("torch_allocated/reserved: torch.cuda.memory_allocated/memory_reserved in the "
                 "engine's own process (OpenMM-Torch / LAMMPS plugin share its libtorch allocator; "
                 "excludes OpenMM buffers and CUDA contexts); process_used: nvidia-smi "
                 "--query-compute-apps for the PID (None if not listed); device_used: whole GPU")


def init_cuda_stats() -> None:
    """Initialise torch's CUDA state in Python, else memory_allocated() reads 0 even while
    libtorch inside OpenMM-Torch / the plugin allocates (the stats are gated on Python init)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.init()


# ----------------------------------------------------------------------------- engines
class OpenMMSoak:
    def __init__(self, atoms, model: str, args):
        import openmm
        import openmm.unit as u

        from transip_md.units import ANGSTROM_PER_NM
        from transip_openmm import make_torch_force

        self.u = u
        system = openmm.System()
        for mass in atoms.get_masses():
            system.addParticle(float(mass))
        box = [openmm.Vec3(*row) for row in atoms.cell.array / ANGSTROM_PER_NM]
        system.setDefaultPeriodicBoxVectors(*box)
        system.addForce(make_torch_force(model, list(atoms.get_chemical_symbols()), periodic=True,
                                         box_vectors=atoms.cell.array / ANGSTROM_PER_NM,
                                         cuda_graphs=args.cuda_graphs))
        system.addForce(openmm.CMMotionRemover())
        self.integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE_K * u.kelvin,
                                                          args.friction / u.picosecond,
                                                          TIMESTEP_FS * u.femtosecond)
        self.integrator.setRandomNumberSeed(args.seed)
        platform = openmm.Platform.getPlatformByName(args.platform)
        props = {"Threads": str(args.threads)} if args.platform == "CPU" else {}
        if args.platform in ("CUDA", "OpenCL"):
            props["Precision"] = "double" if args.dtype == "float64" else "mixed"
        self.properties = props
        self.context = openmm.Context(system, self.integrator, platform, props)
        self.context.setPositions(atoms.positions / ANGSTROM_PER_NM)
        self.context.setVelocitiesToTemperature(TEMPERATURE_K * u.kelvin, args.seed)
        self.dof = 3 * len(atoms) - 3
        self.kb = u.MOLAR_GAS_CONSTANT_R.value_in_unit(u.kilojoule_per_mole / u.kelvin)
        self.temp_every = args.temp_every

    def _state(self):
        from transip_md.units import KJ_PER_MOL_PER_EV

        s = self.context.getState(getEnergy=True)
        ke = s.getKineticEnergy().value_in_unit(self.u.kilojoule_per_mole)
        pe = s.getPotentialEnergy().value_in_unit(self.u.kilojoule_per_mole)
        return 2 * ke / (self.dof * self.kb), pe / KJ_PER_MOL_PER_EV

    def warmup(self, steps: int) -> None:
        if steps:
            self.integrator.step(steps)
            self._state()

    def block(self, steps: int) -> Dict[str, float]:
        temps, done, pe = [], 0, float("nan")
        while done < steps:
            n = min(self.temp_every, steps - done)
            self.integrator.step(n)
            done += n
            t, pe = self._state()  # also waits for the queued steps
            temps.append(t)
        return {"mean_temperature_k": float(np.mean(temps)), "potential_energy_ev": pe}


class LammpsSoak:
    def __init__(self, atoms, model: str, args, workdir: Path):
        from ase.io import write

        from transip_md.lammps import plugin_path, start_lammps

        elements = sorted(set(atoms.get_chemical_symbols()), key=lambda e: (e != "O", e))
        data = workdir / "soak.data"
        write(data, atoms, format="lammps-data", specorder=elements, masses=True)
        self.lmp = start_lammps(cmdargs=["-log", str(workdir / "soak_lammps.log"), "-nocite", "-screen", "none"],
                                plugin=args.lammps_plugin or plugin_path())
        device = f" device {args.device}" if args.device != "cpu" else ""
        for line in (
            "units metal", "atom_style atomic", "boundary p p p", f"read_data {data}",
            f"pair_style transip{device}", f"pair_coeff * * {model} {' '.join(elements)}",
            "neighbor 1.0 bin", "neigh_modify every 1 delay 0 check yes",
            f"timestep {TIMESTEP_FS / 1000.0}",
            f"velocity all create {TEMPERATURE_K} {args.seed} mom yes rot no dist gaussian",
            f"fix nvt all nvt temp {TEMPERATURE_K} {TEMPERATURE_K} 0.05",
            "thermo_style custom step temp pe etotal", f"thermo {args.block}",
        ):
            self.lmp.command(line)
        self.temp_every = args.temp_every
        self._set_up = False

    def _run(self, steps: int) -> None:
        # one setup (neighbour lists, plugin init) for the whole soak: later runs continue
        self.lmp.command(f"run {steps} pre no post no" if self._set_up else f"run {steps}")
        self._set_up = True

    def warmup(self, steps: int) -> None:
        if steps:
            self._run(steps)

    def block(self, steps: int) -> Dict[str, float]:
        temps, done = [], 0
        while done < steps:  # the kinetic temperature every temp_every steps, as for OpenMM
            n = min(self.temp_every, steps - done)
            self._run(n)
            done += n
            temps.append(float(self.lmp.get_thermo("temp")))
        return {"mean_temperature_k": float(np.mean(temps)),
                "potential_energy_ev": float(self.lmp.get_thermo("pe"))}


# ----------------------------------------------------------------------------- partners
def _read_partner(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet (or mid-replace on another filesystem)
        return None


def partner_warmed_up(doc: Optional[Dict]) -> bool:
    """Past its warm-up, or ended without getting there (it will never load the GPU)."""
    return doc is not None and ("setup_s" in doc or partner_ended(doc))


def partner_ended(doc: Optional[Dict]) -> bool:
    """Its timed blocks are over: finished, failed, or stopped by its budget."""
    return doc is not None and bool(doc.get("finished") or doc.get("error")
                                    or doc.get("stopped_by_budget") or "wall_s" in doc)


def step_while(step, partners: List[Path], condition, chunk: int, deadline: float) -> int:
    """Untimed ``step(chunk)`` calls while ``condition(partner doc)`` holds for any partner and
    the wall clock is before ``deadline``; returns the steps taken."""
    steps = 0
    while partners and time.perf_counter() < deadline and any(
            condition(_read_partner(p)) for p in partners):
        step(chunk)
        steps += chunk
    return steps


# ----------------------------------------------------------------------------- main
def write_json(path: Path, doc: Dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("openmm", "lammps"), required=True)
    p.add_argument("--n-waters", type=int, default=512, help="water molecules (512: 1,536 atoms)")
    p.add_argument("--steps", type=int, default=200_000)
    p.add_argument("--block", type=int, default=10_000, help="steps per logged block")
    p.add_argument("--warmup", type=int, default=2000,
                   help="untimed steps before the first block (the lattice box relaxes and heats: 1 ps)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--model", default=None, help="exported model (default: the shipped model's export)")
    p.add_argument("--platform", default="CUDA", help="OpenMM platform (CUDA, CPU, Reference)")
    p.add_argument("--cuda-graphs", action="store_true", help="OpenMM: CUDA graphs")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"), help="LAMMPS pair_style device")
    p.add_argument("--lammps-plugin", default=None,
                   help="transipplugin.so to load (default: python -m transip_md.lammps build's)")
    p.add_argument("--friction", type=float, default=5.0, help="OpenMM Langevin friction (1/ps)")
    p.add_argument("--temp-every", type=int, default=500, help="OpenMM temperature sampling (steps)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (OpenMM CPU platform, torch)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (s)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--partners", nargs="*", default=[], metavar="SOAK_JSON",
                   help="soak.json of soaks sharing this GPU: time every block beside all of them "
                        "(wait for their warm-up, keep the load on until they end)")
    p.add_argument("--out", required=True, help="output directory (soak.json)")
    args = p.parse_args(argv)
    if args.steps < args.block or args.block < 1 or args.n_waters < 1:
        p.error("need --steps >= --block >= 1 and --n-waters >= 1")
    t_start = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from transip_md.systems import water_box

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "soak.json"
    if args.model:
        model = str(Path(args.model).resolve())
    else:
        from transip_md.export import default_model_path

        model = str(default_model_path(args.dtype))
    atoms = water_box(args.n_waters, seed=7)
    variant = (f"openmm-{args.platform}" + ("-graphs" if args.cuda_graphs else "")
               if args.engine == "openmm" else f"lammps-{args.device}")
    doc = {"engine": args.engine, "variant": variant, "dtype": args.dtype, "model": model,
           "n_atoms": len(atoms), "steps": args.steps, "block": args.block, "warmup": args.warmup,
           "timestep_fs": TIMESTEP_FS, "temperature_k": TEMPERATURE_K, "budget_s": args.budget_s,
           "memory_source": MEMORY_SOURCE, "blocks": [], "finished": False,
           "stopped_by_budget": False, "error": None,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    write_json(path, doc)
    try:
        init_cuda_stats()
        if args.engine == "openmm":
            engine = OpenMMSoak(atoms, model, args)
            doc["openmm_properties"] = engine.properties
        else:
            engine = LammpsSoak(atoms, model, args, out)
        engine.warmup(args.warmup)
        doc["setup_s"] = time.perf_counter() - t_start
        write_json(path, doc)  # partners wait for setup_s
        partners = [Path(p).resolve() for p in args.partners]
        chunk = max(1, args.block // 20)
        budget_end = t_start + (args.budget_s if args.budget_s is not None else math.inf)
        doc["partner_wait_steps"] = step_while(engine.warmup, partners, lambda d: not partner_warmed_up(d),
                                               chunk, budget_end)
        doc["memory_after_warmup"] = gpu_memory()
        write_json(path, doc)
        done = 0
        while done < args.steps:
            n = min(args.block, args.steps - done)
            last = doc["blocks"][-1]["seconds"] if doc["blocks"] else 0.0
            if args.budget_s is not None and time.perf_counter() - t_start + last * n / args.block > args.budget_s:
                doc["stopped_by_budget"] = True
                break
            t0 = time.perf_counter()
            block = engine.block(n)
            seconds = time.perf_counter() - t0
            done += n
            block.update(steps=n, step_end=done, seconds=seconds, steps_per_s=n / seconds,
                         wall_s=time.perf_counter() - t_start, **gpu_memory())
            doc["blocks"].append(block)
            write_json(path, doc)
            print(f"block {len(doc['blocks'])}: step {done}, {block['steps_per_s']:.1f} steps/s, "
                  f"T {block['mean_temperature_k']:.1f} K, PE {block['potential_energy_ev']:.4f} eV, "
                  f"torch alloc/resv {block['torch_allocated_mb']}/{block['torch_reserved_mb']} MB, "
                  f"process {block['process_used_mb']} MB", flush=True)
            if not math.isfinite(block["potential_energy_ev"]):
                doc["error"] = f"NaN potential energy at step {done}"
                break
        doc["finished"] = doc["error"] is None and not doc["stopped_by_budget"]
        if partners and doc["finished"]:
            write_json(path, doc)  # partners see this soak's end
            doc["hold_blocks"] = []
            while time.perf_counter() < budget_end - 60:
                t0 = time.perf_counter()
                # engine.block, not warmup: the same temperature reads (host syncs) as a timed
                # block, so the partner's blocks see the same load (2026-12-02, with warmup's one
                # read per chunk, LAMMPS ran up to 13 % faster beside OpenMM's hold)
                held = step_while(engine.block, partners, lambda d: not partner_ended(d),
                                  args.block // 4 or 1, min(budget_end - 60, t0 + 60))
                if not held:
                    break
                doc["hold_blocks"].append({"steps": held, "seconds": time.perf_counter() - t0,
                                           "steps_per_s": held / (time.perf_counter() - t0)})
                write_json(path, doc)
    except Exception as exc:  # the partial blocks stay in soak.json
        traceback.print_exc()
        doc["error"] = f"{type(exc).__name__}: {exc}"
    doc["wall_s"] = time.perf_counter() - t_start
    write_json(path, doc)
    if doc["stopped_by_budget"]:
        print(f"STOPPED at the wall budget: {sum(b['steps'] for b in doc['blocks'])} of {args.steps} steps")
    print(f"wrote {path}")
    return 0 if doc["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
