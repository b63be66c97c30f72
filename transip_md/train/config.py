"""Training configuration: a YAML file with a ``model`` and a ``training`` section.

``model`` is either ``{size: s}`` (a named size, optionally with overrides) or a full
:class:`~transip_md.model.config.ModelConfig` dictionary. Shipped configs live in
``transip_md/configs/`` and can be named without a path (``--config transip-s``).
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union, get_args, get_origin

import yaml

from ..model.config import ModelConfig, named_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: ``learned`` is the per-atom MSE objective (also spelled ``learned-mse``); ``learned-contrastive``
#: the paper's pooled InfoNCE objective (see transip_md/model/equivariance.py).
TRAINING_MODES = ("learned", "learned-mse", "learned-contrastive", "augment", "none")
LEARNED_MODES = ("learned", "learned-mse", "learned-contrastive")


@dataclass
class TrainConfig:
    # learned / learned-mse (per-atom map g), learned-contrastive (the paper's pooled InfoNCE),
    # augment (rotated copies only), none
    mode: str = "learned"
    epochs: int = 50
    max_steps: Optional[int] = None  # stop early after this many optimiser steps
    batch_atoms: int = 1024
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    ema_decay: Optional[float] = 0.99
    energy_weight: float = 1.0
    force_weight: float = 10.0
    equivariance_weight: float = 1.0
    grad_clip: float = 10.0
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    eval_rotations: int = 4
    # Validate (and maybe checkpoint) at the end of an epoch once at least this many steps
    # passed since the last validation; small data sets have very short epochs.
    val_interval_steps: int = 0
    # learned-contrastive: InfoNCE temperature, and the weight of the optional per-atom MSE term
    # (0 = contrastive alone) relative to equivariance_weight.
    contrastive_temperature: float = 0.1
    contrastive_mse_weight: float = 0.0
    # Stop after this many validations without a better selection score (None = never).
    early_stopping_patience: Optional[int] = None
    # Stop after this many seconds of training wall time (validation included; None = never).
    max_seconds: Optional[float] = None
    # With max_seconds: the cosine schedule's progress is the larger of the step fraction
    # (steps / max_steps) and the time fraction (elapsed / max_seconds), so that a run stopped
    # by its time budget ends annealed. Without it such a run stops wherever the step schedule
    # happens to be (the 2026-12-02 study: 3,700-7,200 of 20,000 steps, at 70-92 % of the peak
    # rate). The schedule then depends on the machine's speed, i.e. runs are not bit-reproducible.
    schedule_by_time: bool = False
    # The progress bar's loss readout copies a number to the host; do it every this many steps.
    log_interval_steps: int = 50

    def __post_init__(self) -> None:
        if self.mode not in TRAINING_MODES:
            raise ValueError(f"unknown training mode '{self.mode}'; use one of {TRAINING_MODES}")
        if self.contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature must be positive, got {self.contrastive_temperature}")
        if self.contrastive_mse_weight < 0:
            raise ValueError(f"contrastive_mse_weight must be >= 0, got {self.contrastive_mse_weight}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
        if self.schedule_by_time and self.max_seconds is None:
            raise ValueError("schedule_by_time needs max_seconds (the time the schedule spans)")
        if self.log_interval_steps < 1:
            raise ValueError(f"log_interval_steps must be >= 1, got {self.log_interval_steps}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got '{self.dtype}'")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _typed(data: Dict[str, Any], cls, what: str) -> Dict[str, Any]:
    """``data`` with YAML's near-misses fixed or refused by the field types of ``cls``.

    PyYAML follows YAML 1.1, where ``1e-3`` (no dot in the mantissa) is a *string*; a config
    saying ``lr: 1e-3`` then failed deep inside the optimiser (seen 2026-12-02). A numeric field
    given a string that reads as a number gets the number; any other string, or a bool where a
    number belongs (or the reverse), is an error naming the section and the key."""
    out = dict(data)
    for f in fields(cls):
        if f.name not in out or out[f.name] is None:
            continue
        origin = get_origin(f.type)
        if origin is not None and origin is not Union:
            continue  # a list or dict field: left to the dataclass
        allowed = set(get_args(f.type)) if origin is Union else {f.type}
        value = out[f.name]
        numeric = allowed & {int, float}
        if numeric and not isinstance(value, bool) and isinstance(value, (str, int, float)):
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"{what} key {f.name}: expected a number, got '{value}'") from None
            if float in numeric:
                out[f.name] = number
            elif number.is_integer():
                out[f.name] = int(number)
            else:
                raise ValueError(f"{what} key {f.name}: expected a whole number, got {value}")
        elif numeric or (bool in allowed and not isinstance(value, bool)):
            kind = "a number" if numeric else "true or false"
            raise ValueError(f"{what} key {f.name}: expected {kind}, got {value!r}")
    return out


def _from_dict(cls, data: Dict[str, Any], what: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys: {', '.join(unknown)}")
    return cls(**_typed(data, cls, what))


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"no config file '{name_or_path}' and no shipped config of that name ({names})")


def load_config(name_or_path: str) -> Tuple[ModelConfig, TrainConfig]:
    path = resolve_config_path(name_or_path)
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    unknown = sorted(set(raw) - {"model", "training"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {', '.join(unknown)} (use model, training)")
    model_raw = dict(raw.get("model") or {})
    size = model_raw.pop("size", None)
    known = {f.name for f in fields(ModelConfig)}
    model_raw = _typed({k: v for k, v in model_raw.items() if k in known}, ModelConfig, "model") | {
        k: v for k, v in model_raw.items() if k not in known}  # unknown keys: from_dict names them
    if size is not None:
        base = named_config(size).to_dict()
        base.update(model_raw)
        model_cfg = ModelConfig.from_dict(base)
    else:
        model_cfg = ModelConfig.from_dict(model_raw)
    train_cfg = _from_dict(TrainConfig, dict(raw.get("training") or {}), "training")
    return model_cfg, train_cfg
