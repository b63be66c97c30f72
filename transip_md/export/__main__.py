"""Export a TransIP training checkpoint to one self-contained TorchScript file.

  python -m transip_md.export runs/s/ckpt.pt model.pt            # float32 (default)
  python -m transip_md.export runs/s/ckpt.pt model64.pt --dtype float64
  python -m transip_md.export model.pt                            # the shipped model transip-demo
  python -m transip_md.export transip-demo model.pt               # the same, by name
  python -m transip_md.export runs/s/ckpt.pt model.pt --force     # replace a previous export
  python -m transip_md.export --info model.pt                     # print metadata, run nothing
  python -m transip_md.export runs/s/ckpt.pt fast.pt --kernels fused  # the compiled fast path

The output is always the LAST path. Export writes only new files or previous exports: an
existing exported transip-md model is replaced only with --force, and anything else (a
training checkpoint, data, a text file) is never written over, --force or not. The new file is
written beside the output, checked against the eager model, and only then renamed into place,
so a failed check leaves an existing file as it was.

--kernels reference (default) writes pure TorchScript, loadable by any engine with a matching
torch. --kernels fused writes the fast path: each attention layer calls the fused operator
transip_ops::neighbor_attention. Exporting builds that library (a C++ compiler and the torch
headers; or set TRANSIP_OPS_LIBRARY to a built libtransip_ops.so), the file declares
operator_library "transip_ops", and every engine that loads it must load the library too: the
Python door, the ASE calculator and OpenMM do it themselves; the LAMMPS plugin and the check
program use TRANSIP_OPS_LIBRARY or the library path compiled into them. The check compares a
fused export with the eager reference model. Training always runs the reference path.
--kernels fused-qkv is the same with the per-token key/value operator
transip_ops::neighbor_attention_qkv (8x fewer multiply-adds per neighbour on the token side)
and the edge encoder through transip_ops::edge_encoder (recomputed in the backward): 0.6x the
peak memory of fused (benchmarks/memory_profile.py) and the fastest kind on GPUs (TransIP-S
on an H200: 53 ms per energy+forces call at 24,576 atoms with a CUDA graph, reference
120; benchmarks/gpu_bench.py). Prefer it wherever the library builds.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from ..cli import run_cli
from .checkpoint_export import (DEFAULT_MODEL_NAME, KERNELS, check_export_target,
                                export_checkpoint, resolve_checkpoint)
from .model_file import read_metadata


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m transip_md.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help=f"[CHECKPOINT] OUTPUT (checkpoint defaults to the shipped '{DEFAULT_MODEL_NAME}'), "
                        "or with --info one exported file")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it is a previous export (nothing else is ever replaced)")
    p.add_argument("--info", action="store_true", help="print the metadata of an exported file")
    p.add_argument("--json", action="store_true", help="with --info: print raw JSON")
    p.add_argument("--no-check", action="store_true", help="skip the eager-vs-exported fidelity check")
    p.add_argument("--kernels", choices=KERNELS, default="reference",
                   help="reference: pure TorchScript, loads anywhere (default); fused, "
                        "fused-qkv: the compiled fast path, needs the transip_ops library "
                        "wherever the file is loaded (built on first use; see above)")
    return p


def print_info(meta: dict) -> None:
    eq = meta.get("equivariance_error") or {}
    val = meta.get("validation") or {}
    training = meta.get("training") or {}
    rows = [
        ("format", f"{meta['kind']} v{meta['format_version']} (transip-md {meta['transip_md_version']}, torch {meta['torch_version']})"),
        ("model", meta.get("model_name", "?")),
        ("dtype", meta["dtype"]),
        ("kernels", f"fused (needs the operator library {meta['operator_library']})"
                    if meta.get("operator_library") else "reference (no operator library)"),
        ("elements", " ".join(meta["elements"])),
        ("cutoff", f"{meta['cutoff']} Å"),
        ("layers", str(meta["num_layers"])),
        ("receptive field", f"{meta['receptive_field']} Å (layers x cutoff)"),
        ("units python", ", ".join(f"{k} {v}" for k, v in meta["units"]["python"].items())),
        ("units openmm", "positions nm, box nm, energy kJ/mol"),
        ("units lammps", "metal (Å, eV, eV/Å)"),
        ("config", json.dumps(meta.get("model_config", {}))),
        ("training", f"mode {training.get('mode', '?')}, {training.get('steps', '?')} steps, "
                     f"{training.get('train_frames', '?')} frames from {training.get('train_data', '?')}"),
        ("validation", f"energy MAE {val.get('energy_mae_mev_per_atom', float('nan')):.3g} meV/atom, "
                       f"force MAE {val.get('force_mae_mev_per_A', float('nan')):.3g} meV/Å"),
        ("equivariance", f"|E(Rx)-E(x)| {eq.get('energy_mev_per_atom', float('nan')):.3g} meV/atom, "
                         f"|F(Rx)-RF(x)|/|F| {eq.get('force_relative', float('nan')):.3g}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:>{width}}  {value}")


def split_paths(paths: List[str]) -> Tuple[Optional[str], str]:
    """(checkpoint or None for the shipped model, output) from the positional paths."""
    if len(paths) == 2:
        return paths[0], paths[1]
    if len(paths) != 1:
        raise ValueError("give CHECKPOINT OUTPUT, or only OUTPUT to export the shipped model")
    if paths[0] == DEFAULT_MODEL_NAME and not Path(paths[0]).exists():
        raise ValueError(f"{DEFAULT_MODEL_NAME} names the shipped model; give an output path too: "
                         f"python -m transip_md.export {DEFAULT_MODEL_NAME} model.pt")
    return None, paths[0]


def show_info(args: argparse.Namespace) -> int:
    if len(args.paths) != 1:
        raise ValueError("--info takes exactly one exported model file")
    meta = read_metadata(args.paths[0])
    print(json.dumps(meta, indent=1, sort_keys=True)) if args.json else print_info(meta)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.info:
        return show_info(args)
    ckpt, out = split_paths(args.paths)
    check_export_target(out, replace_export=args.force)  # first: the output may be precious
    ckpt_path = resolve_checkpoint(ckpt)
    if ckpt is None:
        print(f"exporting the shipped model {DEFAULT_MODEL_NAME} ({ckpt_path}) to {out}", flush=True)
    meta = export_checkpoint(ckpt_path, out, dtype=args.dtype, check=not args.no_check,
                             replace_export=args.force, kernels=args.kernels)
    fid = meta.get("fidelity_check")
    check = (f"; exported = eager to {max(fid.values()):.1e} relative" if fid else "")
    kernels = "fused, needs transip_ops" if meta.get("operator_library") else "reference"
    print(f"wrote {out} ({meta['dtype']}, {kernels}, elements {' '.join(meta['elements'])}, cutoff {meta['cutoff']} Å{check})")
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
