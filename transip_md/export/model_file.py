"""Writing and reading the exported model file: the one door every engine walks through.

The file is a TorchScript archive of a scripted :class:`TransIPPotential` (neighbour search,
network and autograd forces inside; a reference export has no custom operators, a fused one
calls ``transip_ops``, declared as its ``operator_library``) plus a JSON metadata record stored
twice: as the module attribute ``metadata_json`` (for C++ engines) and as the archive's extra
file ``metadata.json`` (so ``--info`` can read it without loading or running anything).
``export/CONTRACT.md`` documents the entry points. Readers sniff the file's kind first
(:mod:`transip_md.file_kinds`), so a checkpoint or other file given by mistake is named.
"""

import copy
import json
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import __version__
from .. import file_kinds
from .. import units
from ..atomic_io import atomic_output, check_output_path
from ..model.contract import FORMAT2_ALIASES, declaration
from ..model.potential import TransIPPotential
from .weights_digest import DIGEST_KEY, weights_digest, weights_problem

MODEL_KIND = "transip-md-model"
#: Bump when an engine-visible entry point or attribute changes meaning.
#: 2: halo_* entry points for the LAMMPS per-layer halo exchange (export/CONTRACT.md 3.6).
#: 3: the declaration (capabilities, limits, species, unit_factors, operator_library),
#:    validate_cell / validate_electrons, neutral names (lammps -> local_energies_forces,
#:    lammps_periodic -> mapped_energies_forces_virial; loaders accept the old names).
FORMAT_VERSION = 3
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
        "lammps_real": {"units": "real", "positions": "Å", "energy": "kcal/mol",
                        "forces": "kcal/mol/Å", "kcal_per_mol_per_ev": units.KCAL_PER_MOL_PER_EV},
    }


