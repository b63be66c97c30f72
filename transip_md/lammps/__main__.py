"""``python -m transip_md.lammps {build,path,env}``: see the package docstring."""

import argparse
import shlex
import sys

from .build import BuildError, build_plugin, lammps_env, lmp_executable, plugin_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m transip_md.lammps",
        description="Build and locate the LAMMPS plugin of transip-md (pair_style transip).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the plugin (cached) and print its path")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--quiet", "-q", action="store_true", help="print only the path")
    sub.add_parser("path", help="print the plugin's path, building it if missing")
    sub.add_parser("env", help="print shell `export` lines for running lmp with the plugin")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            path = build_plugin(force=args.force, verbose=not args.quiet)
        else:
            path = plugin_path(build=True)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.cmd == "env":
        env = lammps_env(base={}, plugin_dir=path.parent)
        for key in ("LD_LIBRARY_PATH", "LAMMPS_PLUGIN_PATH"):
            if key in env:
                print(f"export {key}={shlex.quote(env[key])}" + (":$LD_LIBRARY_PATH" if key == "LD_LIBRARY_PATH" else ""))
        print(f"# LAMMPS binary: {lmp_executable()}")
        return 0
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
