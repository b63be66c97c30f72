"""``python -m transip_md.train --config transip-s --train train.extxyz --val val.extxyz --out runs/s``

Prints one row per validation (epoch, step, mean training loss of the epoch, validation energy
and force MAE, learning rate, elapsed time; ``*`` marks a new best, which is what ckpt.pt then
holds) and closes with the best and the last epoch.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from ..cli import run_cli
from ..data import read_frames
from .config import TRAINING_MODES, load_config
from .trainer import Trainer, format_summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m transip_md.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="shipped config name (transip-tiny, transip-xs, transip-s, transip-m) or a YAML path")
    p.add_argument("--train", required=True, nargs="+", help="training frames (.extxyz, .db, .aselmdb; several files are joined)")
    p.add_argument("--val", required=True, nargs="+", help="validation frames (one or more files)")
    p.add_argument("--out", required=True, help="run directory (ckpt.pt, last.pt, history.json, learning_curve.png)")
    p.add_argument("--name", help="model name stored in the checkpoint and shown by exported files "
                                  "(default: 'CONFIG (OUT)', e.g. 'transip-s (runs/s)')")
    p.add_argument("--mode", choices=TRAINING_MODES, help="override training.mode")
    p.add_argument("--epochs", type=int, help="override training.epochs")
    p.add_argument("--max-steps", type=int, help="override training.max_steps")
    p.add_argument("--device", help="override training.device (auto, cpu, cuda, cuda:1)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="override training.dtype")
    p.add_argument("--seed", type=int, help="override training.seed")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-epoch rows stay)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch rows; only the summary")
    return p


def data_files(train: List[str], val: List[str]) -> dict:
    """The data files for the checkpoint's provenance: as given (normalised, so that
    data/organics/train.extxyz and data/water/train.extxyz stay distinct), each once. A file
    listed twice under one option is an error (it would be read twice); one used for both
    training and validation gets a warning (the validation MAE is then not held out)."""
    def resolved(path: str) -> Path:
        return Path(path).expanduser().resolve()

    for option, paths in (("--train", train), ("--val", val)):
        seen = set()
        for path in paths:
            if resolved(path) in seen:
                raise ValueError(f"{option} lists {path} more than once")
            seen.add(resolved(path))
    for path in sorted({resolved(p) for p in train} & {resolved(p) for p in val}):
        print(f"warning: {path} is both training and validation data; the validation MAE and "
              f"the choice of ckpt.pt are then not held out", file=sys.stderr)
    return {"train_data": [os.path.normpath(p) for p in train],
            "val_data": [os.path.normpath(p) for p in val]}


def default_model_name(config: str, out: str) -> str:
    """'transip-s (runs/s)': the config (a YAML path by its stem) and the run directory."""
    path = Path(config)
    name = path.stem if path.suffix in (".yaml", ".yml") or path.is_file() else config
    return f"{name} ({os.path.normpath(out)})"


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    model_cfg, cfg = load_config(args.config)
    for key in ("mode", "epochs", "max_steps", "device", "dtype", "seed"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    cfg.__post_init__()
    provenance = {**data_files(args.train, args.val), "config_name": args.config,
                  "model_name": args.name or default_model_name(args.config, args.out)}
    train = [f for path in args.train for f in read_frames(path)]
    val = [f for path in args.val for f in read_frames(path)]
    trainer = Trainer(model_cfg, cfg, train, val, Path(args.out),
                      progress=not (args.no_progress or args.quiet), provenance=provenance,
                      log=(lambda line: None) if args.quiet else None)
    if args.resume:
        trainer.resume()
    ckpt = trainer.run()
    if args.quiet and trainer.history:
        print(format_summary(trainer.history))
    print(f"checkpoint: {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
