"""The fused fast path (issue #16) equals the pure-TorchScript reference, in every engine.

One random float64/float32 ``tiny`` model (conftest), exported three times per dtype:
``reference`` (pure TorchScript), ``fused`` (each attention layer calls
``transip_ops::neighbor_attention``) and ``fused-qkv`` (``neighbor_attention_qkv``, the
per-token key/value form); every fused kind is compared with the reference. Every entry point of the contract, the ASE calculator,
OpenMM-Torch (Reference platform), LAMMPS (serial, ``mpirun -np 2``, one rank empty) and the
libtorch check program must give the same energies, forces and stress/virial with both files:
1e-10 relative in float64, 2e-5 in float32 (relative to the largest component). A fused file
without its library must be refused with a message that says what to do, in Python and C++;
the reference file must not mention the library at all.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.neighborlist import neighbor_list

from conftest import make_potential
from lammps_helpers import printed, read_dump, run_lmp, water
from test_cross_engine import _eval_ase, _eval_openmm, _systems
from transip_md.export import export_potential, load_exported
from transip_md.export.model_file import ModelFileError, loaded_operator_libraries
from transip_md.model.fused_attention import (FusedAttentionLayer, OPERATOR_LIBRARY,
                                              load_operator_library, use_fused_attention,
                                              uses_fused_attention)
from transip_md.model.static_shapes import plan_static_neighbors

RTOL = {"float64": 1e-10, "float32": 2e-5}
#: The fused kinds and the form use_fused_attention switches to for each.
FUSED = {"fused": "folded", "fused-qkv": "qkv"}
DTYPES = ("float64", "float32")
SYSTEMS = _systems()  # acetate(-1), ethanol, water27 (cubic), water27-triclinic
CHECKED = ("acetate(-1)", "water27", "water27-triclinic")
ROOT = Path(__file__).resolve().parents[1]


def rel(a, b) -> float:
    """max |a - b| / max |b| (one number for a whole array; b is the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def as_np(t):
    return t.detach().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


@pytest.fixture(scope="module")
def library():
    """The real transip_ops library (built on first use)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler to build the transip_ops library")
    return load_operator_library()


@pytest.fixture(scope="module")
def files(library, tmp_path_factory):
    """{dtype: {"reference": path, "fused": path, "fused-qkv": path}} of one random model."""
    out = tmp_path_factory.mktemp("fast_path")
    found = {}
    for dtype in DTYPES:
        ref = make_potential()
        found[dtype] = {"reference": out / f"ref-{dtype}.pt"}
        export_potential(ref, found[dtype]["reference"], dtype=dtype)
        for kind, form in FUSED.items():
            found[dtype][kind] = out / f"{kind}-{dtype}.pt"
            export_potential(use_fused_attention(copy.deepcopy(ref), form=form),
                             found[dtype][kind], dtype=dtype)
    return found


@pytest.fixture(scope="module")
def loaded(files):
    return {dtype: {kind: load_exported(path) for kind, path in pair.items()}
            for dtype, pair in files.items()}


def tensors(atoms, charge, spin, dtype):
    t = getattr(torch, dtype)
    return (torch.tensor(atoms.positions, dtype=t), torch.tensor(atoms.numbers),
            torch.tensor(np.asarray(atoms.cell), dtype=t), torch.tensor(atoms.pbc),
            torch.tensor(charge), torch.tensor(spin))


def assert_close(got, want, dtype, what):
    for key in want:
        err = rel(as_np(got[key]), as_np(want[key]))
        assert err <= RTOL[dtype], f"{what}: {key} differs by {err:.2e} (allowed {RTOL[dtype]})"


# ----------------------------------------------------------------------------- the layer
def test_switch_keeps_parameters_and_declares_the_library(library):
    ref = make_potential()
    fused = use_fused_attention(copy.deepcopy(ref))
    assert all(type(layer) is FusedAttentionLayer for layer in fused.network.layers)
    assert uses_fused_attention(fused) and not uses_fused_attention(ref)
    assert fused.operator_library == OPERATOR_LIBRARY and ref.operator_library == ""
    a, b = ref.state_dict(), fused.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert OPERATOR_LIBRARY in loaded_operator_libraries()


@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_fused_equals_reference(library, dtype, kind):
    """Without TorchScript: the layer itself (including forces and stress by autograd)."""
    ref = make_potential().to(getattr(torch, dtype))
    fused = use_fused_attention(copy.deepcopy(ref), form=FUSED[kind])
    for name in CHECKED:
        atoms, charge, spin = SYSTEMS[name]
        args = tensors(atoms, charge, spin, dtype)
        periodic = bool(atoms.pbc.any())
        want = ref.compute(*args, True, periodic)
        assert_close(fused.compute(*args, True, periodic), want, dtype, f"eager {name}")


# ----------------------------------------------------------------------------- entry points
@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compute_and_energy(loaded, dtype, kind):
    ref, fused = loaded[dtype]["reference"], loaded[dtype][kind]
    for name in CHECKED:
        atoms, charge, spin = SYSTEMS[name]
        args = tensors(atoms, charge, spin, dtype)
        periodic = bool(atoms.pbc.any())
        want = ref.compute(*args, True, periodic)
        assert float(want["forces"].abs().max()) > 1e-3  # forces that are not round-off
        assert_close(fused.compute(*args, True, periodic), want, dtype, f"compute {name}")
        e_ref, e_fused = float(ref.energy(*args).detach()), float(fused.energy(*args).detach())
        assert abs(e_fused - e_ref) <= RTOL[dtype] * abs(e_ref), name


def _static(model, atoms, charge, spin, dtype):
    positions, *rest = tensors(atoms, charge, spin, dtype)
    cell = np.asarray(atoms.cell) if atoms.pbc.any() else None
    plan = plan_static_neighbors(len(atoms), float(model.cutoff), cell, cell is not None)
    positions.requires_grad_(True)
    energy = model.energy_static(positions, *rest, *plan.arguments())
    (grad,) = torch.autograd.grad(energy, positions)
    return {"energy": energy.detach(), "forces": -grad}


@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_energy_static(loaded, dtype, kind):
    """The CUDA-graph path of OpenMM (static shapes, cell list or all pairs)."""
    ref, fused = loaded[dtype]["reference"], loaded[dtype][kind]
    for name in ("acetate(-1)", "water27-triclinic"):
        atoms, charge, spin = SYSTEMS[name]
        want = _static(ref, atoms, charge, spin, dtype)
        assert np.isfinite(float(want["energy"]))
        assert_close(_static(fused, atoms, charge, spin, dtype), want, dtype, f"static {name}")


def _pairs(atoms, cutoff):
    """Full neighbour pairs of ``atoms`` (both directions) with image shifts (Å)."""
    if atoms.pbc.any():
        i, j, shift = neighbor_list("ijS", atoms, cutoff)
        shift = shift @ np.asarray(atoms.cell)
    else:
        n = len(atoms)
        i, j = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
        keep = i != j
        i, j, shift = i[keep], j[keep], np.zeros((int(keep.sum()), 3))
    return torch.tensor(i), torch.tensor(j), shift


@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mapped_energies_forces_virial(loaded, dtype, kind):
    """LAMMPS on one rank (owner-mapped periodic images): energies, forces, virial."""
    ref, fused = loaded[dtype]["reference"], loaded[dtype][kind]
    t = getattr(torch, dtype)
    for name in CHECKED:
        atoms, charge, spin = SYSTEMS[name]
        i, j, shift = _pairs(atoms, float(ref.cutoff))
        args = (torch.tensor(atoms.positions, dtype=t), torch.tensor(atoms.numbers), i, j,
                torch.tensor(shift, dtype=t), torch.tensor(charge), torch.tensor(spin))
        want = dict(zip(("energies", "forces", "virial"), ref.mapped_energies_forces_virial(*args)))
        got = dict(zip(("energies", "forces", "virial"), fused.mapped_energies_forces_virial(*args)))
        if atoms.pbc.any():
            assert float(want["virial"].abs().max()) > 1e-3
        assert_close(got, want, dtype, f"mapped {name}")


def _ghost_split(atoms, nlocal):
    """The first ``nlocal`` atoms local, the rest ghosts (a rank of a decomposed molecule)."""
    i, j, _ = _pairs(atoms, 1e9)
    return i, j, nlocal


@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_local_energies_forces_and_halo(loaded, dtype, kind):
    """The LAMMPS entry points with ghost rows (R < M), including a rank that owns nothing."""
    ref, fused = loaded[dtype]["reference"], loaded[dtype][kind]
    t = getattr(torch, dtype)
    atoms, charge, spin = SYSTEMS["acetate(-1)"]
    q, s = torch.tensor(charge), torch.tensor(spin)
    z = torch.tensor(atoms.numbers)
    for nlocal in (len(atoms), 3, 0):
        i, j, _ = _ghost_split(atoms, nlocal)
        pos = torch.tensor(atoms.positions, dtype=t)
        want = dict(zip(("energies", "forces"), ref.local_energies_forces(pos, z, i, j, nlocal, q, s)))
        got = dict(zip(("energies", "forces"), fused.local_energies_forces(pos, z, i, j, nlocal, q, s)))
        if nlocal == 0:
            assert want["energies"].numel() == 0 and float(got["forces"].abs().max()) == 0.0
            continue
        assert_close(got, want, dtype, f"local_energies_forces nlocal={nlocal}")

        results = []
        for model in (ref, fused):  # one halo layer and its first derivatives
            leaf = pos.clone().requires_grad_(True)
            nbr, edge, env = model.halo_edges(leaf, z, i, j, nlocal, q, s)
            h = model.halo_embed(z, q, s).requires_grad_(True)
            out = model.halo_layer(1, h, nbr, edge, env)
            seed = torch.linspace(-1.0, 1.0, out.numel(), dtype=t).view_as(out)
            g_h, g_pos = torch.autograd.grad([out], [h, leaf], [seed])
            results.append({"out": out, "grad_h": g_h, "grad_positions": g_pos})
        assert_close(results[1], results[0], dtype, f"halo_layer nlocal={nlocal}")
    # a rank with ghost atoms only: no rows for the operator
    nbr, edge, env = fused.halo_edges(torch.tensor(atoms.positions, dtype=t), z,
                                      *_ghost_split(atoms, 0)[:2], 0, q, s)
    out = fused.halo_layer(0, fused.halo_embed(z, q, s), nbr, edge, env)
    assert out.shape == (0, fused.halo_feature_width())


@pytest.mark.parametrize("kind", FUSED)
def test_no_double_backward_but_reference_trains(library, kind):
    """Training (forces in the loss) needs second derivatives: the reference path has them,
    the operator refuses with a message naming the way out."""
    atoms, charge, spin = SYSTEMS["ethanol"]
    ref = make_potential()
    fused = use_fused_attention(copy.deepcopy(ref), form=FUSED[kind])
    for model, ok in ((ref, True), (fused, False)):
        pos = torch.tensor(atoms.positions, requires_grad=True)
        energy = model.energy(pos, torch.tensor(atoms.numbers), torch.zeros(3, 3),
                              torch.zeros(3, dtype=torch.bool), torch.tensor(0), torch.tensor(1))
        (grad,) = torch.autograd.grad(energy, pos, create_graph=True)
        loss = grad.square().sum()
        if ok:
            loss.backward()
            continue
        with pytest.raises(RuntimeError, match="no double backward; training uses the reference"):
            loss.backward()


# ----------------------------------------------------------------------------- the files
def _archive_code(path) -> str:
    with zipfile.ZipFile(path) as archive:
        return "\n".join(archive.read(n).decode("utf-8", "replace") for n in archive.namelist()
                         if "/code/" in n and n.endswith(".py"))


def test_files_declare_what_they_need(files, loaded):
    for dtype, pair in files.items():
        ref_meta = json.loads(str(loaded[dtype]["reference"].metadata_json))
        fused_meta = json.loads(str(loaded[dtype]["fused"].metadata_json))
        assert ref_meta["operator_library"] == "" and fused_meta["operator_library"] == "transip_ops"
        assert str(loaded[dtype]["fused"].operator_library) == "transip_ops"
        # the reference file's TorchScript never mentions the library (it loads without it)
        assert "transip_ops" not in _archive_code(pair["reference"])
        assert "transip_ops" not in loaded[dtype]["reference"].network.code
        assert "transip_ops.neighbor_attention(" in _archive_code(pair["fused"])
        assert "transip_ops.neighbor_attention_qkv(" in _archive_code(pair["fused-qkv"])
        qkv_meta = json.loads(str(loaded[dtype]["fused-qkv"].metadata_json))
        assert qkv_meta["operator_library"] == "transip_ops"


def test_export_cli_kernels(library, tmp_path, files):
    from transip_md.export.__main__ import build_parser

    help_text = build_parser().format_help()
    assert "--kernels" in help_text and "transip_ops" in help_text
    # A training checkpoint of a plain model (the shipped demo has edge_filter, which the fused
    # kernels refuse: tests/test_edge_filter.py).
    from transip_md.checkpoint import save_checkpoint
    from transip_md.model import named_config
    ref = make_potential()
    ckpt = tmp_path / "plain.ckpt.pt"
    save_checkpoint(ckpt, ref, named_config("tiny"), training={"mode": "augment", "steps": 1})
    out = tmp_path / "plain-fused.pt"
    proc = subprocess.run([sys.executable, "-m", "transip_md.export", str(ckpt), str(out),
                           "--kernels", "fused", "--dtype", "float64"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # the fidelity check compared the fused file with the eager reference model
    checked = re.search(r"fused, needs transip_ops.*exported = eager to (\S+) relative", proc.stdout)
    assert checked and float(checked.group(1)) <= RTOL["float64"], proc.stdout
    meta = json.loads(str(load_exported(out).metadata_json))
    assert meta["operator_library"] == "transip_ops"


def _run_python(code: str, env_update: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_update)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).parent, timeout=300)


def test_fused_file_without_library_is_refused_in_python(files, tmp_path):
    missing = tmp_path / "nowhere" / "libtransip_ops.so"
    code = f"""
        from transip_md.export import load_exported, ModelFileError
        load_exported({str(files['float64']['reference'])!r})  # needs nothing
        try:
            load_exported({str(files['float64']['fused'])!r})
        except ModelFileError as exc:
            print("REFUSED", exc)
        else:
            print("LOADED")
    """
    proc = _run_python(code, {"TRANSIP_OPS_LIBRARY": str(missing)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("REFUSED"), proc.stdout
    for fragment in (str(files["float64"]["fused"]), "transip_ops", str(missing),
                     "TRANSIP_OPS_LIBRARY", "--kernels reference"):
        assert fragment in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- engines
@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ase_calculator(files, dtype, kind):
    from transip_md.calculator import TransIPCalculator

    for name in CHECKED:
        atoms, charge, spin = SYSTEMS[name]
        results = []
        for which in ("reference", kind):
            a = atoms.copy()
            a.info["charge"], a.info["spin"] = charge, spin
            a.calc = TransIPCalculator(str(files[dtype][which]))
            r = {"energy": a.get_potential_energy(), "forces": a.get_forces()}
            if a.pbc.any():
                r["stress"] = a.get_stress()
            results.append(r)
        assert_close(results[1], results[0], dtype, f"ASE {name}")


@pytest.mark.parametrize("kind", FUSED)
def test_openmm_torchforce(files, kind):
    """openmm-torch's TorchForce runs the fused file in this process (the door loaded the
    library into the same libtorch)."""
    pytest.importorskip("openmmtorch")
    for name in ("acetate(-1)", "water27-triclinic"):
        atoms, charge, spin = SYSTEMS[name]
        e_ref, f_ref = _eval_openmm(files["float64"]["reference"], atoms, charge, spin, "Reference")
        e_fus, f_fus = _eval_openmm(files["float64"][kind], atoms, charge, spin, "Reference")
        assert abs(e_fus - e_ref) <= RTOL["float64"] * abs(e_ref), name
        assert rel(f_fus, f_ref) <= RTOL["float64"], name


# LAMMPS: `run 0` with energy, forces and the virial (pressure compute without kinetic part).
LAMMPS_DECK = """\
units           metal
atom_style      atomic
boundary        {boundary}
{processors}
read_data       {data}
plugin          load {plugin}
pair_style      transip
pair_coeff      * * {model} O H
compute         vir all pressure NULL virial
thermo_style    custom step pe c_vir[*]
dump            f all custom 1 {dump} id type x y z fx fy fz
dump_modify     f format float %.17g sort id
run             0
print           "PE_VIR $(pe:%.17g) $(c_vir[1]:%.17g) $(c_vir[2]:%.17g) $(c_vir[3]:%.17g) $(c_vir[4]:%.17g) $(c_vir[5]:%.17g) $(c_vir[6]:%.17g)"
"""


@pytest.fixture(scope="module")
def plugin():
    from transip_md.lammps.build import build_plugin

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no g++ to build the LAMMPS plugin")
    return build_plugin()


@pytest.fixture(scope="module")
def lammps_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("fast_lammps")
    return out, {
        # periodic water (32 waters, thinner than the ghost cutoff), triclinic water, and
        # 4 waters in the corner of a 40 Å box: with 2 ranks one of them owns no atom
        "water": (water.write_lammps_data(out / "water.data", water.water_box(32, seed=1)),
                  "p p p"),
        "triclinic": (water.write_lammps_data(out / "tri.data",
                                              water.water_box(27, tilt=0.2, seed=5)),
                      "p p p"),
        "cluster": (water.write_lammps_data(out / "cluster.data",
                                            water.water_cluster(4, vacuum=40.0, seed=3)), "f f f"),
    }


def _lammps_run(plugin, workdir, data, boundary, model, nprocs, tag):
    dump = workdir / f"{tag}.dump"
    processors = "processors 2 1 1" if nprocs == 2 else ""
    deck = LAMMPS_DECK.format(boundary=boundary, processors=processors, data=data, plugin=plugin,
                              model=model, dump=dump)
    out = run_lmp(deck, workdir, nprocs=nprocs, name=f"in.{tag}")
    assert out.returncode == 0, out.stdout[-3000:]
    values = printed(out.stdout, "PE_VIR")
    frame = read_dump(dump)
    forces = np.stack([frame["fx"], frame["fy"], frame["fz"]], axis=1)
    return {"energy": values[0], "virial": np.array(values[1:]), "forces": forces}, out.stdout


@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lammps_plugin(plugin, lammps_data, files, dtype, kind):
    workdir, systems = lammps_data
    for name, (data, boundary) in systems.items():
        for nprocs in (1, 2):
            if dtype == "float32" and nprocs == 2 and name != "cluster":
                continue  # float32 MPI: the empty-rank case is enough
            runs = {}
            for which in ("reference", kind):
                runs[which], text = _lammps_run(plugin, workdir, data, boundary,
                                                files[dtype][which], nprocs,
                                                f"{name}-{which}-{dtype}-np{nprocs}")
            if name == "cluster" and nprocs == 2:
                owned = re.search(r"TransIP: per rank: owned atoms (\d+)\.\.(\d+)", text)
                assert owned and owned.group(1) == "0", "one rank should own no atom"
            want = dict(runs["reference"])
            if boundary == "f f f":
                want.pop("virial")
            assert_close(runs[kind], want, dtype, f"LAMMPS {kind} {name} np{nprocs}")


@pytest.fixture(scope="module")
def check_program(library, tmp_path_factory):
    import importlib.util

    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: cannot build export/check/transip_check")
    spec = importlib.util.spec_from_file_location("transip_check_build",
                                                  ROOT / "export" / "check" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.build_check_program(tmp_path_factory.mktemp("fast_check"))


def _check(program, model, xyz, env=None, charge=0):
    proc = subprocess.run([str(program), str(model), str(xyz), "--charge", str(charge)],
                          capture_output=True, text=True, timeout=120,
                          env=None if env is None else dict(os.environ, **env))
    return proc


def _parse_check(text):
    from test_export_native import parse_output

    return parse_output(text)


@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_check_program(check_program, files, tmp_path, dtype, kind):
    for name in ("acetate(-1)", "water27-triclinic"):
        atoms, charge, _ = SYSTEMS[name]
        xyz = tmp_path / f"{name}.xyz"
        ase.io.write(xyz, atoms, format="extxyz")
        got = {}
        for which in ("reference", kind):
            proc = _check(check_program, files[dtype][which], xyz, charge=charge)
            assert proc.returncode == 0, proc.stderr
            got[which] = _parse_check(proc.stdout)
        keys = ["energy", "forces"] + (["stress"] if atoms.pbc.any() else [])
        assert_close({k: got[kind][k] for k in keys}, {k: got["reference"][k] for k in keys},
                     dtype, f"transip_check {name}")


def test_fused_file_without_library_is_refused_in_cpp(check_program, files, tmp_path):
    xyz = tmp_path / "water.xyz"
    ase.io.write(xyz, molecule("H2O"), format="extxyz")
    missing = tmp_path / "nowhere" / "libtransip_ops.so"
    env = {"TRANSIP_OPS_LIBRARY": str(missing)}
    ok = _check(check_program, files["float64"]["reference"], xyz, env)
    assert ok.returncode == 0, ok.stderr  # the reference file needs no library
    proc = _check(check_program, files["float64"]["fused"], xyz, env)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout)
    message = proc.stderr.strip()
    for fragment in (str(files["float64"]["fused"]), "'transip_ops'", str(missing),
                     "TRANSIP_OPS_LIBRARY", "--kernels reference"):
        assert fragment in message, message
    # the library path compiled into the program is used when the variable is unset
    env_free = {k: v for k, v in os.environ.items() if k != "TRANSIP_OPS_LIBRARY"}
    proc = subprocess.run([str(check_program), str(files["float64"]["fused"]), str(xyz)],
                          capture_output=True, text=True, timeout=120, env=env_free)
    assert proc.returncode == 0, proc.stderr
