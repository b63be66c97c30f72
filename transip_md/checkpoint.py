"""Training checkpoints (``ckpt.pt``): writing them atomically and loading them safely.

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(weights_only=True)`` (no pickled code runs). It carries its own format
version; a reader refuses versions newer than it understands instead of guessing. Before
loading, the file's kind is sniffed (:mod:`transip_md.file_kinds`), so an exported model or
another file given by mistake is named for what it is.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from . import __version__
from . import file_kinds
from .atomic_io import atomic_output
from .model.config import ModelConfig
from .model.potential import TransIPPotential

CHECKPOINT_KIND = file_kinds.CHECKPOINT_KIND  # "transip-md-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file that is not a usable transip-md checkpoint."""


@dataclass
class Checkpoint:
    config: ModelConfig
    potential: TransIPPotential
    training: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    equivariance_state: Optional[Dict[str, torch.Tensor]] = None
    resume_state: Optional[Dict[str, Any]] = None
    path: Optional[str] = None


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path`` and rename: never a half file."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(
    path: PathLike,
    potential: TransIPPotential,
    config: ModelConfig,
    training: Optional[Dict[str, Any]] = None,
    metrics: Optional[Dict[str, Any]] = None,
    equivariance_state: Optional[Dict[str, torch.Tensor]] = None,
    resume_state: Optional[Dict[str, Any]] = None,
) -> None:
    payload = {
        "kind": CHECKPOINT_KIND,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "transip_md_version": __version__,
        "torch_version": str(torch.__version__),
        "model_config": config.to_dict(),
        "dtype": str(potential.network.energy_scale.dtype).removeprefix("torch."),
        "state_dict": {k: v.detach().cpu() for k, v in potential.state_dict().items()},
        "training": training or {},
        "metrics": metrics or {},
    }
    if equivariance_state is not None:
        payload["equivariance_state_dict"] = {k: v.detach().cpu() for k, v in equivariance_state.items()}
    if resume_state is not None:
        payload["resume"] = resume_state
    atomic_torch_save(payload, path)


def wrong_kind_message(path: PathLike, kind: str) -> str:
    """Why a file of ``kind`` (see :func:`file_kinds.sniff`) is not a checkpoint, and what to do."""
    if kind == file_kinds.EXPORTED:
        meta = file_kinds.exported_metadata(path) or {}
        source = meta.get("source_checkpoint")
        origin = f" ({source}, per its metadata)" if source else ""
        return (f"{path} is an exported transip-md model, not a training checkpoint; evaluate and "
                f"the engines (ASE, OpenMM, LAMMPS) take it directly, while export and resuming "
                f"training need the checkpoint it was exported from{origin}")
    if kind == file_kinds.DIRECTORY:
        return f"{path} is a directory, not a checkpoint file"
    if kind == file_kinds.NOT_ZIP:
        return f"{path} is not a transip-md checkpoint (not a torch zip archive; truncated or corrupt?)"
    return f"{path} is not a transip-md checkpoint: it is {file_kinds.describe(kind)}"


def load_checkpoint(path: PathLike, map_location: str = "cpu") -> Checkpoint:
    """Load and validate a checkpoint; every failure names the file and the problem."""
    path = Path(path)
    kind = file_kinds.sniff(path)
    if kind == file_kinds.MISSING:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if kind not in (file_kinds.CHECKPOINT, file_kinds.TORCH_SAVE):
        raise CheckpointError(wrong_kind_message(path, kind))
    damage = file_kinds.archive_damage(path)  # torch.load checks no CRC and no record size
    if damage is not None:
        raise CheckpointError(f"{path} is damaged: {damage}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe content
        raise CheckpointError(
            f"{path} could not be read as a checkpoint: {file_kinds.safe_error_text(exc)}") from None
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        hint = ""
        if isinstance(payload, dict) and "state_dict" not in payload and all(
            isinstance(v, torch.Tensor) for v in payload.values()
        ):
            hint = " (it looks like a bare state_dict)"
        raise CheckpointError(f"{path} is not a transip-md checkpoint{hint}")
    version = payload.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path} has no valid format_version")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, newer than this transip-md "
            f"({__version__}) understands (<= {CHECKPOINT_FORMAT_VERSION}); upgrade transip-md"
        )
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        potential = TransIPPotential(config)
        dtype = getattr(torch, payload.get("dtype", "float32"))
        potential = potential.to(dtype)
        potential.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path} has inconsistent model data: {exc}") from None
    potential.eval()
    return Checkpoint(
        config=config,
        potential=potential,
        training=payload.get("training", {}),
        metrics=payload.get("metrics", {}),
        equivariance_state=payload.get("equivariance_state_dict"),
        resume_state=payload.get("resume"),
        path=str(path),
    )
