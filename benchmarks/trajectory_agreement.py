"""Same model, same initial state, ASE vs LAMMPS: do the two NVE trajectories agree?

  python benchmarks/trajectory_agreement.py                      # water64, 200 steps, deck + skin2 (~10 min, 2 cores)
  python benchmarks/trajectory_agreement.py --steps 400 --variants deck,skin2,every1 --out R
  python benchmarks/trajectory_agreement.py --steps 100 --variants deck
  python benchmarks/trajectory_agreement.py --masses ase         # LAMMPS gets ASE's masses as they are

The periodic 64-water box of ``benchmarks/nve_drift.py`` (``water_box(64, seed=7)``, 192 atoms),
the shipped model exported in float64 (``default_model_path("float64")``, or ``--model``),
Maxwell-Boltzmann velocities at 300 K from a fixed seed with zero total momentum; then ``--steps``
of plain NVE velocity Verlet at 0.5 fs in

* ASE: ``VelocityVerlet`` + ``TransIPCalculator`` (CPU), and
* LAMMPS in this process (``lammps.lammps``, one rank): ``pair_style transip`` (device cpu,
  ghosts auto = map on one rank), ``fix nve``, the same box, masses, positions and velocities
  (scattered from the same float64 arrays; velocities Å/ps = ASE's x 1000 fs), advanced one step
  at a time with ``run 1 pre no post no``.

Every ``--every`` steps it prints max |dx| between the engines (minimum image), max |dv| (Å/fs),
E_total of each engine and its change since step 0, and, to tell force errors from the
divergence of two chaotic trajectories, LAMMPS' forces/energy against the model's own
``compute()`` (the ASE calculator) at LAMMPS' current positions ("self-consistency"). Steps
at which LAMMPS rebuilt its neighbour list (seen as a new neighbour list: ghost count or pair
count or first neighbours changed; a rebuild that re-creates the same list is not seen) are counted and the LAMMPS E_total jump at them is compared with the other steps.

Units. LAMMPS metal's force-to-acceleration constant (ftm2v = 1/1.0364269e-4) and ASE's
(CODATA 2014 e/amu) differ by 5.5e-8 relative, so with identical masses the two engines
integrate slightly different equations of motion (and LAMMPS' KE of the same velocities is
5.5e-8 lower, ~4e-7 eV for this box). ``--masses matched`` (the default) gives LAMMPS masses
m_ASE x ftm2v_LAMMPS / ftm2v_ASE, which makes acceleration and kinetic energy identical to
ASE's for the same forces and velocities; ``--masses ase`` uses ASE's masses as they are.

Variants (``--variants``, comma list) of LAMMPS' neighbour settings:

* ``deck``: ``neighbor 1.0 bin`` + ``neigh_modify every 1 delay 0 check yes`` (nve_drift.py's deck)
* ``skin2``: ``neighbor 2.0 bin`` (same check): fewer rebuilds
* ``skin0.3``: ``neighbor 0.3 bin``: many rebuilds
* ``every1``: ``neighbor 1.0 bin`` + ``neigh_modify every 1 delay 0 check no``: rebuild every step

Writes ``OUT/trajectory_agreement.json`` (``--out``) with every sample row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

DT_FS = 0.5
TEMPERATURE_K = 300.0
LAMMPS_METAL_MVV2E = 1.0364269e-4  # LAMMPS update.cpp, units metal (ftm2v = 1 / this)
VARIANTS = {
    "deck": "neighbor 1.0 bin\nneigh_modify every 1 delay 0 check yes",
    "skin2": "neighbor 2.0 bin\nneigh_modify every 1 delay 0 check yes",
    "skin0.3": "neighbor 0.3 bin\nneigh_modify every 1 delay 0 check yes",
    "every1": "neighbor 1.0 bin\nneigh_modify every 1 delay 0 check no",
}


def water64():
    from transip_md.systems import water_box

    return water_box(64, seed=7)


def initial_state(seed: int, system=None):
    """(atoms, velocities in ASE units): 300 K Maxwell-Boltzmann from ``seed``, zero momentum."""
    from ase.md import velocitydistribution as vd

    atoms = water64() if system is None else system.copy()
    rng = np.random.default_rng(seed)
    vd.MaxwellBoltzmannDistribution(atoms, temperature_K=TEMPERATURE_K, rng=rng)
    vd.Stationary(atoms)
    return atoms, atoms.get_velocities().copy()


def ftm2v_ratio() -> float:
    """LAMMPS metal's ftm2v over ASE's (Å/ps^2 per eV/Å/amu): 1 + 5.5e-8."""
    from ase import units

    ase_ftm2v = (1000.0 * units.fs) ** 2  # 1 eV/Å/amu in Å/ps^2 (ASE time unit = 1/units.fs fs)
    return (1.0 / LAMMPS_METAL_MVV2E) / ase_ftm2v


def min_image(d: np.ndarray, cell: np.ndarray) -> np.ndarray:
    frac = d @ np.linalg.inv(cell)
    frac -= np.round(frac)
    return frac @ cell


class AseRun:
    def __init__(self, model: Path, atoms, velocities):
        from ase import units
        from ase.md.verlet import VelocityVerlet

        from transip_md.calculator import TransIPCalculator

        self.atoms = atoms.copy()
        self.atoms.info.update(atoms.info)
        self.atoms.set_velocities(velocities)
        self.atoms.calc = TransIPCalculator(str(model))
        self.dyn = VelocityVerlet(self.atoms, DT_FS * units.fs)
        self.v_unit = 1.0 / units.fs  # ASE velocity -> Å/fs

    def step(self, n: int = 1):
        self.dyn.run(n)

    def state(self) -> Dict:
        a = self.atoms
        pe = a.get_potential_energy()
        ke = a.get_kinetic_energy()
        return {"x": a.positions.copy(), "v": a.get_velocities() / self.v_unit,  # Å/fs
                "f": a.get_forces().copy(), "pe": pe, "ke": ke, "etot": pe + ke}


class LammpsRun:
    def __init__(self, model: Path, atoms, velocities, neigh: str, masses: str = "matched",
                 plugin: Optional[Path] = None):
        from ase import units

        from transip_md.lammps import start_lammps

        cell = np.asarray(atoms.cell)
        if np.any(np.abs(cell - np.diag(np.diag(cell))) > 0):
            raise ValueError("orthogonal boxes only")
        self.cell = cell
        symbols = atoms.get_chemical_symbols()
        elements = sorted(set(symbols), key=lambda e: (e != "O", e))  # O first, then A-Z
        types = np.array([elements.index(s) + 1 for s in symbols], dtype=np.int32)
        scale = ftm2v_ratio() if masses == "matched" else 1.0
        m = atoms.get_masses()
        self.lmp = start_lammps(cmdargs=["-log", "none", "-nocite", "-screen", "none"],
                                plugin=plugin if plugin is not None else True)
        lx, ly, lz = (repr(float(cell[k, k])) for k in range(3))
        self.lmp.commands_string(f"""
            units metal
            atom_style atomic
            atom_modify map array
            boundary p p p
            region box block 0 {lx} 0 {ly} 0 {lz}
            create_box {len(elements)} box
        """)
        for t, el in enumerate(elements, start=1):
            mass = m[types == t]
            assert np.all(mass == mass[0])
            self.lmp.command(f"mass {t} {float(mass[0]) * scale!r}")
        n = len(atoms)
        v_lmp = velocities * 1000.0 * units.fs  # ASE units -> Å/ps
        self.lmp.create_atoms(n, list(range(1, n + 1)), types.tolist(),
                              atoms.positions.reshape(-1).tolist(), v_lmp.reshape(-1).tolist())
        self.lmp.commands_string(f"""
            pair_style transip
            pair_coeff * * {model} {' '.join(elements)}
            {neigh}
            timestep {DT_FS / 1000.0!r}
            fix nve all nve
            thermo_style custom step pe ke etotal
            thermo_modify norm no
            thermo 0
            run 0
        """)
        # the created atoms are exactly the arrays (no rounding through text)
        x0 = self._sorted("x")
        assert np.array_equal(x0, atoms.positions), "LAMMPS positions differ from ASE's"
        assert np.array_equal(self._sorted("v"), v_lmp), "LAMMPS velocities differ"
        self.nlist = self.lmp.find_pair_neighlist("transip")
        self.builds = 0
        self._sig = self._signature()

    def _sorted(self, name: str) -> np.ndarray:
        nlocal = self.lmp.extract_global("nlocal")
        ids = np.array(self.lmp.numpy.extract_atom("id")[:nlocal])
        arr = np.array(self.lmp.numpy.extract_atom(name)[:nlocal], dtype=np.float64)
        return arr[np.argsort(ids)]

    def _signature(self):
        """Changes when LAMMPS rebuilt the neighbour list (ghosts re-created, pairs re-listed)."""
        nghost = self.lmp.extract_global("nghost")
        nl = self.lmp.numpy.get_neighlist(self.nlist)
        total = 0
        first = None
        for k in range(len(nl)):
            iatom, neigh = nl.get(k)
            total += len(neigh)
            if first is None:
                first = tuple(int(v) for v in neigh[:8])
        return (nghost, total, first)

    def step(self, n: int = 1) -> bool:
        """n steps; True if the neighbour list was rebuilt (at the last of them)."""
        self.lmp.command(f"run {n} pre no post no")
        sig = self._signature()
        rebuilt = sig != self._sig
        self._sig = sig
        self.builds += int(rebuilt)
        return rebuilt

    def etot(self) -> float:
        return self.lmp.get_thermo("pe") + self.lmp.get_thermo("ke")

    def state(self) -> Dict:
        pe = self.lmp.get_thermo("pe")
        ke = self.lmp.get_thermo("ke")
        return {"x": self._sorted("x"), "v": self._sorted("v") / 1000.0,  # Å/fs
                "f": self._sorted("f"), "pe": pe, "ke": ke, "etot": pe + ke}

    def close(self):
        self.lmp.close()


def reference_at(calc_atoms, x: np.ndarray) -> Dict:
    """The model's own energy/forces (ASE calculator) at positions x."""
    a = calc_atoms
    a.positions = x
    return {"pe": a.get_potential_energy(), "f": a.get_forces().copy()}


