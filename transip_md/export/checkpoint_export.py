"""From a training checkpoint to an engine file, with a fidelity self-check.

Output rule: export writes a new file, or over a previous export (only where allowed:
``--force`` on the command line). It never writes over anything else -- a training checkpoint,
data, a text file -- whatever the flags. The file is written to a temporary file beside the
target, checked there against the eager model, and only then renamed into place, so a failed
check leaves a pre-existing target untouched.
"""

import copy
import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from .. import file_kinds
from ..atomic_io import atomic_output, check_output_path
from ..checkpoint import Checkpoint, load_checkpoint
from .model_file import ModelFileError, load_exported, write_exported

PathLike = Union[str, os.PathLike]

#: Name of the model shipped inside the package (see transip_md/pretrained/MODEL_CARD.md).
DEFAULT_MODEL_NAME = "transip-demo"
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"

#: Relative agreement required between the eager model and the exported file.
FIDELITY_RTOL = {"float32": 5e-5, "float64": 1e-10}

#: What an export's attention layers run: the pure-TorchScript reference (loads anywhere) or
#: a fused operator of the transip_ops library (model/fused_attention.py), by its form:
#: ``fused`` the folded-query operator, ``fused-qkv`` the per-token key/value operator.
FUSED_KERNELS = {"fused": "folded", "fused-qkv": "qkv"}
KERNELS = ("reference",) + tuple(FUSED_KERNELS)


def default_checkpoint_path() -> Path:
    path = PRETRAINED_DIR / f"{DEFAULT_MODEL_NAME}.ckpt.pt"
    if not path.exists():
        raise FileNotFoundError(f"the shipped default model is missing from the installation: {path}")
    return path


