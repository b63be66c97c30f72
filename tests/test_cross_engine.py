"""One set of configurations through every engine: all must equal the eager Python model.

Systems: acetate (CH3COO-, charge -1), ethanol, a periodic box of 27 waters and a triclinic box
of 27 waters. Model: the float64 random ``tiny`` model of conftest, exported with
``export_potential(..., dtype="float64")``. Engines: the exported file's ``compute``, the ASE
calculator, OpenMM (Reference and CPU platforms, TorchForce from ``transip_openmm``) and LAMMPS
(``pair_style transip``; serial and ``mpirun -np 2``, one ``lmp`` subprocess per run).

Errors are relative to the eager model: energy |dE|/|E|, forces max|dF|/max|F|; float64 must
agree to 1e-9. ``pytest -s`` prints the agreement table; it is also written to
``cross_engine.json`` in the session's temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import write

from conftest import make_potential, system_tensors
from transip_md.export import export_potential, load_exported
from transip_md.systems import water_box
from transip_md.units import ANGSTROM_PER_NM, KJ_PER_MOL_PER_EV

TOL = 1e-9
SPECORDER = ["H", "C", "N", "O"]
ENGINES = ["exported", "ase", "openmm-Reference", "openmm-CPU", "lammps-np1", "lammps-np2"]


def _systems():
    acetate = molecule("CH3COOH")
    # ASE's CH3COOH is C O O H C H H H: the acidic H (index 3) sits 0.98 Å from O (index 2).
    assert acetate.get_chemical_symbols()[3] == "H"
    assert np.linalg.norm(acetate.positions[3] - acetate.positions[2]) < 1.05
    acetate.pop(3)
    return {
        "acetate(-1)": (acetate, -1, 1),
        "ethanol": (molecule("CH3CH2OH"), 0, 1),
        "water27": (water_box(27, seed=11), 0, 1),
        "water27-triclinic": (water_box(27, seed=12, triclinic=True), 0, 1),
    }


SYSTEMS = list(_systems())


def _rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _tensors(atoms, charge, spin):
    return (*system_tensors(atoms, torch.float64), torch.tensor(charge), torch.tensor(spin))


# ----------------------------------------------------------------------------- engines
def _eval_module(module, atoms, charge, spin):
    out = module.compute(*_tensors(atoms, charge, spin), True, False)
    return float(out["energy"]), out["forces"].detach().double().numpy()


def _eval_ase(path, atoms, charge, spin):
    from transip_md.calculator import TransIPCalculator

    atoms = atoms.copy()
    atoms.info["charge"], atoms.info["spin"] = charge, spin
    atoms.calc = TransIPCalculator(str(path))
    return float(atoms.get_potential_energy()), atoms.get_forces()


def _eval_openmm(path, atoms, charge, spin, platform_name):
    import openmm
    import openmm.unit as u
    from openmm_helpers import context_for, energy_forces, system_with

    from transip_openmm import make_torch_force, topology_from_ase

    try:
        platform = openmm.Platform.getPlatformByName(platform_name)
    except Exception:
        pytest.skip(f"OpenMM platform {platform_name} not available")
    topology, positions = topology_from_ase(atoms)
    force = make_torch_force(str(path), topology, charge=charge, multiplicity=spin)
    context = context_for(system_with(force, atoms), positions, platform)
    energy, forces = energy_forces(context)
    del context
    # kJ/mol -> eV, kJ/mol/nm -> eV/Å
    return energy / KJ_PER_MOL_PER_EV, forces / (KJ_PER_MOL_PER_EV * ANGSTROM_PER_NM)


LAMMPS_DECK = """\
units           metal
atom_style      atomic
boundary        {boundary}
read_data       {data}
plugin          load {plugin}
pair_style      transip charge {charge} multiplicity {spin}
pair_coeff      * * {model} {symbols}
thermo_style    custom step pe
dump            f all custom 1 {dump} id type x y z fx fy fz
dump_modify     f format float %.17g sort id
run             0
print           "PE_TOTAL $(pe:%.17g)"
"""


def _lammps_inputs(workdir: Path, name: str, atoms):
    """Write the data file; molecules get a 40 Å box and ``boundary f f f``."""
    atoms = atoms.copy()
    if not atoms.pbc.any():
        atoms.set_cell([40.0, 40.0, 40.0])
        atoms.center()
        boundary = "f f f"
    else:
        boundary = "p p p"
    data = workdir / f"{name}.data"
    write(data, atoms, format="lammps-data", specorder=SPECORDER, masses=True)
    return data, boundary


def _start_lammps(workdir, plugin, model, name, atoms, charge, spin, nprocs):
    from transip_md.lammps import lammps_env, lmp_executable, mpirun_executable

    data, boundary = _lammps_inputs(workdir, name, atoms)
    tag = f"{name}-np{nprocs}"
    dump = workdir / f"{tag}.dump"
    deck = workdir / f"in.{tag}"
    deck.write_text(LAMMPS_DECK.format(boundary=boundary, data=data, plugin=plugin, charge=charge,
                                       spin=spin, model=model, symbols=" ".join(SPECORDER),
                                       dump=dump))
    cmd = [str(lmp_executable()), "-in", str(deck), "-log", "none", "-nocite"]
    if nprocs > 1:
        cmd = [str(mpirun_executable()), "-np", str(nprocs)] + cmd
    env = lammps_env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, dump


def _finish_lammps(proc, dump, n_atoms):
    out, _ = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"lmp failed (rc {proc.returncode}):\n{out[-2000:]}")
    energy = [float(m) for m in re.findall(r"^PE_TOTAL (\S+)", out, flags=re.M)]
    if not energy:
        raise RuntimeError(f"no PE_TOTAL line in LAMMPS output:\n{out[-2000:]}")
    lines = Path(dump).read_text().splitlines()
    start = max(i for i, ln in enumerate(lines) if ln.startswith("ITEM: ATOMS"))
    names = lines[start].split()[2:]
    rows = np.array([[float(v) for v in ln.split()] for ln in lines[start + 1:]])
    rows = rows[np.argsort(rows[:, names.index("id")])]
    ids = rows[:, names.index("id")].astype(int)
    assert ids.tolist() == list(range(1, n_atoms + 1)), "LAMMPS lost or renumbered atoms"
    forces = rows[:, [names.index("fx"), names.index("fy"), names.index("fz")]]
    return energy[-1], forces


# ----------------------------------------------------------------------------- the table
@pytest.fixture(scope="module")
def agreement(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cross_engine")
    potential = make_potential()  # float64, random tiny (2 layers x 4 Å), H C N O
    model = workdir / "tiny64.pt"
    export_potential(potential, model, dtype="float64")
    exported = load_exported(model)
    systems = _systems()

    results = {engine: {} for engine in ENGINES}
    reference = {}
    for name, (atoms, charge, spin) in systems.items():
        reference[name] = _eval_module(potential, atoms, charge, spin)

    def record(engine, name, fn):
        try:
            e, f = fn()
            e_ref, f_ref = reference[name]
            results[engine][name] = {"energy_rel": abs(e - e_ref) / abs(e_ref),
                                     "force_rel": _rel(f, f_ref), "energy_eV": e}
        except pytest.skip.Exception as exc:
            results[engine][name] = {"skipped": str(exc)}
        except Exception as exc:  # reported per cell by the tests
            results[engine][name] = {"error": f"{type(exc).__name__}: {exc}"}

    # LAMMPS: start all subprocesses first (they run while Python evaluates the rest).
    try:
        from transip_md.lammps import plugin_path

        plugin = plugin_path()
        pending = []
        for nprocs in (1, 2):
            for name, (atoms, charge, spin) in systems.items():
                pending.append((nprocs, name, atoms, charge, spin))
        lammps_error = None
    except Exception as exc:  # no compiler, no LAMMPS
        pending, lammps_error = [], f"{type(exc).__name__}: {exc}"

    for name, (atoms, charge, spin) in systems.items():
        record("exported", name, lambda: _eval_module(exported, atoms, charge, spin))
        record("ase", name, lambda: _eval_ase(model, atoms, charge, spin))
        for platform in ("Reference", "CPU"):
            record(f"openmm-{platform}", name,
                   lambda: _eval_openmm(model, atoms, charge, spin, platform))

    if lammps_error is not None:
        for nprocs in (1, 2):
            for name in systems:
                results[f"lammps-np{nprocs}"][name] = {"error": lammps_error}
    slots = 0
    running = []
    for job in pending + [None]:
        cost = 0 if job is None else job[0]
        while running and (job is None or slots + cost > max(2, os.cpu_count() or 1)):
            (nprocs, name, n_atoms), proc, dump = running.pop(0)
            slots -= nprocs
            record(f"lammps-np{nprocs}", name, lambda: _finish_lammps(proc, dump, n_atoms))
        if job is None:
            break
        nprocs, name, atoms, charge, spin = job
        proc, dump = _start_lammps(workdir, plugin, model, name, atoms, charge, spin, nprocs)
        running.append(((nprocs, name, len(atoms)), proc, dump))
        slots += nprocs

    # print and save
    lines = [f"{'engine':<18} {'system':<19} {'energy rel':>11} {'force rel':>11}"]
    for engine in ENGINES:
        for name in systems:
            r = results[engine][name]
            if "energy_rel" in r:
                lines.append(f"{engine:<18} {name:<19} {r['energy_rel']:>11.2e} {r['force_rel']:>11.2e}")
            else:
                lines.append(f"{engine:<18} {name:<19} {(r.get('error') or r.get('skipped'))[:60]}")
    table = "\n".join(lines)
    print("\ncross-engine agreement with the eager float64 model (relative):\n" + table)
    out = workdir / "cross_engine.json"
    out.write_text(json.dumps({"tolerance": TOL, "reference_energy_eV":
                               {k: v[0] for k, v in reference.items()},
                               "results": results}, indent=1))
    print(f"written to {out}")
    return results


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_equals_eager_model(agreement, engine, system):
    r = agreement[engine][system]
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert "error" not in r, r.get("error")
    assert r["energy_rel"] <= TOL, r
    assert r["force_rel"] <= TOL, r


def test_acetate_is_charged_and_has_no_acid_h():
    atoms, charge, _ = _systems()["acetate(-1)"]
    assert charge == -1 and atoms.get_chemical_formula() == "C2H3O2"
    oxygens = atoms.positions[atoms.numbers == 8]
    hydrogens = atoms.positions[atoms.numbers == 1]
    assert np.linalg.norm(oxygens[:, None] - hydrogens[None], axis=2).min() > 1.5
