"""The exported file runs without Python: export/check/transip_check (libtorch only) vs Python.

Builds the C++ program once with g++ against the installed torch wheel (~10-30 s), then compares
its energies, forces and stresses with ``load_exported(...).compute(...)`` and checks that bad
inputs and bad model files end with a message and exit status 2.
"""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.data import chemical_symbols

from transip_md.export import load_exported
from transip_md.model import TransIPPotential, named_config

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "export" / "check" / "build.py"
RTOL = {"float64": 1e-10, "float32": 1e-5}


def _load_build_module():
    spec = importlib.util.spec_from_file_location("transip_check_build", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check_program(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: cannot build export/check/transip_check")
    build = _load_build_module()
    return build.build_check_program(tmp_path_factory.mktemp("transip_check"))


@pytest.fixture(scope="module")
def models(exported_tiny64, exported_tiny32):
    return {"float64": exported_tiny64, "float32": exported_tiny32}


def run_check(program, *args, expect_ok=True):
    proc = subprocess.run([str(program), *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def parse_output(text):
    """'key value' lines, and 'forces N' / 'stress 3' followed by rows of three numbers."""
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith("#")]
    out, k = {}, 0
    while k < len(lines):
        key, *rest = lines[k].split()
        k += 1
        if key in ("forces", "stress", "cell", "atoms"):
            rows = int(rest[0])
            out[key] = np.array([[float(v) for v in lines[k + r].split()] for r in range(rows)])
            k += rows
        else:
            out[key] = float(rest[0]) if len(rest) == 1 else [float(v) for v in rest]
    return out


def write_xyz(path, atoms, comment=""):
    """Plain xyz with round-trip precision (repr of each float)."""
    lines = [str(len(atoms)), comment]
    lines += [f"{s} {x!r} {y!r} {z!r}" for s, (x, y, z) in
              zip(atoms.get_chemical_symbols(), atoms.positions.tolist())]
    Path(path).write_text("\n".join(lines) + "\n")


def python_reference(model_path, atoms, charge, spin):
    model = load_exported(model_path)
    dtype = next(model.parameters()).dtype
    periodic = bool(atoms.pbc.any())
    out = model.compute(torch.tensor(atoms.positions, dtype=dtype),
                        torch.tensor(atoms.numbers, dtype=torch.long),
                        torch.tensor(np.asarray(atoms.cell), dtype=dtype),
                        torch.tensor(atoms.pbc, dtype=torch.bool),
                        torch.tensor(charge), torch.tensor(spin), True, periodic)
    return {k: v.double().numpy() for k, v in out.items()}


def relative(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def acetate():
    atoms = molecule("CH3COOH")
    symbols = atoms.get_chemical_symbols()
    oxygens = [k for k, s in enumerate(symbols) if s == "O"]
    acidic = next(k for k, s in enumerate(symbols) if s == "H" and
                  min(atoms.get_distance(k, o) for o in oxygens) < 1.1)
    del atoms[acidic]
    atoms.positions += np.random.default_rng(1).normal(0.0, 0.05, atoms.positions.shape)
    return atoms


def triclinic_box():
    rng = np.random.default_rng(7)
    cell = np.array([[6.3, 0.0, 0.0], [1.4, 6.1, 0.0], [-0.9, 1.1, 6.6]])
    pieces = []
    for name, center in (("H2O", (0.2, 0.2, 0.2)), ("CH3OH", (0.65, 0.55, 0.5)),
                         ("NH3", (0.3, 0.8, 0.85))):
        m = molecule(name)
        m.rotate(rng.uniform(0, 360), rng.normal(size=3))
        m.positions += np.asarray(center) @ cell - m.positions.mean(0)
        pieces.append(m)
    atoms = pieces[0] + pieces[1] + pieces[2]
    atoms.positions[0] += cell[1]  # one atom outside the cell: the model must wrap it
    atoms.cell = cell
    atoms.pbc = True
    return atoms


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_charged_molecule_matches_python(check_program, models, tmp_path, dtype):
    atoms = acetate()
    xyz = tmp_path / "acetate.xyz"
    if dtype == "float64":  # charge from the comment line ...
        write_xyz(xyz, atoms, "charge=-1 spin=1")
        got = parse_output(run_check(check_program, models[dtype], xyz).stdout)
    else:  # ... or from the command line
        write_xyz(xyz, atoms, "acetate")
        got = parse_output(run_check(check_program, models[dtype], xyz, "--charge", -1,
                                     "--spin", 1).stdout)
    assert got["natoms"] == len(atoms) and got["charge"] == -1 and got["periodic"] == 0
    assert "stress" not in got
    ref = python_reference(models[dtype], atoms, -1, 1)
    assert relative(got["energy"], ref["energy"]) <= RTOL[dtype]
    assert relative(got["forces"], ref["forces"]) <= RTOL[dtype]
    # The charge must reach the model: the neutral radical has another energy.
    neutral = parse_output(run_check(check_program, models[dtype], xyz, "--charge", 0,
                                     "--spin", 2).stdout)
    assert abs(neutral["energy"] - got["energy"]) > 1e-6


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_periodic_triclinic_matches_python(check_program, models, tmp_path, dtype):
    xyz = tmp_path / "box.xyz"
    ase.io.write(xyz, triclinic_box(), format="extxyz")
    atoms = ase.io.read(xyz)  # exactly the numbers the C++ program parses
    got = parse_output(run_check(check_program, models[dtype], xyz).stdout)
    assert got["periodic"] == 1 and got["natoms"] == len(atoms)
    ref = python_reference(models[dtype], atoms, 0, 1)
    assert relative(got["energy"], ref["energy"]) <= RTOL[dtype]
    assert relative(got["forces"], ref["forces"]) <= RTOL[dtype]
    assert relative(got["stress"], ref["stress"]) <= RTOL[dtype]
    # --cell on a plain xyz gives the same periodic system.
    plain = tmp_path / "plain.xyz"
    write_xyz(plain, atoms)
    again = parse_output(run_check(check_program, models[dtype], plain, "--cell",
                                   *np.asarray(atoms.cell).ravel().tolist()).stdout)
    assert relative(again["energy"], got["energy"]) <= RTOL[dtype]


def test_parse_only_element_table_and_lattice(check_program, tmp_path):
    symbols = chemical_symbols[1:84]  # H..Bi
    atoms = Atoms(symbols, positions=np.arange(3 * 83, dtype=float).reshape(83, 3) * 0.5)
    xyz = tmp_path / "all.xyz"
    lines = ["83", 'Lattice="9 0 0 1 8 0 0 0 7" pbc="T F T" charge=2 spin=3']
    # Symbols in any capitalisation and as atomic numbers.
    lines += [f"{(s.upper() if k % 3 == 1 else str(k + 1) if k % 3 == 2 else s)} {x!r} {y!r} {z!r}"
              for k, (s, (x, y, z)) in enumerate(zip(symbols, atoms.positions.tolist()))]
    xyz.write_text("\n".join(lines) + "\n")
    got = parse_output(run_check(check_program, "--parse-only", xyz, "--spin", 1).stdout)
    np.testing.assert_array_equal(got["atoms"][:, 0], np.arange(1, 84))
    np.testing.assert_array_equal(got["atoms"][:, 1:], atoms.positions)
    np.testing.assert_array_equal(got["cell"], [[9, 0, 0], [1, 8, 0], [0, 0, 7]])
    assert got["pbc"] == [1.0, 0.0, 1.0] and got["charge"] == 2 and got["spin"] == 1


def expect_error(program, *args, contains):
    proc = run_check(program, *args, expect_ok=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1, message
    for fragment in contains:
        assert fragment in message, message
    return message


def test_input_errors(check_program, models, tmp_path):
    model = models["float64"]
    unknown = tmp_path / "unknown.xyz"
    unknown.write_text("2\n\nO 0 0 0\nXq 0.97 0 0\n")
    expect_error(check_program, model, unknown, contains=["unknown.xyz:4", "'Xq'"])
    bad_line = tmp_path / "bad.xyz"
    bad_line.write_text("3\ncomment\nO 0 0 0\nH 0.97 0\nH 0 0.97 0\n")
    expect_error(check_program, model, bad_line, contains=["bad.xyz:4", "El x y z"])
    short = tmp_path / "short.xyz"
    short.write_text("3\n\nO 0 0 0\n")
    expect_error(check_program, model, short, contains=["short.xyz:4", "1 of 3 atoms"])
    expect_error(check_program, model, tmp_path / "absent.xyz", contains=["absent.xyz"])
    # Known symbol, but not an element of this model: the TorchScript error's last line.
    iron = tmp_path / "iron.xyz"
    iron.write_text("2\n\nO 0 0 0\nFe 1.9 0 0\n")
    expect_error(check_program, model, iron,
                 contains=["model error", "ValueError", "element Fe (Z=26", "H, C, N, O"])
    ok = tmp_path / "ok.xyz"
    ok.write_text("2\n\nO 0 0 0\nH 0.97 0 0\n")
    expect_error(check_program, model, ok, "--charge", 40, contains=["total charge 40"])


def test_model_file_errors(check_program, models, tmp_path):
    xyz = tmp_path / "water.xyz"
    write_xyz(xyz, molecule("H2O"))
    expect_error(check_program, tmp_path / "missing.pt", xyz,
                 contains=["cannot open model file", "missing.pt"])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    expect_error(check_program, corrupt, xyz,
                 contains=["corrupt.pt' is not a TorchScript archive", "truncated or corrupt"])
    # A scripted potential from a future exporter, and one never exported at all.
    scripted = torch.jit.script(TransIPPotential(named_config("tiny")).double())
    scripted.format_version = 99
    newer = tmp_path / "newer.pt"
    torch.jit.save(scripted, str(newer))
    expect_error(check_program, newer, xyz,
                 contains=["format_version 99 but this transip_check reads format_version <= 3",
                           "newer"])
    scripted.format_version = 0
    unexported = tmp_path / "unexported.pt"
    torch.jit.save(scripted, str(unexported))
    expect_error(check_program, unexported, xyz, contains=["format_version 0", "not an exported"])
    expect_error(check_program, models["float64"], xyz, "--device", "gpu0",
                 contains=["--device"])


# ----------------------------------------------------------------------------- the model door
def _format_two(path, potential):
    from lammps_helpers import write_old_format

    return write_old_format(potential, path)


def _edited(source, target, **attributes):
    module = torch.jit.load(str(source))
    for name, value in attributes.items():
        setattr(module, name, value)
    torch.jit.save(module, str(target))
    return target


def test_declaration_is_printed_and_format_two_files_load(check_program, models, tmp_path):
    """Format 3: the declaration the file carries; format 2 (old entry-point names, no
    declaration): probed by the same door, same numbers."""
    from conftest import make_potential

    xyz = tmp_path / "water.xyz"
    write_xyz(xyz, molecule("H2O"))
    new = run_check(check_program, models["float64"], xyz).stdout
    assert "# declaration: format_version 3 (declared by the file)" in new
    assert re.search(r"^# capabilities: .*\bcompute=1\b", new, re.MULTILINE), new
    assert "# species: H C N O" in new
    assert re.search(r"^# limits: .*cutoff=4 .*max_images=64", new, re.MULTILINE), new
    old_path = _format_two(tmp_path / "format2.pt", make_potential())
    old = run_check(check_program, old_path, xyz).stdout
    assert "# declaration: format_version 2 (no declaration: probed; local_energies_forces = " \
           "lammps(), mapped_energies_forces_virial = lammps_periodic())" in old
    a, b = parse_output(new), parse_output(old)
    assert a["energy"] == b["energy"]
    np.testing.assert_array_equal(a["forces"], b["forces"])


def test_declaration_refusals(check_program, models, tmp_path):
    xyz = tmp_path / "water.xyz"
    write_xyz(xyz, molecule("H2O"))
    caps = dict(torch.jit.load(str(models["float64"])).capabilities)
    del caps["compute"]
    no_compute = _edited(models["float64"], tmp_path / "no_compute.pt", capabilities=caps)
    expect_error(check_program, no_compute, xyz,
                 contains=[("no_compute.pt' does not provide compute (needed by transip_check; "
                            "the file has model format 3); re-export it with this transip-md: "
                            "python -m transip_md.export <checkpoint> no_compute.pt")])
    ops = _edited(models["float64"], tmp_path / "ops.pt", operator_library="transip_fast_ops")
    expect_error(check_program, ops, xyz,
                 contains=[("ops.pt' needs the operator library 'transip_fast_ops', which is "
                            "not loaded in transip_check")])


def test_model_rules_and_atom_rows(check_program, models, tmp_path):
    """The model's own rules run before compute (the electron count: the same words as in
    Python); errors about atoms name their lines in the input instead of model rows."""
    from transip_md.calculator import TransIPCalculator

    water = tmp_path / "water.xyz"
    write_xyz(water, molecule("H2O"))
    atoms = molecule("H2O")
    atoms.info["spin"] = 2
    atoms.calc = TransIPCalculator(str(models["float64"]))
    with pytest.raises(ValueError) as python_error:
        atoms.get_potential_energy()
    message = expect_error(check_program, models["float64"], water, "--spin", 2,
                           contains=["model error",
                                     "multiplicity 2 is impossible for 10 electrons"])
    assert str(python_error.value) in message
    overlap = tmp_path / "overlap.xyz"
    overlap.write_text("3\n\nO 0 0 0\nH 0.0005 0 0\nH 0 0.97 0\n")
    message = expect_error(check_program, models["float64"], overlap,
                           contains=["are at the same position"])
    assert "[atom rows:" not in message
    assert "[" + str(overlap) + ": atom 0 on line 3, atom 1 on line 4]" in message \
        or "[" + str(overlap) + ": atom 1 on line 4, atom 0 on line 3]" in message


def test_other_torch_major_version_warns(check_program, models, tmp_path):
    """A file exported with another torch major version still runs; the door warns once."""
    import json

    meta = json.loads(torch.jit.load(str(models["float64"])).metadata_json)
    meta["torch_version"] = "1.13.1"
    older = _edited(models["float64"], tmp_path / "torch1.pt", metadata_json=json.dumps(meta))
    xyz = tmp_path / "water.xyz"
    write_xyz(xyz, molecule("H2O"))
    proc = run_check(check_program, older, xyz)
    warnings = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1, proc.stderr
    assert f"torch1.pt' was exported with torch 1.13.1, transip_check runs libtorch " \
           f"{torch.__version__.split('+')[0]} (another major version)" in warnings[0]
    assert "energy" in parse_output(proc.stdout)
