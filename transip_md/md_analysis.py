"""Energy-conservation numbers of an MD run, computed one way for the demo, tests and benchmarks."""

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
