"""Peak memory of one energy+forces call, and what is alive at the peak, on the CPU.

  python benchmarks/memory_profile.py --size s --atoms 1536 --kernels reference,fused,fused-qkv

A random TransIP model of ``--size`` is exported once per kernel kind (as gpu_bench.py does),
and each file's ``compute(..., forces=True)`` on a periodic water box runs once under the torch
profiler with ``profile_memory=True``. From the profiler's allocation events (address, size,
time, the op that allocated) the script replays the heap: the peak is the largest sum of live
bytes, and the tensors alive at that moment are grouped by the op chain that allocated them.

Why on the CPU: the same autograd graph saves the same tensors on any device, so the peak
follows the GPU's ``torch.cuda.max_memory_allocated`` closely (2026-12-01, TransIP-S, 1,536
atoms: CPU 3.09 vs H200 3.08 GiB per 10k atoms for ``fused``, 8.04 vs 8.12 for ``reference``),
and it can be studied where there is no GPU. It is a proxy: CUDA kernels' own scratch and the
caching allocator's rounding are not in it. Not a test; prints a table and writes JSON
(``--out``, default ``benchmarks/results/memory_profile_cpu.json``).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import box_tensors, random_model_files  # noqa: E402

from transip_md.export import load_exported  # noqa: E402

KiB = 1024.0
GiB = 1024.0 ** 3


def _allocations(prof) -> List[tuple]:
    """(time_ns, address, bytes (+ alloc / - free), 'op<parent<grandparent') of every event."""
    out = []

    def walk(ev):
        fields = ev.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation":
            chain, p = [], ev.parent
            while p is not None and len(chain) < 3:
                chain.append(p.name)
                p = p.parent
            out.append((ev.start_time_ns, fields.ptr, fields.alloc_size, "<".join(chain)))
        for child in ev.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    return sorted(out)


def peak_and_live(prof):
    """(peak bytes above the start, {who: [bytes, count]} alive at the peak)."""
    live: Dict[int, tuple] = {}
    current = peak = 0
    at_peak: Dict[int, tuple] = {}
    for _, ptr, size, who in _allocations(prof):
        if size > 0:
            live[ptr] = (size, who)
        else:
            live.pop(ptr, None)
        current += size
        if current > peak:
            peak, at_peak = current, dict(live)
    groups: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
    for size, who in at_peak.values():
        groups[who][0] += size
        groups[who][1] += 1
    return peak, dict(groups)


def profile_file(path: Path, n_atoms: int, top: int) -> Dict:
    model = load_exported(path)
    model.check_inputs = False  # as engines run in production
    atoms, inputs = box_tensors(n_atoms, torch.device("cpu"), torch.float32)
    model.compute(*inputs, True, False)  # warm-up: TorchScript's profiling executor
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        out = model.compute(*inputs, True, False)
    peak, groups = peak_and_live(prof)
    n = len(atoms)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"atoms": n, "peak_bytes": peak, "peak_kib_per_atom": peak / n / KiB,
            "gib_per_10k_atoms": peak * 1e4 / n / GiB,
            "energy_ev": float(out["energy"]),
            "alive_at_peak": [{"allocated_by": who, "kib_per_atom": size / n / KiB, "tensors": count}
                              for who, (size, count) in ranked]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="s")
    p.add_argument("--atoms", type=int, nargs="+", default=[1536])
    p.add_argument("--kernels", default="reference,fused,fused-qkv")
    p.add_argument("--top", type=int, default=12, help="allocating op chains listed per run")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "memory_profile_cpu.json"))
    args = p.parse_args(argv)
    kernels = args.kernels.split(",")
    results = {"size": args.size, "torch": torch.__version__, "machine": platform.machine(),
               "command": "python benchmarks/memory_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = random_model_files(args.size, Path(tmp), fused=[k for k in kernels if k != "reference"])
        for n_atoms in args.atoms:
            for kernel in kernels:
                key = "float32" if kernel == "reference" else f"{kernel}-float32"
                run = {"kernels": kernel, **profile_file(files[key], n_atoms, args.top)}
                results["runs"].append(run)
                print(f"\n{kernel}, {run['atoms']} atoms: peak {run['peak_bytes'] / 2**20:.1f} MiB = "
                      f"{run['peak_kib_per_atom']:.1f} KiB/atom = {run['gib_per_10k_atoms']:.2f} GiB per 10k atoms")
                for row in run["alive_at_peak"]:
                    print(f"  {row['kib_per_atom']:8.1f} KiB/atom {row['tensors']:4d} tensors  {row['allocated_by'][:100]}")
    energies = {r["kernels"]: r["energy_ev"] for r in results["runs"]}
    print("\nenergies (eV), the same function in every kind:", energies)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=1))
    tmp_out.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