def run_variant(model: Path, atoms, velocities, ase_traj: List[Dict], steps: int, every: int,
                variant: str, masses: str, ref_atoms, out_rows: List[Dict],
                verbose: bool = True) -> Dict:
    t0 = time.perf_counter()
    lmp = LammpsRun(model, atoms, velocities, VARIANTS[variant], masses)
    setup_s = time.perf_counter() - t0
    cell = np.asarray(atoms.cell)
    s0 = lmp.state()
    e0 = s0["etot"]
    a0 = ase_traj[0]
    f_abs = float(np.max(np.abs(s0["f"] - a0["f"])))
    f_rel = f_abs / float(np.max(np.abs(a0["f"])))
    if verbose:
        print(f"\n== LAMMPS variant {variant} ({VARIANTS[variant].replace(chr(10), '; ')}), "
              f"masses {masses}")
        print(f"step 0 forces: max |F_lmp - F_ase| = {f_abs:.3e} eV/Å (relative {f_rel:.3e}); "
              f"PE_lmp - PE_ase = {s0['pe'] - a0['pe']:+.3e} eV; "
              f"KE_lmp - KE_ase = {s0['ke'] - a0['ke']:+.3e} eV")
        print(f"{'step':>5} {'max|dx| A':>10} {'max|dv| A/fs':>12} {'E_ase eV':>18} "
              f"{'E_lmp eV':>18} {'dE_ase':>10} {'dE_lmp':>10} {'dE_l-dE_a':>10} "
              f"{'F_lmp-F(x_lmp)':>14} {'PE_lmp-PE(x_lmp)':>16} {'rebuilds':>8}")
    jumps_rebuild, jumps_other = [], []  # per-step dE_lmp - dE_ase at rebuild / other steps
    prev_e = e0
    rows = []
    t_run = time.perf_counter()
    for step in range(1, steps + 1):
        rebuilt = lmp.step(1)
        e = lmp.etot()
        de_a = ase_traj[step]["etot"] - ase_traj[step - 1]["etot"]
        (jumps_rebuild if rebuilt else jumps_other).append((e - prev_e) - de_a)
        prev_e = e
        if step % every == 0:
            s = lmp.state()
            a = ase_traj[step]
            dx = float(np.max(np.abs(min_image(s["x"] - a["x"], cell))))
            dv = float(np.max(np.abs(s["v"] - a["v"])))
            ref = reference_at(ref_atoms, s["x"])
            fself = float(np.max(np.abs(s["f"] - ref["f"])))
            eself = s["pe"] - ref["pe"]
            row = {"variant": variant, "masses": masses, "step": step, "max_dx_A": dx,
                   "max_dv_A_per_fs": dv, "etot_ase": a["etot"], "etot_lmp": s["etot"],
                   "de_ase": a["etot"] - a0["etot"], "de_lmp": s["etot"] - e0,
                   "f_lmp_minus_model_at_x_lmp": fself, "pe_lmp_minus_model_at_x_lmp": eself,
                   "rebuilds": lmp.builds}
            rows.append(row)
            if verbose:
                print(f"{step:>5} {dx:>10.2e} {dv:>12.2e} {a['etot']:>18.10f} {s['etot']:>18.10f} "
                      f"{row['de_ase']:>+10.2e} {row['de_lmp']:>+10.2e} "
                      f"{row['de_lmp'] - row['de_ase']:>+10.2e} {fself:>14.2e} {eself:>+16.2e} "
                      f"{lmp.builds:>8d}", flush=True)
    run_s = time.perf_counter() - t_run
    lmp_builds = lmp.builds
    lmp.close()
    out_rows.extend(rows)
    jr, jo = np.abs(np.array(jumps_rebuild)), np.abs(np.array(jumps_other))
    summary = {"variant": variant, "masses": masses, "steps": steps,
               "force_step0_max_abs": f_abs, "force_step0_rel": f_rel,
               "pe_step0_diff": s0["pe"] - a0["pe"], "ke_step0_diff": s0["ke"] - a0["ke"],
               "rebuilds": lmp_builds,
               "step_dE_lmp_minus_ase_at_rebuilds_max": float(jr.max()) if len(jr) else None,
               "step_dE_lmp_minus_ase_other_max": float(jo.max()) if len(jo) else None,
               "step_dE_lmp_minus_ase_other_rms": float(np.sqrt(np.mean(jo ** 2))) if len(jo) else None,
               "lammps_setup_s": setup_s, "lammps_steps_s": run_s,
               "lammps_steps_per_s": steps / run_s,
               "final": rows[-1] if rows else None}
    if verbose:
        print(f"rebuilds: {lmp_builds}; per-step |dE_lmp - dE_ase| at rebuild steps: max "
              f"{summary['step_dE_lmp_minus_ase_at_rebuilds_max']}, at other "
              f"steps: max {summary['step_dE_lmp_minus_ase_other_max']}; LAMMPS {steps} steps in "
              f"{run_s:.1f} s ({steps / run_s:.1f} steps/s, incl. the reference evaluations)")
    return summary


