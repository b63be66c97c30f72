"""Learned equivariance (TransIP) vs rotation augmentation vs nothing, at several data sizes.

Same architecture, same number of optimiser steps and the same data for every mode; evaluated
on a held-out test split. Prints a table and writes JSON.

  python benchmarks/equivariance_study.py --train data/organics/train.extxyz \
      --val data/organics/val.extxyz --test data/organics/test.extxyz \
      --sizes 250 1000 4000 --modes learned augment --steps 1500 --config transip-xs \
      --device cuda --json study.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from transip_md.checkpoint import load_checkpoint
from transip_md.data import read_frames
from transip_md.metrics import accuracy, equivariance_error
from transip_md.train import Trainer, load_config


def run_one(model_cfg, train_cfg, train, val, test, out_dir: Path, progress: bool):
    start = time.time()
    trainer = Trainer(model_cfg, train_cfg, train, val, out_dir, progress=progress,
                      provenance={"study": "equivariance"})
    ckpt = load_checkpoint(trainer.run(), map_location=str(trainer.device))
    model = ckpt.potential.to(trainer.device)
    acc = accuracy(model, test)
    eq = equivariance_error(model, test, n_rotations=8, seed=123)
    return {"energy_mae_mev_per_atom": acc["energy_mae_mev_per_atom"],
            "force_mae_mev_per_A": acc["force_mae_mev_per_A"],
            "eq_energy_mev_per_atom": eq["energy_mev_per_atom"],
            "eq_force_relative": eq["force_relative"],
            "steps": trainer.step, "train_seconds": time.time() - start}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000])
    p.add_argument("--modes", nargs="+", default=["learned", "augment"])
    p.add_argument("--config", default="transip-xs")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps per run (same for all)")
    p.add_argument("--batch-atoms", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-val", type=int, default=200)
    p.add_argument("--out", default="runs/equivariance_study")
    p.add_argument("--json", default=None)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    train_all = read_frames(args.train)
    val = read_frames(args.val)[: args.max_val]
    test = read_frames(args.test)
    order = rng.permutation(len(train_all))
    rows = []
    for size in args.sizes:
        if size > len(train_all):
            raise SystemExit(f"size {size} exceeds the {len(train_all)} training frames")
        subset = [train_all[k] for k in order[:size]]  # nested subsets: smaller ⊂ larger
        for mode in args.modes:
            model_cfg, cfg = load_config(args.config)
            cfg.mode, cfg.max_steps, cfg.epochs = mode, args.steps, 10**6
            cfg.batch_atoms, cfg.device, cfg.seed = args.batch_atoms, args.device, args.seed
            cfg.warmup_steps = min(cfg.warmup_steps, args.steps // 10)
            cfg.val_interval_steps = max(1, args.steps // 10)
            result = run_one(model_cfg, cfg, subset, val, test,
                             Path(args.out) / f"{mode}-{size}", args.progress)
            rows.append({"train_frames": size, "mode": mode, **result})
            print(json.dumps(rows[-1]), flush=True)

    header = (f"{'frames':>7} {'mode':>8} {'E MAE meV/atom':>15} {'F MAE meV/Å':>12} "
              f"{'eq |dE| meV/atom':>17} {'eq |dF|/|F|':>12} {'train s':>8}")
    print("\n" + header)
    for r in rows:
        print(f"{r['train_frames']:>7} {r['mode']:>8} {r['energy_mae_mev_per_atom']:>15.2f} "
              f"{r['force_mae_mev_per_A']:>12.1f} {r['eq_energy_mev_per_atom']:>17.3f} "
              f"{r['eq_force_relative']:>12.4f} {r['train_seconds']:>8.0f}")
    by = {(r["train_frames"], r["mode"]): r for r in rows}
    if "learned" in args.modes and "augment" in args.modes:
        print("\nforce-MAE change of learned vs augment:")
        for size in args.sizes:
            a, b = by[(size, "augment")], by[(size, "learned")]
            change = 100.0 * (b["force_mae_mev_per_A"] - a["force_mae_mev_per_A"]) / a["force_mae_mev_per_A"]
            print(f"  {size:>6} frames: {change:+.1f} %")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
