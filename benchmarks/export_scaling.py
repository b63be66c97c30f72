"""How an exported model file scales with system size: periodic water boxes of ~1k to ~64k atoms.

    python benchmarks/export_scaling.py --size tiny                        # random tiny model, float32, CPU
    python benchmarks/export_scaling.py --size xs --sizes 1000 4000 16000
    python benchmarks/export_scaling.py --model model.pt --device cuda --json scaling.json

Per size it times, on the exported (TorchScript) file loaded with ``load_exported``:
  * the neighbour list alone (``neighbor_pairs``, scripted, as inside the file),
  * energy + forces (``compute(..., compute_forces=True)``, neighbour list included),
as the median of ``--repeats`` runs after ``--warmup`` runs. Columns: "E+F ms" wall time,
"E+F cpu" process CPU time (user + sys, all threads; on a shared machine the steadier number),
"peak MB" the peak memory of one energy+forces call above what was in use before it (CPU:
resident set via /proc's VmHWM after resetting it, else ``ru_maxrss``; CUDA:
``torch.cuda.max_memory_allocated``), "faults" minor page faults per call (fresh memory touched;
glibc hands allocations above 32 MB back to the OS on free, so big tensors are re-faulted on
every call unless ``--keep-freed-memory``), and "x4" the time ratio between consecutive sizes
rescaled to a 4x step in atoms (4.0 = linear scaling).
"""

import argparse
import ctypes
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transip_md.systems import water_box  # noqa: E402

from transip_md.export import export_potential, load_exported  # noqa: E402
from transip_md.model import TransIPPotential, named_config  # noqa: E402
from transip_md.model.neighbors import neighbor_pairs  # noqa: E402

DEFAULT_SIZES = [1000, 4000, 16000, 64000]


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory (bytes) of a block of work above what was in use when it started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else self._cpu_method()
        self._libc = None
        if device.type == "cpu":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                pass

    @staticmethod
    def _cpu_method() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size (VmHWM), Linux >= 4.0
            return "proc VmHWM"
        except OSError:
            return "ru_maxrss delta"

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)  # hand freed heap back, so the baseline is what is in use
        if self.method == "proc VmHWM":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = self._status_kb("VmRSS") * 1024
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.method == "proc VmHWM":
            return self._status_kb("VmHWM") * 1024 - self._base
        # Only an increase of the process-lifetime peak is visible this way (a lower bound).
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base


# ----------------------------------------------------------------------------- timing
def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Dict[str, float]:
    """Medians over ``repeats`` calls after ``warmup``: wall ms, process CPU ms (user + sys, all
    threads) and minor page faults per call (fresh memory touched)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    wall, cpu, faults = [], [], []
    for _ in range(repeats):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"wall_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu),
            "minor_faults": statistics.median(faults)}


def keep_freed_memory() -> None:
    """glibc: serve every allocation from the heap and never give freed memory back, so that big
    tensors do not cost fresh zeroed pages (page faults) on every call; same effect as
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge> in the environment."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2 ** 31 - 1)):
        raise RuntimeError("mallopt failed")


def random_model_file(size: str, dtype: str, directory: str, seed: int = 0) -> str:
    """Export a randomly initialised model of a named size (timings do not depend on weights)."""
    torch.manual_seed(seed)
    potential = TransIPPotential(named_config(size))
    potential.supported_elements[[1, 6, 7, 8]] = True
    potential.network.energy_scale.data.fill_(3.0)
    path = os.path.join(directory, f"transip-{size}-random-{dtype}.pt")
    export_potential(potential.eval(), path, dtype=dtype)
    return path


def x4_ratio(t_prev: float, t: float, n_prev: int, n: int) -> float:
    """Time ratio between two sizes rescaled to a 4x step in atoms."""
    return (t / t_prev) ** (math.log(4.0) / math.log(n / n_prev))


