"""GPU speed of TransIP side by side with MACE, in one run (issue #10).

    python benchmarks/gpu_bench.py --out results/                 # everything that is installed
    python benchmarks/gpu_bench.py --parts transip,mace --sizes 1536 6144 24576

Parts (``--parts``, comma list; a part whose packages are missing is reported and skipped):

* ``transip``: energy + forces per call of an exported TransIP file (float32; default a randomly
  initialised TransIP-S, ``--model`` for a real file) on periodic water boxes, neighbour list
  included (it is inside the file), plus the largest box that fits (``--largest``). Columns: ms
  (median of CUDA-event-timed calls), peak memory above the inputs, and the time of the
  embedded neighbour list alone. Variants: ``fp32`` (full precision matrix products),
  ``tf32`` (TensorFloat-32 matrix units) and ``lowmem`` (fp32 with the file's ``low_memory``
  activation checkpointing), with the force error of each against a float64 export; and
  ``graph``: the file's static-shape entry point ``energy_static`` (the path behind OpenMM's
  ``cuda_graphs=True``: neighbours from a fixed-size cell list, or all pairs for small boxes,
  planned by ``plan_static_neighbors`` from the box) with autograd forces, the whole call
  captured once into a ``torch.cuda.CUDAGraph`` and timed by replay (each replay first copies
  the positions into the graph's input buffer). Its peak memory is that of the warm-up calls
  and the capture; the plan (search, grid, capacities) is in the row, and a failed capture is
  reported as ``graph_error``, not raised.
* ``profile``: one energy+forces call at the largest ``--sizes`` entry under torch.profiler:
  kernel count, GPU busy time, and time by kernel class (matrix products, gathers/scatters,
  the rest).
* ``mace``: a MACE model with MACE-OFF23-small hyper-parameters (96x0e, max_ell 3, correlation 3,
  2 interactions, r_max 5 Å, 8 Bessel functions; random weights) on the same boxes, plain
  PyTorch and with cuEquivariance kernels (``cueq_config``); its graph is built once outside the
  timed call (TransIP's neighbour list is timed inside; that favours MACE).
* ``openmm``: OpenMM CUDA platform steps/s through TorchForce with and without CUDA graphs (runs
  ``benchmarks/openmm_gpu.py`` in a subprocess so a crash there cannot take this run down). The
  random-weight model is timed from the lattice with a near-zero step (``--no-relax
  --timestep-fs 0.001``): at 0.5 fs its dynamics bring two atoms together within a few hundred
  steps, and the cost per step does not depend on the step. ``--model`` runs relax and use 0.5 fs.
* ``lammps``: LAMMPS timesteps/s of the periodic water deck (``fix nve``, 0.5 fs) with
  ``pair_style transip device cuda edges E``, one rank, once per ``--lammps-edges`` value E
  (``host device`` times both edge builders); needs ``--lmp`` (the LAMMPS executable) and
  ``--plugin`` (``python -m transip_md.lammps build`` prints it). Each row also holds the
  plugin's per-step phase times of the timed run (``phases_ms``: rows, to device, model, to
  host, scatter, total; lammps_examples/README.md, "Where a step's time goes") and LAMMPS' Pair
  time per step.

``--kernels reference,fused,fused-qkv`` runs the TransIP parts (transip, profile, openmm, lammps)
once per export kind: ``reference`` (pure TorchScript), ``fused`` (the folded-query transip_ops
operator) and ``fused-qkv`` (its per-token key/value operator), issue #16; results under
``<part>-<kind>``; their force errors are against the float64 *reference*.
With ``--model``, give the fused float32 file as ``--model-fused``.

Prints one table per part and writes ``OUT/gpu_bench.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transip_md.export import export_potential, load_exported  # noqa: E402
from transip_md.model import TransIPPotential, named_config  # noqa: E402
from transip_md.model.static_shapes import (StaticNeighborPlan, plan_static_neighbors,  # noqa: E402
                                            supports_cell_list)
from transip_md.systems import water_box  # noqa: E402
from transip_md.static_forces import capture_static_graph, static_energy_forces  # noqa: E402,F401  (shared with the ASE calculator)

WATER_ATOMS = 3
GiB = 1024 ** 3


# ----------------------------------------------------------------------------- helpers
def cuda_time_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``fn`` in ms, bracketed by CUDA events (device work included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory of one call above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def box_tensors(n_atoms: int, device: torch.device, dtype: torch.dtype):
    atoms = water_box(n_atoms // WATER_ATOMS, seed=0)
    return atoms, (
        torch.tensor(atoms.positions, dtype=dtype, device=device),
        torch.tensor(atoms.numbers, dtype=torch.long, device=device),
        torch.tensor(atoms.cell.array, dtype=dtype, device=device),
        torch.tensor([True, True, True], device=device),
        torch.tensor(0, device=device),
        torch.tensor(1, device=device),
    )


def random_model_files(size: str, directory: Path, fused=()) -> Dict[str, Path]:
    """float32 / float64 reference exports, and ``<kernel>-float32`` for each fused kernel kind
    in ``fused`` (``fused``, ``fused-qkv``; ``True`` means ``("fused",)``)."""
    from transip_md.export.checkpoint_export import FUSED_KERNELS

    fused = ("fused",) if fused is True else tuple(fused or ())
    torch.manual_seed(0)
    potential = TransIPPotential(named_config(size))
    potential.supported_elements[[1, 6, 7, 8]] = True
    potential.network.energy_scale.data.fill_(3.0)
    out = {}
    for dtype in ("float32", "float64"):
        out[dtype] = directory / f"transip-{size}-{dtype}.pt"
        export_potential(potential, out[dtype], dtype=dtype)
    for kernel in fused:
        import copy

        from transip_md.model.fused_attention import use_fused_attention

        out[f"{kernel}-float32"] = directory / f"transip-{size}-{kernel}-float32.pt"
        switched = use_fused_attention(copy.deepcopy(potential), form=FUSED_KERNELS[kernel])
        export_potential(switched, out[f"{kernel}-float32"], dtype="float32")
    return out


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


# ----------------------------------------------------------------------------- static shapes
def static_plan(model, atoms) -> StaticNeighborPlan:
    """The static-shape neighbour search for a periodic box, as ``make_torch_force`` plans it
    (the O(N^2) all-pairs search for files that predate the cell list)."""
    return plan_static_neighbors(len(atoms), float(model.cutoff), atoms.cell.array, periodic=True,
                                 cell_list=supports_cell_list(model))


def plan_record(plan: StaticNeighborPlan) -> Dict:
    return {"search": "cell list" if plan.uses_cell_list else "all pairs",
            "neighbor_capacity": plan.neighbor_capacity, "cell_capacity": plan.cell_capacity,
            "grid": list(plan.grid)}


def bench_graph(model, atoms, inputs, reference, warmup: int = 5) -> Dict:
    """The ``graph`` variant's columns for one box: ``graph_plan``, ``graph_ms``,
    ``graph_peak_gib``, ``graph_force_rel_err`` (with ``reference``), or ``graph_error``."""
    out: Dict = {}
    replay = None
    try:
        plan = static_plan(model, atoms)
        out["graph_plan"] = plan_record(plan)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        replay = capture_static_graph(model, inputs, plan, warmup=warmup)
        out["graph_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GiB
        positions = inputs[0].detach()
        out["graph_ms"] = cuda_time_ms(lambda: replay(positions))
        energy, forces = replay(positions)
        torch.cuda.synchronize()
        if not bool(torch.isfinite(energy)):
            out["graph_error"] = ("NaN energy: a static-shape capacity is exceeded "
                                  f"({plan_record(plan)})")
        elif reference is not None:
            f = forces.double()
            out["graph_force_rel_err"] = float((f - reference).norm() / reference.norm())
    except Exception as exc:  # report, keep the other variants and sizes
        out["graph_error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        traceback.print_exc()
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
    finally:
        replay = None  # frees the graph and its memory pool
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- TransIP
def bench_transip(args, files: Dict[str, Path], device: torch.device) -> Dict:
    model32 = load_exported(files["float32"], device=device)
    model32.check_inputs = False  # engines switch validation off in production runs
    model64 = load_exported(files["float64"], device=device)
    nbr = torch.jit.script(__import__("transip_md.model.neighbors", fromlist=["x"]).neighbor_pairs)
    rows: List[Dict] = []
    sizes = list(args.sizes)
    for n_atoms in sizes + (["largest"] if args.largest else []):
        if n_atoms == "largest":
            n_atoms = _largest_that_fits(model32, device, start=2 * sizes[-1])
            if n_atoms is None:
                continue
        atoms, inputs = box_tensors(n_atoms, device, torch.float32)
        row: Dict = {"atoms": len(atoms)}
        cutoff = float(model32.cutoff)
        row["neighbor_list_ms"] = cuda_time_ms(lambda: nbr(inputs[0], inputs[2], inputs[3], cutoff))
        reference = None
        if len(atoms) <= args.accuracy_max_atoms:
            _, in64 = box_tensors(n_atoms, device, torch.float64)
            reference = model64.compute(*in64, True, False)["forces"]
        eager = [v for v in ("fp32", "tf32", "lowmem") if v in args.variants]
        for variant in eager:
            set_tf32(variant == "tf32")
            model32.low_memory = variant == "lowmem"  # activation checkpointing, fp32
            call = lambda: model32.compute(*inputs, True, False)  # noqa: E731
            row[f"{variant}_ms"] = cuda_time_ms(call)
            row[f"{variant}_peak_gib"] = peak_bytes(call) / GiB
            if reference is not None:
                f = call()["forces"].double()
                row[f"{variant}_force_rel_err"] = float((f - reference).norm() / reference.norm())
        set_tf32(False)
        model32.low_memory = False
        # graph (fp32) last: a failed capture must not disturb the other variants' numbers
        if "graph" in args.variants:
            row.update(bench_graph(model32, atoms, inputs, reference, warmup=args.graph_capture_warmup))
        for variant in ("fp32", "lowmem", "graph"):
            if f"{variant}_peak_gib" in row:
                row[f"{variant}_gib_per_10k_atoms"] = row[f"{variant}_peak_gib"] * 1e4 / len(atoms)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    print(f"\nTransIP-{args.size} float32, energy+forces, H2O periodic boxes ({torch.cuda.get_device_name()})")
    print_transip_table(rows)
    return {"rows": rows}


def print_transip_table(rows: List[Dict]) -> None:
    nan = float("nan")
    print(f"{'atoms':>7} {'fp32 ms':>8} {'tf32 ms':>8} {'lowmem ms':>9} {'graph ms':>9} {'nbr ms':>7} "
          f"{'peak GiB':>9} {'GiB/10k':>8} {'lowmem GiB/10k':>15} {'graph GiB':>10} {'fp32 err':>9} "
          f"{'tf32 err':>9} {'lowmem err':>10} {'graph err':>10}")
    for r in rows:
        print(f"{r['atoms']:>7} {r.get('fp32_ms', nan):>8.2f} {r.get('tf32_ms', nan):>8.2f} "
              f"{r.get('lowmem_ms', nan):>9.2f} {r.get('graph_ms', nan):>9.2f} "
              f"{r['neighbor_list_ms']:>7.2f} {r.get('fp32_peak_gib', nan):>9.2f} "
              f"{r.get('fp32_gib_per_10k_atoms', nan):>8.2f} "
              f"{r.get('lowmem_gib_per_10k_atoms', nan):>15.2f} {r.get('graph_peak_gib', nan):>10.2f} "
              f"{r.get('fp32_force_rel_err', nan):>9.1e} {r.get('tf32_force_rel_err', nan):>9.1e} "
              f"{r.get('lowmem_force_rel_err', nan):>10.1e} {r.get('graph_force_rel_err', nan):>10.1e}")
    for r in rows:
        plan = r.get("graph_plan")
        if plan:
            print(f"{r['atoms']:>7} graph plan: {plan['search']}, neighbour capacity "
                  f"{plan['neighbor_capacity']}, cell capacity {plan['cell_capacity']}, grid {plan['grid']}")
        if r.get("graph_error"):
            print(f"{r['atoms']:>7} graph_error: {r['graph_error']}")


def _largest_that_fits(model, device, start: int):
    n, best = start, None
    while n <= 4_000_000:
        try:
            _, inputs = box_tensors(n, device, torch.float32)
            model.compute(*inputs, True, False)
            best = n
            n *= 2
        except torch.OutOfMemoryError:
            break
        except RuntimeError as exc:  # TorchScript wraps the OOM
            if "out of memory" not in str(exc):
                raise
            break
        finally:
            torch.cuda.empty_cache()
    return best


def profile_transip(args, files: Dict[str, Path], device: torch.device) -> Dict:
    return {"runs": [profile_one(files, device, n) for n in (min(args.sizes), max(args.sizes))]}


def profile_one(files: Dict[str, Path], device: torch.device, n_atoms: int) -> Dict:
    from torch.profiler import ProfilerActivity, profile

    model = load_exported(files["float32"], device=device)
    model.check_inputs = False
    _, inputs = box_tensors(n_atoms, device, torch.float32)
    for _ in range(3):
        model.compute(*inputs, True, False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        model.compute(*inputs, True, False)
        torch.cuda.synchronize()
    classes = {"matmul": 0.0, "gather/scatter": 0.0, "other": 0.0}
    per_kernel: Dict[str, List[float]] = {}
    count = 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        count += 1
        us = ev.device_time
        name = ev.name
        low = name.lower()
        if any(k in low for k in ("gemm", "cutlass", "sm90", "xmma", "matmul", "bmm")):
            classes["matmul"] += us
        elif any(k in low for k in ("index", "scatter", "gather")):
            classes["gather/scatter"] += us
        else:
            classes["other"] += us
        per_kernel.setdefault(name, []).append(us)
    busy = sum(classes.values())
    top = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:15]
    wall = cuda_time_ms(lambda: model.compute(*inputs, True, False), warmup=1, repeats=3)
    print(f"\nprofile at {n_atoms} atoms: {count} kernels, GPU busy {busy / 1e3:.2f} ms of {wall:.2f} ms wall")
    for k, v in classes.items():
        print(f"  {k:>15}: {v / 1e3:8.2f} ms ({100 * v / max(busy, 1e-9):5.1f} %)")
    for name, times in top:
        print(f"  {sum(times) / 1e3:8.2f} ms  x{len(times):<4} {name[:100]}")
    return {"atoms": n_atoms, "kernels": count, "busy_ms": busy / 1e3, "wall_ms": wall,
            "classes_ms": {k: v / 1e3 for k, v in classes.items()},
            "top": [{"name": n, "ms": sum(t) / 1e3, "calls": len(t)} for n, t in top]}


# ----------------------------------------------------------------------------- MACE
def mace_model(cueq: bool, device: torch.device):
    import numpy as np
    from e3nn import o3
    from mace.modules import blocks
    from mace.modules.models import ScaleShiftMACE

    kwargs = {}
    if cueq:
        from mace.modules.wrapper_ops import CuEquivarianceConfig

        kwargs["cueq_config"] = CuEquivarianceConfig(enabled=True, layout="ir_mul",
                                                     group="O3_e3nn", optimize_all=True)
    torch.manual_seed(0)
    model = ScaleShiftMACE(
        r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=blocks.RealAgnosticResidualInteractionBlock,
        interaction_cls_first=blocks.RealAgnosticInteractionBlock,
        num_interactions=2, num_elements=2, hidden_irreps=o3.Irreps("96x0e"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(2), avg_num_neighbors=40.0,
        atomic_numbers=[1, 8], correlation=3, gate=torch.nn.functional.silu,
        atomic_inter_scale=1.0, atomic_inter_shift=0.0, **kwargs,
    )
    return model.to(device=device, dtype=torch.float32).eval()


def mace_graph(atoms, device: torch.device) -> Dict[str, torch.Tensor]:
    from transip_md.model.neighbors import neighbor_pairs

    pos = torch.tensor(atoms.positions, dtype=torch.float32, device=device)
    cell = torch.tensor(atoms.cell.array, dtype=torch.float32, device=device)
    i, j, s = neighbor_pairs(pos, cell, torch.tensor([True] * 3, device=device), 5.0)
    one_hot = torch.zeros(len(atoms), 2, device=device)
    one_hot[torch.tensor(atoms.numbers, device=device) == 8, 1] = 1.0
    one_hot[torch.tensor(atoms.numbers, device=device) == 1, 0] = 1.0
    return {
        "positions": pos, "node_attrs": one_hot,
        "edge_index": torch.stack([i, j]).long(),  # MACE: vec = pos[receiver=1] - pos[sender=0] + shift
        "shifts": (s.to(torch.float32) @ cell), "unit_shifts": s.to(torch.float32),
        "cell": cell, "batch": torch.zeros(len(atoms), dtype=torch.long, device=device),
        "ptr": torch.tensor([0, len(atoms)], device=device),
        "head": torch.zeros(1, dtype=torch.long, device=device),
        "weight": torch.ones(1, device=device), "energy_weight": torch.ones(1, device=device),
    }


def bench_mace(args, device: torch.device) -> Dict:
    # e3nn 0.4.4 (pinned by mace-torch) torch.load()s its own bundled constants file, which the
    # weights-only default of torch >= 2.6 refuses; it is package data, not user input.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    try:  # without its kernels cuEquivariance silently falls back to a slow reference path
        import cuequivariance_ops_torch  # noqa: F401
    except Exception as exc:
        raise RuntimeError(f"cuEquivariance kernels unavailable: {type(exc).__name__}: {exc}") from None
    rows = []
    for n_atoms in args.sizes:
        atoms = water_box(n_atoms // WATER_ATOMS, seed=0)
        graph = mace_graph(atoms, device)
        row: Dict = {"atoms": len(atoms), "edges": int(graph["edge_index"].shape[1])}
        for label, cueq in (("plain", False), ("cueq", True)):
            try:
                model = mace_model(cueq, device)
                call = lambda: model(dict(graph), training=False, compute_force=True)  # noqa: E731
                row[f"{label}_ms"] = cuda_time_ms(call)
                row[f"{label}_peak_gib"] = peak_bytes(call) / GiB
            except Exception as exc:  # keep the other variant and sizes
                row[f"{label}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows, "hyperparameters": "96x0e, max_ell 3, correlation 3, 2 interactions, r_max 5 A, 8 Bessel, MLP 16x0e"}


# ----------------------------------------------------------------------------- OpenMM
#: gpu_bench's openmm part with a random-weight model (no --model): a near-zero timestep and no
#: relaxation keep the atoms at the lattice (at 0.5 fs they meet within a few hundred steps).
RANDOM_MODEL_TIMESTEP_FS = 1e-3


def openmm_command(args, files: Dict[str, Path], out: Path) -> List[str]:
    """The ``openmm_gpu.py`` command line of the openmm part."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "openmm_gpu.py"), "--model", str(files["float32"]),
           "--sizes", *[str(n // WATER_ATOMS) for n in args.openmm_sizes], "--json", str(out / "openmm.json")]
    if args.nvrtc_stub:
        cmd += ["--nvrtc-stub", args.nvrtc_stub]
    if args.graph_warmup is not None:
        cmd += ["--graph-warmup", str(args.graph_warmup)]
    if not args.model:  # random weights: cost per step only (see RANDOM_MODEL_TIMESTEP_FS)
        cmd += ["--no-relax", "--timestep-fs", str(RANDOM_MODEL_TIMESTEP_FS),
                "--ns-per-day-timestep-fs", "0.5"]
    return cmd


def bench_openmm(args, files: Dict[str, Path], out: Path) -> Dict:
    cmd = openmm_command(args, files, out)
    result_file = out / "openmm.json"
    if result_file.exists():
        result_file.unlink()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.openmm_timeout)
    except subprocess.TimeoutExpired as exc:
        tail = lambda b: (b.decode(errors="replace") if isinstance(b, bytes) else (b or ""))[-2000:]  # noqa: E731
        print(tail(exc.stdout), tail(exc.stderr), flush=True)
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        result["error"] = f"openmm_gpu.py ran past --openmm-timeout {args.openmm_timeout} s"
        result["stderr"] = tail(exc.stderr)
        return _openmm_note(args, result)
    print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
    if proc.returncode != 0:
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        result.update(error=f"openmm_gpu.py exited {proc.returncode}", stderr=proc.stderr[-2000:])
        return _openmm_note(args, result)
    return _openmm_note(args, json.loads(result_file.read_text()))


def _openmm_note(args, result: Dict) -> Dict:
    if not args.model:
        result.setdefault("timestep_fs", RANDOM_MODEL_TIMESTEP_FS)
        result["note"] = (f"random-weight model: timed from the lattice (no relaxation) with a "
                          f"near-zero {RANDOM_MODEL_TIMESTEP_FS:g} fs step so that no two atoms meet; "
                          "the cost per step does not depend on the step (both TransIP paths "
                          "search neighbours every step); ns/day quoted for 0.5 fs")
    return result


# ----------------------------------------------------------------------------- LAMMPS
LAMMPS_DECK = """units metal
atom_style atomic
boundary p p p
read_data {data}
plugin load {plugin}
pair_style transip device {device} edges {edges}
pair_coeff * * {model} O H
neighbor 1.0 bin
neigh_modify every 1 delay 0 check yes
timestep 0.0005
velocity all create 300.0 4928459 mom yes rot yes dist gaussian
fix 1 all nve
thermo 50
run 20
run {steps}
"""


LOOP_LINE = re.compile(r"Loop time of ([0-9.eE+-]+) on \d+ procs for (\d+) steps")
PAIR_LINE = re.compile(r"^Pair\s+\|\s*([0-9.eE+-]+)\s*\|\s*([0-9.eE+-]+)\s*\|\s*([0-9.eE+-]+)",
                       re.MULTILINE)
PHASE_LINE = re.compile(r"^TransIP per step \(ms, max over (\d+) ranks?, (\d+) steps\): (.+)$",
                        re.MULTILINE)


def lammps_runs(output: str) -> List[Dict]:
    """The runs of a LAMMPS output, in order: seconds and steps of the loop, the Pair time (max
    over ranks, s) and the plugin's per-step phases (ms, max over ranks) where printed."""
    runs = []
    for k, loop in enumerate(LOOP_LINE.finditer(output)):
        end = output.find("Loop time of", loop.end())
        block = output[loop.end():end if end >= 0 else len(output)]
        run = {"seconds": float(loop.group(1)), "steps": int(loop.group(2))}
        pair = PAIR_LINE.search(block)
        if pair:
            run["pair_seconds"] = float(pair.group(3))
        phases = PHASE_LINE.search(block)
        if phases:
            run["phase_ranks"], run["phase_steps"] = int(phases.group(1)), int(phases.group(2))
            run["phases_ms"] = {name: float(value) for name, value in
                                (item.rsplit(" ", 1) for item in phases.group(3).split(" | "))}
        runs.append(run)
    return runs


def bench_lammps(args, files: Dict[str, Path], out: Path) -> Dict:
    sys.path.insert(0, str(ROOT / "lammps_examples"))
    from make_water_box import write_lammps_data

    if not (args.lmp and args.plugin):
        raise RuntimeError("the lammps part needs --lmp and --plugin")
    rows = []
    for n_atoms, edges in itertools.product(args.lammps_sizes, args.lammps_edges):
        atoms = water_box(n_atoms // WATER_ATOMS, seed=0)
        data = out / f"water{len(atoms)}.data"
        if not data.exists():
            write_lammps_data(data, atoms)
        deck = out / f"in.water{len(atoms)}_{edges}"
        deck.write_text(LAMMPS_DECK.format(data=data, plugin=args.plugin, model=files["float32"],
                                           device=args.lammps_device, steps=args.lammps_steps,
                                           edges=edges))
        proc = subprocess.run([args.lmp, "-in", str(deck), "-log", "none"], capture_output=True,
                              text=True, timeout=args.lammps_timeout)
        runs = lammps_runs(proc.stdout)
        if proc.returncode != 0 or len(runs) < 2:
            rows.append({"atoms": len(atoms), "edges": edges,
                         "error": (proc.stdout + proc.stderr)[-1500:]})
        else:
            timed = runs[-1]
            seconds, steps = timed["seconds"], timed["steps"]
            row = {"atoms": len(atoms), "device": args.lammps_device, "edges": edges,
                   "steps": steps,
                   "seconds": seconds, "timesteps_per_s": steps / seconds,
                   "ns_per_day": steps / seconds * 0.5e-6 * 86400}
            if "pair_seconds" in timed:
                row["pair_ms"] = timed["pair_seconds"] / steps * 1e3
            if "phases_ms" in timed:
                row["phases_ms"] = timed["phases_ms"]
            rows.append(row)
        print(json.dumps(rows[-1])[:400], flush=True)
    print_lammps_table(rows)
    return {"rows": rows}


def print_lammps_table(rows: List[Dict]) -> None:
    """Steps/s and where a step's time goes (ms per step; phases of the plugin's report)."""
    names = []
    for r in rows:
        names += [n for n in r.get("phases_ms", {}) if n not in names]
    print(f"\n{'atoms':>7} {'edges':>7} {'steps/s':>8} {'Pair ms':>8} "
          + " ".join(f"{n:>9}" for n in names))
    for r in rows:
        if "error" in r:
            print(f"{r['atoms']:>7} {r.get('edges', ''):>7} failed")
            continue
        phases = r.get("phases_ms", {})
        print(f"{r['atoms']:>7} {r.get('edges', ''):>7} {r['timesteps_per_s']:>8.2f} "
              f"{r.get('pair_ms', float('nan')):>8.2f} "
              + " ".join(f"{phases.get(n, float('nan')):>9.3f}" for n in names))


# ----------------------------------------------------------------------------- main
def summary(results: Dict) -> None:
    """TransIP (best of fp32/tf32 eager, and the CUDA-graph replay) against MACE, per box."""
    nan = float("nan")

    def ratio(a, b):
        return a / b if a is not None and b else nan

    t = {r["atoms"]: r for r in results.get("transip", {}).get("rows", [])}
    m = {r["atoms"]: r for r in results.get("mace", {}).get("rows", [])}
    fused_kinds = {k[len("transip-"):]: {r["atoms"]: r for r in v.get("rows", [])}
                   for k, v in results.items() if k.startswith("transip-") and isinstance(v, dict)}
    print(f"\n{'atoms':>7} {'TransIP ms':>11} {'graph ms':>9} {'MACE ms':>8} {'MACE cueq ms':>13} "
          f"{'x plain':>8} {'x cueq':>7} {'x cueq graph':>13}")
    for n, r in t.items():
        ms = min((r[k] for k in ("fp32_ms", "tf32_ms") if r.get(k)), default=nan)
        graph = r.get("graph_ms")
        mr = m.get(n, {})
        plain, cueq = mr.get("plain_ms"), mr.get("cueq_ms")
        print(f"{n:>7} {ms:>11.2f} {graph or nan:>9.2f} {plain or nan:>8.2f} {cueq or nan:>13.2f} "
              f"{ratio(plain, ms):>8.2f} {ratio(cueq, ms):>7.2f} {ratio(cueq, graph):>13.2f}")
    for kind, rows in fused_kinds.items():
        print(f"\n{'atoms':>7} {'reference fp32 ms':>18} {kind + ' fp32 ms':>18} {'speed-up':>9} "
              f"{'reference graph ms':>19} {kind + ' graph ms':>19} {'speed-up':>9}")
        for n, r in rows.items():
            ref = t.get(n, {})
            print(f"{n:>7} {ref.get('fp32_ms', nan):>18.2f} {r.get('fp32_ms', nan):>18.2f} "
                  f"{ratio(ref.get('fp32_ms'), r.get('fp32_ms')):>9.2f} {ref.get('graph_ms') or nan:>19.2f} "
                  f"{r.get('graph_ms') or nan:>19.2f} {ratio(ref.get('graph_ms'), r.get('graph_ms')):>9.2f}")
    sizes = sorted(set(t).union(*[set(rows) for rows in fused_kinds.values()]))
    if sizes:  # the CUDA-graph replays against MACE with cuEquivariance kernels
        print(f"\n{'atoms':>7} {'graph ms':>9} {'best fused graph ms':>20} {'MACE cueq ms':>13} "
              f"{'cueq / graph':>13} {'cueq / fused graph':>19}")
        for n in sizes:
            graph = t.get(n, {}).get("graph_ms")
            fgraph = min((rows[n]["graph_ms"] for rows in fused_kinds.values()
                          if rows.get(n, {}).get("graph_ms")), default=None)
            cueq = m.get(n, {}).get("cueq_ms")
            print(f"{n:>7} {graph or nan:>9.2f} {fgraph or nan:>20.2f} {cueq or nan:>13.2f} "
                  f"{ratio(cueq, graph):>13.2f} {ratio(cueq, fgraph):>19.2f}")
            best = min((v for v in (graph, fgraph) if v), default=None)
            if best and cueq:
                print(f"{'':>7} {n} atoms: TransIP CUDA graph {best:.2f} ms vs MACE cuEq {cueq:.2f} ms "
                      f"(MACE cuEq / TransIP graph = {cueq / best:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="transip,profile,mace,openmm,lammps")
    p.add_argument("--size", default="s", help="named TransIP size for the random model")
    p.add_argument("--model", default=None, help="an exported float32 file instead (float64 sibling for errors: --model64)")
    p.add_argument("--model64", default=None)
    p.add_argument("--kernels", default="reference",
                   help="comma list of reference, fused, fused-qkv: which exports the TransIP parts time")
    p.add_argument("--model-fused", default=None, help="with --model and --kernels ...fused: the "
                   "fused float32 export of the same model")
    p.add_argument("--sizes", type=int, nargs="+", default=[1536, 6144, 24576])
    p.add_argument("--variants", default="fp32,tf32,lowmem,graph",
                   help="comma list of the transip part's variants (fp32, tf32, lowmem, graph)")
    p.add_argument("--largest", action="store_true", help="also the largest box that fits (doubling)")
    p.add_argument("--accuracy-max-atoms", type=int, default=6144)
    p.add_argument("--openmm-sizes", type=int, nargs="+", default=[1536, 6144])
    p.add_argument("--openmm-timeout", type=int, default=300)
    p.add_argument("--openmm-kernels", default=None,
                   help="the --kernels entries the openmm part runs for (default: all of them)")
    p.add_argument("--nvrtc-stub", default=None, help="preload this libnvrtc.so.12 (test machines)")
    p.add_argument("--graph-warmup", type=int, default=3, help="OpenMM-Torch CUDAGraphWarmupSteps")
    p.add_argument("--graph-capture-warmup", type=int, default=5,
                   help="transip part, graph variant: eager calls before the CUDA graph is captured")
    p.add_argument("--lmp", default=None, help="LAMMPS executable (lammps part)")
    p.add_argument("--plugin", default=None, help="transipplugin.so (lammps part)")
    p.add_argument("--lammps-sizes", type=int, nargs="+", default=[1536, 6144])
    p.add_argument("--lammps-steps", type=int, default=100)
    p.add_argument("--lammps-timeout", type=int, default=300)
    p.add_argument("--lammps-device", default="cuda", help="pair_style transip device (lammps part)")
    p.add_argument("--lammps-edges", nargs="+", default=["auto"], choices=["auto", "host", "device"],
                   help="pair_style transip edges values to time (lammps part; each size runs "
                        "once per value)")
    p.add_argument("--out", default="runs/gpu_bench")
    args = p.parse_args()
    args.variants = args.variants.split(",")
    args.openmm_kernels = (args.openmm_kernels or args.kernels).split(",")
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA GPU")
    device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    results: Dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        kernels = args.kernels.split(",")
        if args.model:
            files = {"float32": Path(args.model), "float64": Path(args.model64 or args.model)}
            if args.model_fused:
                files["fused-float32"] = Path(args.model_fused)
        else:
            files = random_model_files(args.size, Path(tmp),
                                       fused=[k for k in kernels if k != "reference"])
        jobs = []
        for kernel in kernels:
            if kernel == "reference":
                kfiles, suffix = files, ""
            elif f"{kernel}-float32" in files:  # fused, fused-qkv
                kfiles = {"float32": files[f"{kernel}-float32"], "float64": files["float64"]}
                suffix = f"-{kernel}"
                (out / kernel).mkdir(exist_ok=True)  # its openmm.json, LAMMPS decks
            else:
                results[f"kernels-{kernel}"] = {"error": f"no {kernel} export (see --kernels)"}
                continue
            kout = out if kernel == "reference" else out / kernel
            jobs += [("transip", suffix, lambda f=kfiles: bench_transip(args, f, device)),
                     ("profile", suffix, lambda f=kfiles: profile_transip(args, f, device)),
                     ("openmm" if kernel in args.openmm_kernels else "openmm-skipped", suffix,
                      lambda f=kfiles, o=kout: bench_openmm(args, f, o)),
                     ("lammps", suffix, lambda f=kfiles, o=kout: bench_lammps(args, f, o))]
        jobs.insert(2, ("mace", "", lambda: bench_mace(args, device)))
        for part, suffix, fn in jobs:
            if part not in parts:
                continue
            try:
                results[part + suffix] = fn()
            except Exception as exc:
                traceback.print_exc()
                results[part + suffix] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            (out / "gpu_bench.json").write_text(json.dumps(results, indent=1))
    summary(results)


if __name__ == "__main__":
    main()
