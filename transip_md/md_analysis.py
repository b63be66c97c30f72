"""Numbers of an MD run (energy conservation, temperature), computed one way for the demo, tests and
benchmarks."""

import math
from typing import Dict, Sequence

import numpy as np


def energy_drift(times_ps: Sequence[float], energies_ev: Sequence[float], n_atoms: int) -> Dict[str, float]:
    """Linear-fit drift of the total energy (eV/atom/ps) and its scatter around the fit (eV/atom)."""
    t = np.asarray(times_ps, dtype=np.float64)
    e = np.asarray(energies_ev, dtype=np.float64)
    slope, intercept = np.polyfit(t, e, 1)
    residual = e - (slope * t + intercept)
    return {"drift_ev_per_atom_per_ps": float(slope / n_atoms),
            "fluctuation_ev_per_atom": float(residual.std() / n_atoms)}


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and standard deviation (ddof 0) of a thermo column, e.g. temperature or pressure."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std())}


def canonical_temperature_std(temperature_k: float, degrees_of_freedom: int) -> float:
    """Standard deviation of the instantaneous kinetic temperature in the canonical ensemble:
    the kinetic energy is a chi-squared variable with ``degrees_of_freedom`` terms, so
    sigma_T = T * sqrt(2 / dof) (192 atoms at 300 K: about 18 K)."""
    return temperature_k * math.sqrt(2.0 / degrees_of_freedom)
