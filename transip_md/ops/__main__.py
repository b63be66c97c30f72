"""``python -m transip_md.ops build|path|info``: build the operator library, print its path."""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m transip_md.ops", description=__doc__)
    p.add_argument("command", choices=("build", "path", "info"))
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    opt = p.parse_args(argv)
    from . import OperatorLibraryError, library_path
    from .build import BuildError, build_library, toolchain

    try:
        if opt.command == "build":
            print(build_library(force=opt.force, verbose=True))
        elif opt.command == "path":
            print(library_path())
        else:
            from dataclasses import asdict

            print(json.dumps(asdict(toolchain()), indent=2))
    except (BuildError, OperatorLibraryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
