"""LAMMPS support: build the ``pair_style transip`` plugin and start LAMMPS with it.

Command line::

    python -m transip_md.lammps build     # compile (cached), print the plugin's path
    python -m transip_md.lammps path      # print the path (builds if missing)
    python -m transip_md.lammps env       # shell lines that make `lmp` find libmpi

In an input deck::

    plugin     load /path/printed/above/transipplugin.so
    units      metal
    pair_style transip [device cpu|cuda] [charge Q] [multiplicity M] [prune yes|no]
    pair_coeff * * model.pt O H

From Python::

    from transip_md.lammps import start_lammps
    lmp = start_lammps()          # libmpi preloaded, plugin built and loaded
    lmp.file("in.water")

See ``lammps_examples/README.md`` for the decks and the pair style's reference.
"""

from .build import (
    BuildError,
    build_plugin,
    cache_root,
    lammps_env,
    lmp_executable,
    mpirun_executable,
    plugin_path,
    plugin_sources,
    preload_mpi,
    start_lammps,
)

__all__ = [
    "BuildError",
    "build_plugin",
    "cache_root",
    "lammps_env",
    "lmp_executable",
    "mpirun_executable",
    "plugin_path",
    "plugin_sources",
    "preload_mpi",
    "start_lammps",
]
