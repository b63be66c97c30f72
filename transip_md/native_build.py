"""Cached native builds with plain g++: the one skeleton behind the LAMMPS plugin
(:mod:`transip_md.lammps.build`) and the operator library (:mod:`transip_md.ops.build`).

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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Tuple


class BuildError(RuntimeError):
    """A native part could not be built; the message says why and what to do."""


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
