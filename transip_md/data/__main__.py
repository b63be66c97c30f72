"""Command line for the data layer: ``python -m transip_md.data {generate,split,info,recipes}``.

Every failure is reported as one ``error: ...`` line on stderr with exit status 2 (no
traceback), and commands either write all their outputs or none of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols

from .readers import _stage_extxyz, read_frames
from .splits import split_frames


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus a message on bad arguments; we want the one-line form."""

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _cmd_generate(args) -> None:
    from .generate import generate  # lazy: pulls in tblite

    options = {}
    if args.temperatures:
        options["temperatures"] = args.temperatures
    if args.stride is not None:
        options["stride"] = args.stride
    if args.equil_steps is not None:
        options["equil_steps"] = args.equil_steps
    frames = generate(args.recipe, args.n, seed=args.seed, out=args.out, progress=not args.quiet,
                      **options)
    print(f"wrote {len(frames)} frames to {args.out}")


def _cmd_split(args) -> None:
    frames = read_frames(args.input)
    splits = split_frames(frames, args.fractions, seed=args.seed, group_by_source=args.group_by_source)
    names = ["train", "val", "test"][: len(splits)] if len(splits) <= 3 else [
        f"split{i}" for i in range(len(splits))
    ]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out_dir / f"{name}.extxyz" for name in names]
    # Stage every file first and only then move them into place, so a failure part-way
    # (disk full, interrupt) cannot leave e.g. a new train.extxyz next to an old test.extxyz.
    staged = []
    try:
        for part, target in zip(splits, targets):
            staged.append(_stage_extxyz(part, target))
        for tmp, target in zip(staged, targets):
            os.replace(tmp, target)
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    for part, target in zip(splits, targets):
        print(f"{target}: {len(part)} frames")


def _cmd_info(args) -> None:
    frames = read_frames(args.file)
    print(f"file: {args.file}")
    print(f"frames: {len(frames)}")
    if not frames:
        return
    sizes = np.array([len(f) for f in frames])
    print(f"atoms: total {sizes.sum()}, per frame min {sizes.min()} / mean {sizes.mean():.1f} / max {sizes.max()}")
    elements = Counter(int(z) for f in frames for z in f.numbers)
    print("elements: " + ", ".join(f"{chemical_symbols[z]} {c}" for z, c in sorted(elements.items())))
    charges = Counter(f.charge for f in frames)
    print("charges: " + ", ".join(f"{q:+d}: {c}" if q else f"0: {c}" for q, c in sorted(charges.items())))
    spins = Counter(f.spin for f in frames)
    print("spin multiplicities: " + ", ".join(f"{s}: {c}" for s, c in sorted(spins.items())))
    n_e = sum(f.energy is not None for f in frames)
    n_f = sum(f.forces is not None for f in frames)
    print(f"labels: energy {n_e}/{len(frames)}, forces {n_f}/{len(frames)}")
    sources = Counter(f.source or "(none)" for f in frames)
    print(f"sources: {len(sources)} distinct")
    for source, count in sorted(sources.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:6d}  {source}")


def _cmd_recipes(args) -> None:
    from .recipes import recipe_summaries

    summaries = recipe_summaries()
    width = max(len(name) for name in summaries)
    for name, summary in summaries.items():
        print(f"{name:<{width}}  {summary}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m transip_md.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate xTB reference data from a recipe")
    gen.add_argument("--recipe", required=True,
                     help="recipe name, e.g. organics-xtb or tiny-xtb (list them: recipes)")
    gen.add_argument("--n", type=int, required=True, help="number of configurations")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True, help="output .extxyz path")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--temperatures", type=float, nargs="+", metavar="K",
                     help="Langevin temperatures (default 300 500 700 1000)")
    gen.add_argument("--stride", type=int, help="MD steps between sampled frames (default 10)")
    gen.add_argument("--equil-steps", type=int, help="MD steps before sampling (default 20)")
    gen.set_defaults(func=_cmd_generate)

    split = sub.add_parser("split", help="split a data file into train/val/test.extxyz")
    split.add_argument("input")
    split.add_argument("--fractions", type=float, nargs="+", default=[0.8, 0.1, 0.1])
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--group-by-source", action="store_true",
                       help="keep all frames of one source label in the same split")
    split.add_argument("--out-dir", required=True)
    split.set_defaults(func=_cmd_split)

    info = sub.add_parser("info", help="summarise a data file")
    info.add_argument("file")
    info.set_defaults(func=_cmd_info)

    recipes = sub.add_parser("recipes", help="list the data recipes that generate --recipe takes")
    recipes.set_defaults(func=_cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:  # e.g. `info FILE | head`: the reader left, nothing went wrong
        sys.stdout = open(os.devnull, "w")  # keep the interpreter from failing at flush
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    except Exception as exc:  # one line, no traceback: these are user-facing errors
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
