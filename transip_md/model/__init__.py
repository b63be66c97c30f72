"""TransIP model: configuration, neighbour search, network, potential and equivariance head."""

from .config import ModelConfig, named_config
from .potential import TransIPPotential

__all__ = ["ModelConfig", "named_config", "TransIPPotential"]