def build_metadata(potential: TransIPPotential, dtype: torch.dtype,
                   extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The metadata record: identity, the engine declaration (model/contract.py) and extras."""
    declared = declaration(potential, dtype, units_table(),
                           operator_library=str(getattr(potential, "operator_library", "")))
    meta: Dict[str, Any] = {
        "kind": MODEL_KIND,
        "format_version": FORMAT_VERSION,
        "transip_md_version": __version__,
        "elements": potential.element_list(),
        "cutoff": potential.cutoff,
        "num_layers": potential.num_layers,
        "receptive_field": potential.receptive_field,
        "units": units_table(),
        "entry_points": sorted(declared["capabilities"]),
        **declared,
    }
    if extra:
        meta.update(extra)
    return meta


def _declare(model: TransIPPotential, meta: Dict[str, Any]) -> None:
    """Store the declaration as typed module attributes (read by C++ without JSON)."""
    model.format_version = FORMAT_VERSION
    model.capabilities = dict(meta["capabilities"])
    model.limits = dict(meta["limits"])
    model.species = dict(meta["species"])
    model.unit_factors = dict(meta["unit_factors"])
    model.operator_library = str(meta["operator_library"])
    model.metadata_json = json.dumps(meta, sort_keys=True)


def write_exported(potential: TransIPPotential, path: PathLike, dtype: str = "float32",
                   extra_metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Script ``potential`` in ``dtype`` and write it atomically to ``path``, whatever is there
    (callers decide what may be replaced); returns the metadata."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got '{dtype}'")
    path = Path(path)
    check_output_path(path)  # before the (slow) scripting
    torch_dtype = getattr(torch, dtype)
    # A copy, so exporting never changes the caller's (possibly training) model.
    model = copy.deepcopy(potential).to(device="cpu", dtype=torch_dtype).eval()
    # Engines differentiate the energy with respect to positions (and strain) only. Parameters
    # that require grad make autograd keep every linear layer's input for a weight gradient
    # nobody asks for: TransIP-S, 1,536 atoms, energy+forces peak 2.21 -> 1.66 GiB per 10k
    # atoms with --kernels fused-qkv, 8.06 -> 7.10 for reference (benchmarks/memory_profile.py).
    # The flag is stored in the archive, so every loader (C++ too) gets frozen parameters.
    model.requires_grad_(False)
    if not bool(model.supported_elements.any()):
        raise ValueError("the potential declares no supported elements; was it trained?")
    meta = build_metadata(model, torch_dtype, extra_metadata)
    meta[DIGEST_KEY] = weights_digest(model)  # recomputed by both doors on load (#18)
    _declare(model, meta)
    scripted = torch.jit.script(model)
    if weights_digest(scripted) != meta[DIGEST_KEY]:  # what the loaders will see
        raise RuntimeError("the scripted model's parameters and buffers differ from the eager "
                           "model's (a transip-md bug): the weights digest would not verify")
    with atomic_output(path) as tmp:
        torch.jit.save(scripted, tmp, _extra_files={METADATA_NAME: model.metadata_json})
    return meta


def export_potential(potential: TransIPPotential, path: PathLike, dtype: str = "float32",
                     extra_metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """:func:`write_exported` to a new file or over a previous export only: never over a
    checkpoint or any other file (the same rule as ``python -m transip_md.export --force``)."""
    kind = file_kinds.sniff(path)
    if kind not in (file_kinds.MISSING, file_kinds.EXPORTED, file_kinds.DIRECTORY):
        raise ModelFileError(f"{path} is {file_kinds.describe(kind)}; an export is written only "
                             "to a new file or over a previous export")
    return write_exported(potential, path, dtype, extra_metadata)


def not_exported_message(path: PathLike, kind: str) -> str:
    """Why a file of ``kind`` (see :func:`file_kinds.sniff`) is not an exported model, and
    what to do."""
    if kind in (file_kinds.DIRECTORY, file_kinds.SPECIAL):  # "is a FIFO (named pipe), not ..."
        return file_kinds.not_a_file(path) or f"{path} is {file_kinds.describe(kind)}"
    if kind in (file_kinds.NOT_ZIP, file_kinds.EMPTY):
        what = "an empty file" if kind == file_kinds.EMPTY else "not a TorchScript archive"
        return f"{path} is not an exported transip-md model ({what}; truncated or corrupt?)"
    if kind == file_kinds.CHECKPOINT:
        return (f"{path} is not an exported transip-md model; it looks like a training checkpoint: "
                f"export it first with python -m transip_md.export {path} model.pt")
    if kind == file_kinds.TORCHSCRIPT:
        return (f"{path} is not an exported transip-md model: a TorchScript archive without "
                f"transip-md {METADATA_NAME}")
    return f"{path} is not an exported transip-md model: it is {file_kinds.describe(kind)}"


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """Metadata of an exported file, read from the archive without loading any code.

    Besides its kind and format version, the record must be the module's own copy: the
    exporter stores one string twice (``metadata.json`` and the pickled ``metadata_json``
    attribute, see :func:`write_exported`), so a ``metadata.json`` found nowhere in
    ``data.pkl`` was edited or damaged, and is refused instead of trusted."""
    return _validated_metadata(Path(path))[0]


def _validated_metadata(path: Path) -> Tuple[Dict[str, Any], bytes]:
    """(metadata, its exact bytes) of an exported file; every refusal names the file."""
    kind = file_kinds.sniff(path)
    if kind == file_kinds.MISSING:
        raise FileNotFoundError(f"model file not found: {path}")
    if kind not in (file_kinds.EXPORTED, file_kinds.TORCHSCRIPT):
        raise ModelFileError(not_exported_message(path, kind))
    entry = _read_metadata_entry(path)
    if entry is None:
        raise ModelFileError(not_exported_message(path, kind))
    meta, raw, in_module = entry
    _check_metadata(meta, path)
    if not in_module:
        raise ModelFileError(
            f"{path} is damaged or was edited: its {METADATA_NAME} is not the model's own copy "
            "of the metadata; export the model again")
    return meta, raw


#: Errors Python's zipfile, zlib and json raise on damaged archives and unreadable records.
_UNREADABLE = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError,
               RecursionError, NotImplementedError, RuntimeError, OverflowError, struct.error)


def _read_metadata_entry(path: Path) -> Optional[Tuple[Any, bytes, bool]]:
    """(the parsed ``extra/metadata.json``, its bytes, whether data.pkl holds the same text
    as the module's ``metadata_json``) of a TorchScript archive; None if it has no metadata."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            name = file_kinds.metadata_entry(names)
            if name is None:
                return None
            if names.count(name) > 1:  # zipfile reads the last, torch the first
                raise ModelFileError(f"{path} is damaged: its archive holds {METADATA_NAME} "
                                     "more than once")
            raw = archive.read(name)
            meta = json.loads(raw.decode("utf-8"))
            pickle = file_kinds.pickle_entry(names)
            try:
                in_module = pickle is not None and raw in archive.read(pickle)
            except _UNREADABLE as exc:
                raise ModelFileError(f"{path} is damaged: its data.pkl does not read back "
                                     f"({file_kinds.safe_error_text(exc)})") from None
    except ModelFileError:
        raise
    except _UNREADABLE as exc:
        raise ModelFileError(f"{path} has unreadable metadata: "
                             f"{file_kinds.safe_error_text(exc)}") from None
    return meta, raw, in_module


def _check_metadata(meta: Any, path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("kind") != MODEL_KIND:
        raise ModelFileError(f"{path} is not an exported transip-md model")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"{path} has no valid format_version")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model format version {version}, newer than this transip-md ({__version__}) "
            f"reads (<= {FORMAT_VERSION}); upgrade transip-md")
    if version < 1:
        raise ModelFileError(f"{path} has invalid model format version {version}")
    # What the Python engines read from the record itself (not from the module).
    if meta.get("dtype") not in ("float32", "float64"):
        raise ModelFileError(f"{path} has no valid dtype in its metadata")
    capabilities = meta.get("capabilities")
    if capabilities is not None and not (isinstance(capabilities, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in capabilities.values())):
        raise ModelFileError(f"{path} has invalid capabilities in its metadata")
    names = meta.get("entry_points")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ModelFileError(f"{path} has invalid entry_points in its metadata")


def declared_capabilities(meta: Dict[str, Any]) -> Dict[str, int]:
    """Entry point -> contract version of a file; older files (format <= 2) declared only a
    list of names, and their format-2 names count as the new ones (aliases)."""
    if isinstance(meta.get("capabilities"), dict):
        return {str(k): int(v) for k, v in meta["capabilities"].items()}
    names = meta.get("entry_points") or ["compute", "energy", "lammps", "forward", "element_list",
                                         "validate"]
    found = {str(name): 1 for name in names}
    for old, new in FORMAT2_ALIASES.items():
        if old in found:
            found[new] = 1
    return found


def check_declaration(meta: Dict[str, Any], path: PathLike, needs: Sequence[str] = (),
                      who: str = "this engine") -> None:
    """The one place where a file's declaration is judged against what an engine needs:
    a missing entry point refuses (with what to do), a different torch major version warns."""
    offered = declared_capabilities(meta)
    missing = [name for name in needs if name not in offered]
    if missing:
        raise ModelFileError(
            f"{path} does not provide {', '.join(missing)} (needed by {who}; the file has model "
            f"format {meta.get('format_version')}); re-export it with this transip-md: "
            f"python -m transip_md.export <checkpoint> {Path(path).name}")
    library = meta.get("operator_library") or ""
    if library and library not in loaded_operator_libraries():
        raise ModelFileError(
            f"{path} needs the operator library '{library}', which is not loaded here; install "
            f"transip-md with its compiled operators, or export the reference path (no library)")
    file_torch = str(meta.get("torch_version", ""))
    if file_torch and file_torch.split(".")[0] != str(torch.__version__).split(".")[0]:
        warnings.warn(f"{path} was exported with torch {file_torch}, this is torch "
                      f"{torch.__version__} (another major version); re-export it if loading or "
                      f"results look wrong", stacklevel=3)


def loaded_operator_libraries() -> List[str]:
    """Names of the transip-md operator libraries loaded in this process: ``transip_ops``
    once its operator is registered (by :func:`load_operator_library` or anything else)."""
    from ..model.fused_attention import OPERATOR_LIBRARY, operator_registered

    return [OPERATOR_LIBRARY] if operator_registered() else []


def load_operator_library(meta: Dict[str, Any], path: PathLike) -> None:
    """Load the operator library a file declares, before its code is loaded (TorchScript
    resolves the operator when it compiles the file). Unknown names are left to
    :func:`check_declaration`, which refuses them."""
    from ..model.fused_attention import (LIBRARY_ENV, OPERATOR_LIBRARY, OperatorUnavailable,
                                         load_operator_library as load)

    if meta.get("operator_library") != OPERATOR_LIBRARY:
        return
    try:
        load()
    except OperatorUnavailable as exc:
        raise ModelFileError(
            f"{path} is a fused export: it needs the operator library '{OPERATOR_LIBRARY}', "
            f"which cannot be loaded here ({exc}). Either make the library available (a C++ "
            f"compiler and this torch's headers to build it, or ${LIBRARY_ENV} naming a built "
            f"libtransip_ops.so), or export the reference path, which needs no library: "
            f"python -m transip_md.export <checkpoint> {Path(path).name} --kernels reference"
        ) from None


def load_exported(path: PathLike, device: Union[str, torch.device] = "cpu",
                  needs: Sequence[str] = ("compute",),
                  who: str = "the Python API") -> torch.jit.ScriptModule:
    """The Python door to an exported file: validate its metadata, format version and
    declaration against ``needs`` (entry points the caller will use), then load it on
    ``device``. Every Python engine (ASE calculator, OpenMM adapter, evaluate, benchmarks)
    loads through here."""
    meta, raw = _validated_metadata(Path(path))
    load_operator_library(meta, path)
    check_declaration(meta, path, needs, who)
    _check_integrity(Path(path))
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise ModelFileError(
            f"{path} could not be loaded as TorchScript: {file_kinds.safe_error_text(exc)}") from None
    try:
        version, own_json = int(module.format_version), str(module.metadata_json)
    except (AttributeError, RuntimeError, TypeError, ValueError):
        raise ModelFileError(f"{path} is not an exported transip-md model: its TorchScript module "
                             "has no format_version / metadata_json") from None
    if version != int(meta["format_version"]):
        raise ModelFileError(f"{path}: metadata and module disagree on the format version")
    if own_json.encode("utf-8") != raw:
        raise ModelFileError(f"{path} is damaged or was edited: its {METADATA_NAME} and the "
                             "module's metadata_json disagree; export the model again")
    problem = weights_problem(module, meta.get(DIGEST_KEY), str(path))
    if problem is not None:
        raise ModelFileError(f"{path}{problem}")
    module.eval()
    return module


def _check_integrity(path: Path) -> None:
    """Every member against its zip CRC-32 (see :func:`file_kinds.archive_damage`)."""
    damage = file_kinds.archive_damage(path)
    if damage is not None:
        raise ModelFileError(f"{path} is damaged: {damage}; export the model again")
