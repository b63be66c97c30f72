"""Evaluate a checkpoint or an exported model file on labelled frames.

  python -m transip_md.evaluate runs/s/ckpt.pt data/test.extxyz --json runs/s/test.json
  python -m transip_md.evaluate model.pt data/test.extxyz     # the exported file engines run

Prints energy MAE (meV/atom), force MAE (meV/Å), the equivariance error over random rotations
and a per-source breakdown; ``--json`` writes the same numbers (atomically).
"""

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import file_kinds
from .atomic_io import atomic_output, check_output_path
from .batch import Batch
from .checkpoint import load_checkpoint
from .cli import run_cli
from .data import read_frames
from .metrics import accuracy, equivariance_error


class ExportedModel:
    """An exported file seen through what metrics.py uses: ``network`` (its parameters' device
    and dtype), ``cutoff``, ``supported_elements`` and ``predict_batch``, which evaluates each
    system of a batch through the file's scripted ``compute`` entry point, as engines do."""

    def __init__(self, module: torch.jit.ScriptModule):
        self.module = module
        self.network = module.network
        self.cutoff = float(module.cutoff)
        self.supported_elements = module.supported_elements

    def predict_batch(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        energies, forces = [], []
        start = 0
        for b, n in enumerate(batch.n_atoms.tolist()):
            atoms = slice(start, start + n)
            out = self.module.compute(batch.positions[atoms], batch.numbers[atoms], batch.cell[b],
                                      batch.pbc[b], batch.charge[b], batch.spin[b], True, False)
            energies.append(out["energy"])
            forces.append(out["forces"])
            start += n
        return torch.stack(energies), torch.cat(forces)


def load_model(path: str, device: str = "cpu") -> Tuple[Any, str, Optional[str]]:
    """(model for metrics.py, file kind, training mode) of a checkpoint or exported file."""
    if file_kinds.sniff(path) == file_kinds.EXPORTED:
        from .export import load_exported, read_metadata

        mode = (read_metadata(path).get("training") or {}).get("mode")
        return ExportedModel(load_exported(path, device=device, needs=("compute",), who="evaluate")), "exported", mode
    ckpt = load_checkpoint(path, map_location=device)  # names any other kind of file
    return ckpt.potential.to(device), "checkpoint", ckpt.training.get("mode")


def evaluate(ckpt_path: str, data_path: str, rotations: int = 8, device: str = "cpu",
             max_eq_frames: int = 64) -> Dict[str, Any]:
    """Accuracy and equivariance of a checkpoint or exported model file on ``data_path``."""
    model, kind, mode = load_model(ckpt_path, device)
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
    return {"checkpoint": str(ckpt_path), "model_kind": kind, "data": str(data_path), **acc,
            "equivariance_error": eq, "training_mode": mode}


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
    p.add_argument("checkpoint", help="a training checkpoint (ckpt.pt) or an exported model file")
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
