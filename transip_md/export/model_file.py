"""Writing and reading the exported model file: the one door every engine walks through.

The file is a TorchScript archive of a scripted :class:`TransIPPotential` (neighbour search,
network and autograd forces inside, no custom operators) plus a JSON metadata record stored
twice: as the module attribute ``metadata_json`` (for C++ engines) and as the archive's extra
file ``metadata.json`` (so ``--info`` can read it without loading or running anything).
``export/CONTRACT.md`` documents the entry points.
"""

import copy
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .. import __version__
from .. import units
from ..atomic_io import atomic_output, check_output_path
from ..model.potential import TransIPPotential

MODEL_KIND = "transip-md-model"
#: Bump when an engine-visible entry point or attribute changes meaning.
#: 2: halo_* entry points for the LAMMPS per-layer halo exchange (export/CONTRACT.md 3.6).
FORMAT_VERSION = 2
METADATA_NAME = "metadata.json"

PathLike = Union[str, os.PathLike]


class ModelFileError(ValueError):
    """A file that is not a usable exported transip-md model."""


def units_table() -> Dict[str, Dict[str, str]]:
    return {
        "python": {"positions": "Å", "cell": "Å", "energy": "eV", "forces": "eV/Å",
                   "stress": "eV/Å^3"},
        "openmm": {"positions": "nm", "box": "nm", "energy": "kJ/mol",
                   "kj_per_mol_per_ev": units.KJ_PER_MOL_PER_EV,
                   "angstrom_per_nm": units.ANGSTROM_PER_NM},
        "lammps": {"units": "metal", "positions": "Å", "energy": "eV", "forces": "eV/Å"},
    }


def build_metadata(potential: TransIPPotential, dtype: torch.dtype,
                   extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    meta: Dict[str, Any] = {
        "kind": MODEL_KIND,
        "format_version": FORMAT_VERSION,
        "transip_md_version": __version__,
        "torch_version": str(torch.__version__),
        "dtype": str(dtype).removeprefix("torch."),
        "elements": potential.element_list(),
        "cutoff": potential.cutoff,
        "num_layers": potential.num_layers,
        "receptive_field": potential.receptive_field,
        "units": units_table(),
        "entry_points": ["compute", "energy", "lammps", "lammps_periodic", "halo_feature_width",
                         "halo_edges", "halo_embed", "halo_layer", "halo_readout", "forward",
                         "element_list", "validate"],
    }
    if extra:
        meta.update(extra)
    return meta


def export_potential(potential: TransIPPotential, path: PathLike, dtype: str = "float32",
                     extra_metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Script ``potential`` in ``dtype`` and write it atomically to ``path``; returns metadata."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got '{dtype}'")
    path = Path(path)
    check_output_path(path)  # before the (slow) scripting
    torch_dtype = getattr(torch, dtype)
    # A copy, so exporting never changes the caller's (possibly training) model.
    model = copy.deepcopy(potential).to(device="cpu", dtype=torch_dtype).eval()
    if not bool(model.supported_elements.any()):
        raise ValueError("the potential declares no supported elements; was it trained?")
    meta = build_metadata(model, torch_dtype, extra_metadata)
    model.format_version = FORMAT_VERSION
    model.metadata_json = json.dumps(meta, sort_keys=True)
    scripted = torch.jit.script(model)
    with atomic_output(path) as tmp:
        torch.jit.save(scripted, tmp, _extra_files={METADATA_NAME: model.metadata_json})
    return meta


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """Metadata of an exported file, read from the archive without loading any code."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a model file")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not an exported transip-md model (not a TorchScript archive; truncated or corrupt?)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + METADATA_NAME)]
            if not names:
                hint = " (it looks like a training checkpoint: export it first with python -m transip_md.export)" \
                    if any(n.endswith("data.pkl") for n in archive.namelist()) and not any(
                        "/code/" in n for n in archive.namelist()) else ""
                raise ModelFileError(f"{path} is not an exported transip-md model: no {METADATA_NAME}{hint}")
            meta = json.loads(archive.read(names[0]).decode("utf-8"))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path} has unreadable metadata: {exc}") from None
    _check_metadata(meta, path)
    return meta


def _check_metadata(meta: Dict[str, Any], path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("kind") != MODEL_KIND:
        raise ModelFileError(f"{path} is not an exported transip-md model")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise ModelFileError(f"{path} has no valid format_version")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model format version {version}, newer than this transip-md ({__version__}) "
            f"reads (<= {FORMAT_VERSION}); upgrade transip-md")
    if version < 1:
        raise ModelFileError(f"{path} has invalid model format version {version}")


def load_exported(path: PathLike, device: Union[str, torch.device] = "cpu") -> torch.jit.ScriptModule:
    """Load an exported file on ``device`` after validating its metadata and format version."""
    meta = read_metadata(path)
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path} could not be loaded as TorchScript: {first}") from None
    if int(module.format_version) != int(meta["format_version"]):
        raise ModelFileError(f"{path}: metadata and module disagree on the format version")
    module.eval()
    return module
