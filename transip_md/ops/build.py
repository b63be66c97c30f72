"""Compile ``libtransip_ops.so`` (the fused neighbour-attention operators) with plain g++.

The library links libtorch through the one recipe :func:`transip_md.native_build.libtorch_flags`
and lands in ``<cache root>/ops/<key>/libtransip_ops.so`` (the cache root of
:func:`transip_md.native_build.cache_root`: ``$TRANSIP_MD_CACHE``, else
``~/.cache/transip-md``). The key hashes the sources (C++ and the CUDA kernel text), the torch
version and location, the compiler, the flags and the CUDA headers found, so a changed source
or wheel rebuilds. The file is written under a lock and renamed into place.

The CUDA part needs no CUDA toolkit and no nvcc: the kernels in ``csrc/*.cu`` are embedded as
text and compiled at run time by NVRTC, then launched through the CUDA driver API; both
libraries are dlopen'ed. Building it only needs the headers ``cuda.h`` and ``nvrtc.h``, which
the CUDA torch wheel's ``nvidia-*`` dependencies ship (torch's current stream comes through its
stable C shim, so the CUDA runtime headers, incomplete in the CUDA 12 wheels, are not used). Without them, or with a CPU-only torch, or with
``TRANSIP_OPS_NO_CUDA=1``, the library is built with its CPU kernels only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from transip_md.native_build import (BuildError, Libtorch, build_shared_object, cache_root,
                                     compiler, content_key, find_libtorch, libtorch_flags)

#: Bump when the recipe below changes (invalidates every cached build).
BUILDER_VERSION = 1
LIBRARY_FILENAME = "libtransip_ops.so"
CSRC = Path(__file__).resolve().parent / "csrc"
#: C++ compiled always / only with the CUDA part; the kernel text embedded in the latter.
CPU_SOURCES = ("neighbor_attention.cpp", "neighbor_attention_cpu.cpp",
               "neighbor_attention_qkv_cpu.cpp", "edge_encoder.cpp")
CUDA_SOURCES = ("neighbor_attention_cuda.cpp",)
KERNEL_SOURCE = "neighbor_attention_kernels.cu"
HEADERS = ("transip_ops.h", "neighbor_softmax_cpu.h")
_CUDA_HEADERS = ("cuda.h", "nvrtc.h")


@dataclass(frozen=True)
class CudaHeaders:
    """Where the CUDA headers were found (empty ``include``: no CUDA part) and why not."""

    include: List[str] = field(default_factory=list)
    cuda_version: str = ""  # CUDA_VERSION of cuda.h, e.g. "12080"
    nvrtc_libraries: List[str] = field(default_factory=list)  # absolute candidates, best first
    reason: str = ""  # why there is no CUDA part


@dataclass(frozen=True)
class Toolchain:
    cxx: str
    cxx_version: str
    libtorch: Libtorch
    torch_cuda: str  # torch.version.cuda or ""
    cuda: CudaHeaders


def _site_dirs() -> List[Path]:
    """Directories that may hold the ``nvidia`` namespace package (next to torch first)."""
    dirs: List[Path] = []
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).parent.parent)
    for p in sys.path:
        if p and Path(p).is_dir():
            dirs.append(Path(p))
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _cuda_version_of(cuda_h: Path) -> str:
    m = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", cuda_h.read_text(errors="replace"))
    return m.group(1) if m else ""


def find_cuda_headers(torch_cuda: str) -> CudaHeaders:
    """cuda.h and nvrtc.h from the pip ``nvidia`` wheels (any layout:
    ``nvidia/cuda_runtime/include``, ``nvidia/cu13/include``, ...), else ``$CUDA_HOME`` or
    ``/usr/local/cuda``. Prefers headers whose CUDA major version is torch's."""
    if os.environ.get("TRANSIP_OPS_NO_CUDA", "") not in ("", "0"):
        return CudaHeaders(reason="TRANSIP_OPS_NO_CUDA is set")
    if not torch_cuda:
        return CudaHeaders(reason="torch has no CUDA (torch.version.cuda is None)")
    absent = [n for n in CUDA_SOURCES + (KERNEL_SOURCE,) if not (CSRC / n).is_file()]
    if absent:
        return CudaHeaders(reason=f"CUDA sources absent from {CSRC}: {', '.join(absent)}")
    roots: List[Path] = []
    for site in _site_dirs():
        if (site / "nvidia").is_dir():
            roots.append(site / "nvidia")
    toolkit = [Path(p) for p in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                                 "/usr/local/cuda") if p]
    found = {name: [] for name in _CUDA_HEADERS}
    for root in roots:
        for name in _CUDA_HEADERS:
            found[name] += sorted(root.glob(f"**/include/{name}"))
    for tk in toolkit:
        for name in _CUDA_HEADERS:
            if (tk / "include" / name).is_file():
                found[name].append(tk / "include" / name)
    missing = [n for n, paths in found.items() if not paths]
    if missing:
        return CudaHeaders(reason=f"CUDA headers not found: {', '.join(missing)} (looked in "
                           f"{', '.join(map(str, roots + toolkit)) or 'no nvidia wheels'})")
    major = torch_cuda.split(".")[0]
    # cuda.h decides the version; nvrtc.h comes from a directory of the same major
    # where possible (the cu12 wheels split them over cuda_runtime/ and cuda_nvrtc/).
    cuda_h = sorted(found["cuda.h"],
                    key=lambda p: not _cuda_version_of(p).startswith(major))[0]
    version = _cuda_version_of(cuda_h)
    include = [cuda_h.parent]
    for name in ("nvrtc.h",):
        if (cuda_h.parent / name).is_file():
            continue
        same_tree = [p for p in found[name] if cuda_h.parents[1] in p.parents]
        include.append((same_tree or found[name])[0].parent)
    libs: List[Path] = []
    for root in roots:
        libs += sorted(root.glob("**/lib/libnvrtc.so*"))
    for tk in toolkit:
        libs += sorted((tk / "lib64").glob("libnvrtc.so*"))
    # Only the real NVRTC (not libnvrtc-builtins, not the .alt variant); torch's major first.
    libs = [p for p in libs if re.fullmatch(r"libnvrtc\.so(\.\d+)*", p.name)]
    libs.sort(key=lambda p: (not p.name.startswith(f"libnvrtc.so.{major}"), str(p)))
    return CudaHeaders(include=[str(p) for p in dict.fromkeys(include)], cuda_version=version,
                       nvrtc_libraries=[str(p) for p in dict.fromkeys(libs)])