def run(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or random_model_file(args.size, args.dtype, tmp)
        model = load_exported(model_path, device)
    dtype = next(model.parameters()).dtype
    cutoff = float(model.cutoff)
    nl = torch.jit.script(neighbor_pairs)
    memory = PeakMemory(device)
    charge, spin = torch.tensor(0), torch.tensor(1)

    header = {
        "model": args.model or f"random transip-{args.size}",
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cutoff": cutoff,
        "layers": int(model.num_layers),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "memory_method": memory.method,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "keep_freed_memory": bool(args.keep_freed_memory),
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    print("# " + ", ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    print(f"{'atoms':>7} {'pairs':>9} {'nlist ms':>9} {'E+F ms':>9} {'E+F cpu':>9} {'us/atom':>8} "
          f"{'peak MB':>8} {'faults':>8} {'nlist x4':>8} {'E+F x4':>7} {'cpu x4':>7}", flush=True)

    rows: List[Dict[str, object]] = []
    for target in args.sizes:
        atoms = water_box(max(1, round(target / 3)), seed=args.seed)
        pos = torch.tensor(atoms.positions, dtype=dtype, device=device)
        numbers = torch.tensor(atoms.numbers, dtype=torch.long, device=device)
        cell = torch.tensor(np.asarray(atoms.cell), dtype=dtype, device=device)
        pbc = torch.tensor(atoms.pbc, dtype=torch.bool, device=device)
        row: Dict[str, object] = {"target_atoms": target, "atoms": len(atoms)}
        try:
            i, _, _ = nl(pos, cell, pbc, cutoff)
            row["pairs"] = int(i.shape[0])
            del i
            row["neighbor_ms"] = timed(lambda: nl(pos, cell, pbc, cutoff), device,
                                       args.warmup, args.repeats)["wall_ms"]

            def energy_forces():
                return model.compute(pos, numbers, cell, pbc, charge, spin, True, False)

            for _ in range(args.warmup):
                energy_forces()
            memory.start()
            out = energy_forces()
            row["peak_mb"] = memory.stop() / 2 ** 20
            row["energy_ev"] = float(out["energy"])
            del out
            t = timed(energy_forces, device, 0, args.repeats)
            row["energy_forces_ms"] = t["wall_ms"]
            row["energy_forces_cpu_ms"] = t["cpu_ms"]
            row["minor_faults_per_call"] = t["minor_faults"]
        except (RuntimeError, MemoryError) as exc:  # e.g. CUDA out of memory: report, stop
            row["error"] = str(exc).strip().splitlines()[-1]
            print(f"{len(atoms):>7}  failed: {row['error']}", flush=True)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        prev = rows[-1] if rows and "error" not in rows[-1] else None
        if prev is not None:
            row["neighbor_x4"] = x4_ratio(prev["neighbor_ms"], row["neighbor_ms"], prev["atoms"], row["atoms"])
            row["energy_forces_x4"] = x4_ratio(prev["energy_forces_ms"], row["energy_forces_ms"],
                                               prev["atoms"], row["atoms"])
            row["energy_forces_cpu_x4"] = x4_ratio(prev["energy_forces_cpu_ms"], row["energy_forces_cpu_ms"],
                                                   prev["atoms"], row["atoms"])
        row["us_per_atom"] = row["energy_forces_ms"] * 1e3 / row["atoms"]
        rows.append(row)
        fmt = lambda key, spec: (format(row[key], spec) if key in row  # noqa: E731
                                 else "-".rjust(int(re.match(r"\d+", spec).group())))
        print(f"{row['atoms']:>7} {row['pairs']:>9} {fmt('neighbor_ms', '9.1f')} "
              f"{fmt('energy_forces_ms', '9.1f')} {fmt('energy_forces_cpu_ms', '9.1f')} "
              f"{fmt('us_per_atom', '8.1f')} {fmt('peak_mb', '8.0f')} {fmt('minor_faults_per_call', '8.0f')} "
              f"{fmt('neighbor_x4', '8.2f')} {fmt('energy_forces_x4', '7.2f')} "
              f"{fmt('energy_forces_cpu_x4', '7.2f')}", flush=True)
    header["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    print(f"# load average (1 min) at start {header['load_average_1min']}, at end "
          f"{header['load_average_1min_end']} on {os.cpu_count()} CPUs")
    return {"config": header, "results": rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="an exported model file (default: a random model of --size)")
    src.add_argument("--size", default="tiny", help="named model size for a random model (tiny, xs, s, ...)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the random model (an exported --model keeps its own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, metavar="ATOMS",
                   help="target atom counts (rounded to whole water molecules)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU, glibc: never return freed memory to the OS (no page faults per call)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