def run_ase(model: Path, atoms, velocities, steps: int) -> Tuple[List[Dict], float]:
    import torch

    t0 = time.perf_counter()
    ase_run = AseRun(model, atoms, velocities)
    # the profiling executor re-specialises on every new neighbour count (2-3x slower here);
    # the LAMMPS plugin turns it off the same way (GraphOptimizerEnabledGuard)
    with torch.jit.optimized_execution(False):
        traj = [ase_run.state()]
        for _ in range(steps):
            ase_run.step(1)
            traj.append(ase_run.state())
    return traj, time.perf_counter() - t0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200,
                   help="NVE steps (~1 s per step per engine on 2 cores with the shipped model)")
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--variants", default="deck,skin2",
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--masses", default="matched", choices=("matched", "ase"),
                   help="matched: LAMMPS masses x ftm2v_LAMMPS/ftm2v_ASE (identical equations "
                        "of motion); ase: ASE's masses as they are")
    p.add_argument("--model", default=None, help="float64 export (default: the shipped model's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="folder for trajectory_agreement.json")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from transip_md.calculator import TransIPCalculator
    from transip_md.export import default_model_path

    model = Path(args.model).resolve() if args.model else default_model_path("float64")
    atoms, velocities = initial_state(args.seed)
    print(f"model {model}\nwater64: {len(atoms)} atoms, box {atoms.cell[0, 0]:.6f} Å, 300 K "
          f"(seed {args.seed}), NVE velocity Verlet {DT_FS} fs, {args.steps} steps; "
          f"ftm2v LAMMPS/ASE - 1 = {ftm2v_ratio() - 1:.3e}; masses {args.masses}")
    traj, ase_s = run_ase(model, atoms, velocities, args.steps)
    print(f"ASE: {args.steps} steps in {ase_s:.1f} s ({args.steps / ase_s:.1f} steps/s)")
    ref_atoms = atoms.copy()
    ref_atoms.calc = TransIPCalculator(str(model))
    rows: List[Dict] = []
    summaries = []
    for variant in variants:
        with torch.jit.optimized_execution(False):  # for the reference evaluations
            summaries.append(run_variant(model, atoms, velocities, traj, args.steps, args.every,
                                         variant, args.masses, ref_atoms, rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "trajectory_agreement.json").write_text(json.dumps(
            {"model": str(model), "steps": args.steps, "dt_fs": DT_FS, "seed": args.seed,
             "masses": args.masses, "ase_seconds": ase_s, "summaries": summaries, "rows": rows},
            indent=1))
        print(f"wrote {out / 'trajectory_agreement.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