def toolchain() -> Toolchain:
    import torch

    cxx, cxx_version = compiler()
    torch_cuda = torch.version.cuda or ""
    return Toolchain(cxx=cxx, cxx_version=cxx_version, libtorch=find_libtorch(),
                     torch_cuda=torch_cuda, cuda=find_cuda_headers(torch_cuda))


def _with_cuda(tc: Toolchain) -> bool:
    return bool(tc.cuda.include)


def _sources(tc: Toolchain) -> List[str]:
    return list(CPU_SOURCES) + (list(CUDA_SOURCES) if _with_cuda(tc) else [])


def _flags(tc: Toolchain, gen_dir: str) -> Tuple[List[str], List[str]]:
    compile_flags, link_flags = libtorch_flags(tc.libtorch)
    # -fopenmp: at::parallel_for is an inline OpenMP loop; without it the CPU kernels run on
    # one thread. The torch wheel ships libgomp.so.1 and loads it first, so the process keeps
    # one OpenMP runtime.
    compile_flags = compile_flags + ["-Wall", "-fopenmp", f"-I{CSRC}"]
    link_flags = ["-shared", "-fopenmp", *link_flags]
    # Debugging builds (e.g. "-fsanitize=address -g"); part of the cache key like every flag.
    extra = os.environ.get("TRANSIP_OPS_EXTRA_CXXFLAGS", "").split()
    compile_flags += extra
    link_flags += extra
    if _with_cuda(tc):
        compile_flags += ["-DTRANSIP_OPS_WITH_CUDA", f"-I{gen_dir}"]
        for inc in tc.cuda.include:
            compile_flags += ["-isystem", inc]
        nvrtc = ":".join(tc.cuda.nvrtc_libraries)
        compile_flags.append(f'-DTRANSIP_NVRTC_CANDIDATES="{nvrtc}"')
        # libcuda and libnvrtc are dlopen'ed, never linked: the library loads on machines
        # without a driver, and the NVRTC to use is chosen at run time.
        link_flags += [f"-L{tc.libtorch.lib}", "-Wl,--no-as-needed", "-ltorch_cuda",
                       "-Wl,--as-needed", "-ldl"]
    return compile_flags, link_flags


def _hashed_files() -> List[Path]:
    return sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cu"))


def check_sources(tc: Toolchain) -> None:
    names = CPU_SOURCES + HEADERS + ((KERNEL_SOURCE,) + CUDA_SOURCES if _with_cuda(tc) else ())
    missing = [n for n in names if not (CSRC / n).is_file()]
    if missing:
        raise BuildError(f"transip_ops sources missing from {CSRC}: {', '.join(missing)} "
                         "(a broken install? reinstall transip-md)")


def build_key(tc: Toolchain) -> str:
    return content_key(BUILDER_VERSION, _hashed_files(), asdict(tc), _flags(tc, "GEN"))


def _write_kernel_header(gen_dir: Path) -> None:
    """Embed the CUDA kernel text as a raw string literal (NVRTC compiles it at run time)."""
    text = (CSRC / KERNEL_SOURCE).read_text()
    delim = "TRANSIP_CU"
    if f"){delim}\"" in text:
        raise BuildError(f"{KERNEL_SOURCE} contains the raw-string delimiter {delim}")
    (gen_dir / "kernel_source.h").write_text(
        "// generated by transip_md/ops/build.py from " + KERNEL_SOURCE + "\n#pragma once\n"
        f'static const char kKernelSource[] = R"{delim}(' + text + f'){delim}";\n'
        f'static const char kKernelName[] = "{KERNEL_SOURCE}";\n')


def target_path(tc: Optional[Toolchain] = None) -> Path:
    tc = tc or toolchain()
    return cache_root() / "ops" / build_key(tc) / LIBRARY_FILENAME


def build_library(force: bool = False, verbose: bool = False) -> Path:
    """Build (or find in the cache) ``libtransip_ops.so`` and return its path."""
    tc = toolchain()
    check_sources(tc)

    def flags(tmp: Path) -> Tuple[List[str], List[str]]:
        if _with_cuda(tc):
            _write_kernel_header(tmp)
        return _flags(tc, str(tmp))

    info = {"toolchain": asdict(tc), "with_cuda": _with_cuda(tc),
            "builder_version": BUILDER_VERSION}
    target = build_shared_object(target_path(tc), "transip_ops", tc.cxx,
                                 [CSRC / name for name in _sources(tc)], flags, info,
                                 force=force, verbose=verbose)
    if verbose and not _with_cuda(tc):
        print(f"(without the CUDA part: {tc.cuda.reason})", file=sys.stderr)
    return target


__all__ = ["BuildError", "build_library", "target_path", "toolchain", "find_cuda_headers"]