def resolve_checkpoint(name_or_path: Union[str, None]) -> Path:
    """``None`` or the default model's name mean the shipped checkpoint."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL_NAME:
        return default_checkpoint_path()
    return Path(name_or_path)


def cache_dir() -> Path:
    root = os.environ.get("TRANSIP_MD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "transip-md")
    return Path(root)


def default_model_path(dtype: str = "float32") -> Path:
    """An exported file of the shipped model (exported once into the user cache)."""
    ckpt = default_checkpoint_path()
    # The key covers the weights and the code that gets scripted into the file, so a cached
    # export never outlives a change of the model code (new entry points, fixes).
    digest = hashlib.sha256(ckpt.read_bytes())
    model_dir = Path(__file__).resolve().parents[1] / "model"
    for source in sorted(model_dir.glob("*.py")):
        digest.update(source.read_bytes())
    digest = digest.hexdigest()[:12]
    out = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-{dtype}-{digest}.pt"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Atomic (temporary file + rename); a concurrent process exporting the same key
        # replaces an identical export, hence replace_export.
        export_checkpoint(ckpt, out, dtype=dtype, replace_export=True)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def _probe_system(elements, dtype: torch.dtype):
    """A small, deterministic cluster of the model's own elements for the fidelity check."""
    from ase.data import atomic_numbers

    gen = torch.Generator().manual_seed(1234)
    z = [atomic_numbers[e] for e in elements]
    numbers = torch.tensor([z[k % len(z)] for k in range(8)], dtype=torch.long)
    grid = torch.stack(torch.meshgrid(*[torch.arange(2.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    positions = (grid * 1.4 + 0.15 * torch.rand((8, 3), generator=gen)).to(dtype)
    return positions, numbers


def fidelity_check(eager, exported, dtype: str) -> Dict[str, float]:
    """Energies/forces of eager model and exported file on a probe, open and periodic."""
    torch_dtype = getattr(torch, dtype)
    eager = eager.to(torch_dtype)
    positions, numbers = _probe_system(eager.element_list(), torch_dtype)
    zero = torch.tensor(0)
    one = torch.tensor(1)
    worst = {"energy": 0.0, "forces": 0.0}
    for cell, pbc in ((torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool)),
                      (torch.tensor([[4.1, 0, 0], [0.6, 4.3, 0], [0.2, -0.4, 4.0]]),
                       torch.ones(3, dtype=torch.bool))):
        cell = cell.to(torch_dtype)
        a = eager.compute(positions, numbers, cell, pbc, zero, one, True, False)
        b = exported.compute(positions, numbers, cell, pbc, zero, one, True, False)
        e_rel = float((a["energy"] - b["energy"]).abs() / a["energy"].abs().clamp_min(1e-12))
        f_rel = float((a["forces"] - b["forces"]).abs().max() / a["forces"].abs().max().clamp_min(1e-12))
        worst["energy"] = max(worst["energy"], e_rel)
        worst["forces"] = max(worst["forces"], f_rel)
    return worst


def check_export_target(out_path: PathLike, replace_export: bool) -> None:
    """Refuse an output path that holds anything but a previous export, and a previous export
    unless ``replace_export``; the message names the file, what it is and what to do."""
    out = Path(out_path)
    kind = file_kinds.sniff(out)
    if kind in (file_kinds.MISSING, file_kinds.DIRECTORY):  # a directory: check_output_path
        return
    if kind == file_kinds.EXPORTED:
        if not replace_export:
            raise ModelFileError(f"{out} is already an exported transip-md model{_export_summary(out)}; "
                                 "use --force to replace it")
        return
    hint = (f". Did you mean: python -m transip_md.export {out} model.pt"
            if kind == file_kinds.CHECKPOINT else "")
    raise ModelFileError(f"{out} is {file_kinds.describe(kind)}; export writes only new files or "
                         f"previous exports{hint}")


def _export_summary(path: Path) -> str:
    meta = file_kinds.exported_metadata(path) or {}
    parts = [str(meta[k]) for k in ("model_name", "dtype") if meta.get(k)]
    return f" ({', '.join(parts)})" if parts else ""


def load_source_checkpoint(ckpt_path: PathLike) -> Checkpoint:
    """The checkpoint to export, with an export-specific message for an exported file."""
    if file_kinds.sniff(ckpt_path) == file_kinds.EXPORTED:
        source = (file_kinds.exported_metadata(ckpt_path) or {}).get("source_checkpoint")
        origin = f" ({source}, per its metadata)" if source else ""
        raise ModelFileError(
            f"{ckpt_path} is an exported transip-md model, not a training checkpoint; export needs "
            f"the checkpoint it was exported from{origin}; python -m transip_md.export --info "
            f"{ckpt_path} shows its metadata")
    return load_checkpoint(ckpt_path)


def export_checkpoint(ckpt_path: PathLike, out_path: PathLike, dtype: str = "float32",
                      check: bool = True, replace_export: bool = True,
                      kernels: str = "reference") -> Dict[str, Any]:
    """Export a checkpoint to ``out_path`` (see the module docstring for the output rule).

    ``out_path`` may be new or a previous export (replaced only if ``replace_export``; the
    command line passes ``--force``); anything else there is refused. With ``check`` the file
    is compared with the eager model before it is renamed into place, and nothing is written
    if they disagree beyond ``FIDELITY_RTOL``. ``kernels="fused"`` / ``"fused-qkv"`` export a
    fused attention operator (the file then needs the transip_ops library wherever it is loaded); its check
    compares it with the eager *reference* model.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got '{kernels}'")
    check_export_target(out_path, replace_export)
    check_output_path(out_path)  # before the (slow) loading and scripting
    ckpt = load_source_checkpoint(ckpt_path)
    extra = {
        "model_name": ckpt.training.get("model_name") or Path(ckpt_path).name.split(".")[0],
        "model_config": ckpt.config.to_dict(),
        "training": _jsonable(ckpt.training),
        "validation": _jsonable(ckpt.metrics.get("validation", {})),
        "equivariance_error": _jsonable(ckpt.metrics.get("equivariance_error", {})),
        "source_checkpoint": str(Path(ckpt_path).name),
    }
    potential = ckpt.potential
    if kernels in FUSED_KERNELS:
        from ..model.fused_attention import OperatorUnavailable, use_fused_attention

        try:  # a copy: ckpt.potential stays the reference the check compares with
            potential = use_fused_attention(copy.deepcopy(potential), form=FUSED_KERNELS[kernels])
        except OperatorUnavailable as exc:
            raise ModelFileError(f"--kernels {kernels} needs the operator library: {exc}; or "
                                 "export with --kernels reference (no library needed)") from None
        except ValueError as exc:  # an architecture the operators do not cover
            raise ModelFileError(f"--kernels {kernels} cannot export {ckpt_path}: {exc}") from None
    with atomic_output(out_path) as tmp:
        meta = write_exported(potential, tmp, dtype=dtype, extra_metadata=extra)
        if check:
            meta["fidelity_check"] = _checked_fidelity(ckpt, tmp, dtype, out_path)
        check_export_target(out_path, replace_export)  # again: the target may have appeared
    return meta


def _checked_fidelity(ckpt: Checkpoint, exported_path: PathLike, dtype: str,
                      out_path: PathLike) -> Dict[str, float]:
    worst = fidelity_check(ckpt.potential, load_exported(exported_path), dtype)
    if max(worst.values()) > FIDELITY_RTOL[dtype]:
        raise ModelFileError(
            f"the export of {ckpt.path} disagrees with the eager model (relative {worst}, allowed "
            f"{FIDELITY_RTOL[dtype]}); {out_path} was not written or changed")
    return worst
