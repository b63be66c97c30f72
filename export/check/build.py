"""Build ``transip_check`` with g++ against the libtorch of the installed ``torch`` wheel.

    python export/check/build.py [OUT_DIR]          # default OUT_DIR: export/check/build

The program is ``transip_check.cpp`` plus the model door it shares with the LAMMPS plugin
(``transip_model.cpp``/``.h`` in ``lammps_examples/plugin``, packaged as
``transip_md/lammps/plugin_src``). The libtorch compile and link flags are the plugin's own:
:func:`transip_md.lammps.build.libtorch_flags`, one recipe for every C++ program of
transip-md. CMake's ``find_package(Torch)`` refuses the CUDA wheels of torch on a machine
without a CUDA toolkit, so this calls g++ directly (``CMakeLists.txt`` beside this file is for
a CPU libtorch or a CUDA toolkit; see export/README.md).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Union

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "transip_check.cpp"
PROGRAM = "transip_check"

try:
    from transip_md.lammps import build as _recipe
except ImportError:  # run from a checkout without transip-md installed
    sys.path.insert(0, str(HERE.parents[1]))
    from transip_md.lammps import build as _recipe


def door_directory() -> Path:
    """Where the shared model door (transip_model.h/.cpp) lives."""
    return _recipe.plugin_sources()


def compile_command(out_path: Union[str, os.PathLike], compiler: str = "g++") -> List[str]:
    """The g++ command line that compiles and links ``transip_check`` into ``out_path``."""
    compile_flags, link_flags = _recipe.libtorch_flags(_recipe.find_libtorch())
    # where the door finds libtransip_ops.so for fused exports (built first; see the recipe)
    compile_flags = compile_flags + _recipe.operator_library_flags(build=True)
    door = door_directory()
    sources = [str(SOURCE)] + [str(door / name) for name in _recipe.DOOR_SOURCES]
    return [compiler, *compile_flags, f"-I{door}", *sources, "-o", str(out_path), *link_flags]


def build_check_program(out_dir: Union[str, os.PathLike], compiler: str = "g++") -> Path:
    """Compile ``transip_check`` into ``out_dir`` and return the executable's path.

    Raises FileNotFoundError if the compiler is missing and RuntimeError (with the compiler's
    output) if compiling fails.
    """
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"C++ compiler '{compiler}' not found on PATH")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / PROGRAM
    cmd = compile_command(out_path, compiler)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building {PROGRAM} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return out_path


if __name__ == "__main__":
    out = build_check_program(sys.argv[1] if len(sys.argv) > 1 else HERE / "build")
    print(out)
