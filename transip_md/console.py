"""The ``transip-md`` command: one entry point for the ``python -m transip_md.<x>`` tools.

  transip-md data recipes                          # = python -m transip_md.data recipes
  transip-md train --config transip-small ...      # = python -m transip_md.train ...
  transip-md evaluate model.pt data/test.extxyz    # = python -m transip_md.evaluate ...
  transip-md export runs/s/ckpt.pt model.pt        # = python -m transip_md.export ...
  transip-md lammps build                          # = python -m transip_md.lammps build
  transip-md demo                                  # = python -m transip_md.demo

Each command takes exactly the arguments of its module (``transip-md <command> --help``).
"""

import importlib
import sys
from typing import Dict, List, NamedTuple, Optional

from . import __version__
from .cli import run_cli


class Command(NamedTuple):
    module: str  # holds main(argv) -> int
    summary: str


COMMANDS: Dict[str, Command] = {
    "data": Command("transip_md.data.__main__",
                    "generate, split and inspect reference data; 'data recipes' lists the recipes"),
    "train": Command("transip_md.train.__main__",
                     "train a potential on labelled frames (shipped config or YAML)"),
    "evaluate": Command("transip_md.evaluate",
                        "accuracy and equivariance of a checkpoint or exported model on data"),
    "export": Command("transip_md.export.__main__",
                      "export a checkpoint to the TorchScript file the engines run; --info shows one"),
    "lammps": Command("transip_md.lammps.__main__", "build and locate the LAMMPS plugin"),
    "demo": Command("transip_md.demo", "export the shipped model and run it in OpenMM and LAMMPS"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: transip-md COMMAND [ARGS...]   (transip-md {__version__})", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "transip-md COMMAND --help shows a command's arguments "
                  "(the same as python -m transip_md.COMMAND)."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "help"):
        print(usage())
        return 0
    if name == "--version":
        print(f"transip-md {__version__}")
        return 0
    if name not in COMMANDS:
        raise ValueError(f"unknown command '{name}'; commands: {', '.join(COMMANDS)} "
                         "(transip-md --help describes them)")
    module = importlib.import_module(COMMANDS[name].module)
    return module.main(rest)


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
