"""Evaluate a checkpoint on labelled frames.

  python -m transip_md.evaluate runs/s/ckpt.pt data/test.extxyz --json runs/s/test.json

Prints energy MAE (meV/atom), force MAE (meV/Å), the equivariance error over random rotations
and a per-source breakdown; ``--json`` writes the same numbers (atomically).
"""

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

import torch

from .atomic_io import atomic_output, check_output_path
from .checkpoint import load_checkpoint
from .cli import run_cli
from .data import read_frames
from .metrics import accuracy, equivariance_error


def evaluate(ckpt_path: str, data_path: str, rotations: int = 8, device: str = "cpu",
             max_eq_frames: int = 64) -> Dict[str, Any]:
    ckpt = load_checkpoint(ckpt_path, map_location=device)
    model = ckpt.potential.to(device)
    frames = read_frames(data_path)
    if not frames:
        raise ValueError(f"{data_path} contains no frames")
    unknown = sorted({int(z) for f in frames for z in f.numbers} - {
        int(z) for z in torch.nonzero(model.supported_elements).flatten()})
    if unknown:
        from ase.data import chemical_symbols
        raise ValueError(f"{data_path} contains elements the model does not know: "
                         + ", ".join(chemical_symbols[z] for z in unknown))
    acc = accuracy(model, frames)
    eq = equivariance_error(model, frames, n_rotations=rotations, max_frames=max_eq_frames)
    return {"checkpoint": str(ckpt_path), "data": str(data_path), **acc, "equivariance_error": eq,
            "training_mode": ckpt.training.get("mode")}


def print_report(result: Dict[str, Any]) -> None:
    eq = result["equivariance_error"]
    print(f"{'source':<20} {'frames':>7} {'E MAE meV/atom':>15} {'F MAE meV/Å':>13}")
    for name, row in sorted(result["per_source"].items()):
        print(f"{name:<20} {row['frames']:>7} {row['energy_mae_mev_per_atom']:>15.3f} {row['force_mae_mev_per_A']:>13.2f}")
    print(f"{'ALL':<20} {result['frames']:>7} {result['energy_mae_mev_per_atom']:>15.3f} {result['force_mae_mev_per_A']:>13.2f}")
    print(f"equivariance error ({eq['rotations']} rotations, {eq['frames']} frames): "
          f"|E(Rx)-E(x)| = {eq['energy_mev_per_atom']:.4f} meV/atom, "
          f"|F(Rx)-R F(x)|/|F(x)| = {eq['force_relative']:.4f}")


def write_json_atomic(data: Dict[str, Any], path: str) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transip_md.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("data", help="labelled frames (.extxyz, .db, .aselmdb)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--rotations", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.json:
        check_output_path(args.json)
    result = evaluate(args.checkpoint, args.data, args.rotations, args.device)
    print_report(result)
    if args.json:
        write_json_atomic(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
