"""Training TransIP potentials (``python -m transip_md.train``)."""

from .config import TrainConfig, load_config
from .trainer import CHECKPOINT_NAME, Trainer

__all__ = ["TrainConfig", "load_config", "Trainer", "CHECKPOINT_NAME"]
