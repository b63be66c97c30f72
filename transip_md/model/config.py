"""Model hyper-parameters and the named size configurations."""

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List

#: Highest atomic number with an embedding row (Bi, OMol25's range is Z = 1..83).
MAX_ATOMIC_NUMBER = 83
#: Total charges representable by the charge embedding: -MAX_ABS_CHARGE..+MAX_ABS_CHARGE.
MAX_ABS_CHARGE = 10
#: Spin multiplicities representable by the spin embedding: 1..MAX_MULTIPLICITY.
MAX_MULTIPLICITY = 11


#: Options added later, with the default that reproduces the earlier architecture.
LATER_OPTION_DEFAULTS: Dict[str, Any] = {"rbf_width_factor": 1.0, "edge_filter": False,
                                         "rotary_keys": False}


@dataclass
class ModelConfig:
    """Architecture of a TransIP network (everything needed to rebuild it from weights)."""

    width: int = 256
    heads: int = 8
    layers: int = 6
    cutoff: float = 5.0
    ffn_factor: int = 2
    edge_width: int = 64
    num_rbf: int = 16
    envelope_exponent: int = 5
    # Width of each Gaussian radial basis function relative to the spacing of their centres
    # (1.0 = the original width, sigma = cutoff / (num_rbf * sqrt(2))). An architecture lever for
    # the accuracy study; 1.0 keeps old checkpoints' function unchanged.
    rbf_width_factor: float = 1.0
    # Continuous-filter neighbour tokens (an architecture lever of the accuracy study): each
    # layer multiplies the gathered token of neighbour j by (1 + F e_ij), a learned per-channel
    # function of the edge features, before keys and values are formed, so a neighbour's
    # message depends on its element and its geometry jointly (SchNet's filter idea inside the
    # attention) instead of as a sum. F starts at zero: the layer starts as the plain one. The
    # fused operators (--kernels fused / fused-qkv) do not cover it: such models export with
    # --kernels reference.
    edge_filter: bool = False
    # Rotary encoding of the relative position inside the local attention (an architecture lever
    # of the accuracy study; the paper uses rotary encodings of centred coordinates over all
    # atoms): the token part of each logit becomes q_i . R(r_ij) k_ij, R rotating the head's
    # D / 2 channel pairs by angles omega_p (r_ij)_{axis p} (axes x, y, z in turn; wavelengths
    # from 2 x cutoff down to 1 Å). Keys are then formed per edge (D must be even). Reference
    # kernels only, like edge_filter.
    rotary_keys: bool = False
    # Layers whose outputs the equivariance network learns to rotate (negative = from the end).
    equivariance_layers: List[int] = field(default_factory=lambda: [-1])
    equivariance_hidden: int = 256

    def __post_init__(self) -> None:
        if self.width % self.heads != 0:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.cutoff <= 0:
            raise ValueError(f"cutoff must be positive, got {self.cutoff} Å")
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        if self.rotary_keys and (self.width // self.heads) % 2:
            raise ValueError(f"rotary_keys needs an even head width, got {self.width // self.heads}")
        if self.rbf_width_factor <= 0:
            raise ValueError(f"rbf_width_factor must be positive, got {self.rbf_width_factor}")

    @property
    def receptive_field(self) -> float:
        """Distance (Å) over which an atom's energy can depend on other atoms."""
        return self.layers * self.cutoff

    def to_dict(self) -> Dict[str, Any]:
        # Options added after the first checkpoints were shipped are written only when they
        # differ from their default: an old checkpoint's config (and the metadata of its
        # exported file) stays byte-identical, and old readers can still read new default files.
        data = asdict(self)
        for key, default in LATER_OPTION_DEFAULTS.items():
            if data[key] == default:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


#: Named sizes. ``tiny`` is for tests; ``s`` is the paper-scale small model.
NAMED_CONFIGS: Dict[str, ModelConfig] = {
    "tiny": ModelConfig(width=32, heads=4, layers=2, cutoff=4.0, edge_width=16, num_rbf=8,
                        equivariance_hidden=32),
    "xs": ModelConfig(width=64, heads=4, layers=3, cutoff=5.0, edge_width=32, num_rbf=12,
                      equivariance_hidden=64),
    "s": ModelConfig(width=256, heads=8, layers=6, cutoff=5.0),
    "m": ModelConfig(width=512, heads=16, layers=8, cutoff=5.0, edge_width=96,
                     equivariance_hidden=512),
    "l": ModelConfig(width=768, heads=16, layers=12, cutoff=6.0, edge_width=128,
                     equivariance_hidden=768),
}


def named_config(name: str) -> ModelConfig:
    key = name.lower().removeprefix("transip-")
    if key not in NAMED_CONFIGS:
        raise ValueError(
            f"unknown model size '{name}'; choose one of: "
            + ", ".join(f"transip-{k}" for k in NAMED_CONFIGS)
        )
    return ModelConfig.from_dict(NAMED_CONFIGS[key].to_dict())
