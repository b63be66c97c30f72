"""Training checkpoints (``ckpt.pt``): writing them atomically and loading them safely.

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(weights_only=True)`` (no pickled code runs). It carries its own format
version; a reader refuses versions newer than it understands instead of guessing.
"""

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from . import __version__
from .atomic_io import atomic_output
from .model.config import ModelConfig
from .model.potential import TransIPPotential

CHECKPOINT_KIND = "transip-md-checkpoint"
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


def load_checkpoint(path: PathLike, map_location: str = "cpu") -> Checkpoint:
    """Load and validate a checkpoint; every failure names the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a transip-md checkpoint (not a torch zip archive; truncated or corrupt?)"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe content
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} could not be read as a checkpoint: {first}") from None
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
