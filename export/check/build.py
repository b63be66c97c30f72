"""Build ``transip_check`` with g++ against the libtorch of the installed ``torch`` wheel.

    python export/check/build.py [OUT_DIR]          # default OUT_DIR: export/check/build

CMake's ``find_package(Torch)`` refuses the CUDA wheels of torch on a machine without a CUDA
toolkit, so this calls g++ directly with torch's own include and library directories (see
export/README.md; ``CMakeLists.txt`` beside this file is for a CPU libtorch or a CUDA toolkit).
Linking ``libtorch.so`` with ``--no-as-needed`` keeps its CUDA half (when the wheel has one), so
``--device cuda`` works where a GPU is present.
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


def compile_command(out_path: Union[str, os.PathLike], compiler: str = "g++") -> List[str]:
    import logging

    import torch

    # Importing cpp_extension warns "No CUDA runtime is found" on CPU machines; irrelevant here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    cmd = [compiler, "-std=c++17", "-O2", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [str(SOURCE), "-o", str(out_path)]
    for lib in cpp_extension.library_paths():
        cmd += [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    cmd += ["-Wl,--no-as-needed", "-ltorch", "-ltorch_cpu", "-lc10", "-Wl,--as-needed"]
    return cmd


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
