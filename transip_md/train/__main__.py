"""``python -m transip_md.train --config transip-s --train train.extxyz --val val.extxyz --out runs/s``"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..cli import run_cli
from ..data import read_frames
from .config import TRAINING_MODES, load_config
from .trainer import Trainer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m transip_md.train", description=__doc__)
    p.add_argument("--config", required=True,
                   help="shipped config name (transip-tiny, transip-xs, transip-s, transip-m) or a YAML path")
    p.add_argument("--train", required=True, nargs="+", help="training frames (.extxyz, .db, .aselmdb; several files are joined)")
    p.add_argument("--val", required=True, nargs="+", help="validation frames (one or more files)")
    p.add_argument("--out", required=True, help="run directory (ckpt.pt, last.pt, history.json, learning_curve.png)")
    p.add_argument("--mode", choices=TRAINING_MODES, help="override training.mode")
    p.add_argument("--epochs", type=int, help="override training.epochs")
    p.add_argument("--max-steps", type=int, help="override training.max_steps")
    p.add_argument("--device", help="override training.device (auto, cpu, cuda, cuda:1)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="override training.dtype")
    p.add_argument("--seed", type=int, help="override training.seed")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    model_cfg, cfg = load_config(args.config)
    for key in ("mode", "epochs", "max_steps", "device", "dtype", "seed"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    cfg.__post_init__()
    train = [f for path in args.train for f in read_frames(path)]
    val = [f for path in args.val for f in read_frames(path)]
    provenance = {"train_data": [Path(p).name for p in args.train],
                  "val_data": [Path(p).name for p in args.val], "config_name": args.config}
    trainer = Trainer(model_cfg, cfg, train, val, Path(args.out), progress=not args.no_progress,
                      provenance=provenance)
    if args.resume:
        trainer.resume()
    ckpt = trainer.run()
    last = trainer.history[-1] if trainer.history else {}
    print(f"checkpoint: {ckpt}")
    if last:
        print(f"final validation: energy MAE {last['val_energy_mae_mev_per_atom']:.2f} meV/atom, "
              f"force MAE {last['val_force_mae_mev_per_A']:.1f} meV/Å")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
