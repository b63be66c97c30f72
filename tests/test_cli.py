"""The command lines as users type them: the ``transip-md`` console script, export's output
rule (issue #14: a forgotten output path must never destroy a checkpoint) and wrong kinds of
file named for what they are."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from conftest import make_potential
from transip_md.checkpoint import save_checkpoint
from transip_md.data.recipes import RECIPES
from transip_md.export import read_metadata
from transip_md.model import named_config

CONSOLE = Path(sys.executable).parent / "transip-md"
COMMANDS = ["data", "train", "evaluate", "export", "lammps", "demo"]


class Opaque:
    """Pickled by torch.save into a file that a safe (weights_only) load refuses."""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd)


def run_module(module: str, *args, cwd=None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", module, *args], cwd=cwd)


def console(*args, cwd=None) -> subprocess.CompletedProcess:
    if not CONSOLE.exists():
        pytest.fail(f"{CONSOLE} is missing: run `python -m pip install --no-deps -e .`")
    return run([CONSOLE, *args], cwd=cwd)


def error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "weights_only" not in out.stdout + out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), out.stderr[-2000:]
    return last


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    potential = make_potential()  # float64
    ckpt = d / "ckpt.pt"
    save_checkpoint(ckpt, potential, named_config("tiny"), training={"mode": "learned", "steps": 3})
    model = d / "model64.pt"
    out = run_module("transip_md.export", ckpt, model, "--dtype", "float64")
    assert out.returncode == 0, out.stderr
    unsafe = d / "unsafe.pt"
    torch.save({"kind": "transip-md-checkpoint", "payload": Opaque()}, unsafe)
    foreign_ts = d / "torchscript.pt"
    torch.jit.save(torch.jit.script(make_potential()), str(foreign_ts))
    text = d / "notes.txt"
    text.write_text("my notes, not a model\n")
    frames = []
    for k, name in enumerate(("H2O", "CH3OH", "NH3", "CH3CH2OH")):
        atoms = molecule(name)
        atoms.positions += np.random.default_rng(k).normal(0, 0.05, atoms.positions.shape)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 - k,
                                           forces=np.full((len(atoms), 3), 0.1 * k))
        atoms.info["charge"], atoms.info["spin"] = 0, 1
        frames.append(atoms)
    data = d / "data.extxyz"
    write(data, frames, format="extxyz")
    return {"dir": d, "ckpt": ckpt, "model": model, "unsafe": unsafe, "torchscript": foreign_ts,
            "text": text, "data": data}


# ----------------------------------------------------------------------------- export's output rule
def test_one_argument_export_never_overwrites_a_checkpoint(files, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(files["ckpt"].read_bytes())
    before = sha256(ckpt)
    out = run_module("transip_md.export", "ckpt.pt", cwd=tmp_path)
    last = error_line(out)
    assert "ckpt.pt is a transip-md training checkpoint" in last
    assert "export writes only new files or previous exports" in last
    assert "Did you mean: python -m transip_md.export ckpt.pt model.pt" in last
    assert sha256(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary left


def test_two_argument_export_refuses_a_checkpoint_as_output(files, tmp_path):
    target = tmp_path / "other_ckpt.pt"
    target.write_bytes(files["ckpt"].read_bytes())
    before = sha256(target)
    last = error_line(run_module("transip_md.export", files["ckpt"], target, "--force"))
    assert "training checkpoint" in last and "Did you mean" in last
    assert sha256(target) == before


def test_export_over_an_export_needs_force(files, tmp_path):
    target = tmp_path / "m.pt"
    target.write_bytes(files["model"].read_bytes())  # a float64 export
    before = sha256(target)
    last = error_line(run_module("transip_md.export", files["ckpt"], target))
    assert f"{target} is already an exported transip-md model" in last
    assert "use --force to replace it" in last
    assert sha256(target) == before
    out = run_module("transip_md.export", files["ckpt"], target, "--force", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    assert sha256(target) != before and read_metadata(target)["dtype"] == "float32"


def test_export_never_overwrites_an_unrelated_file(files, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_bytes(files["text"].read_bytes())
    before = sha256(target)
    for extra in ([], ["--force"]):
        last = error_line(run_module("transip_md.export", files["ckpt"], target, *extra))
        assert f"{target} is not a PyTorch file" in last
        assert "export writes only new files or previous exports" in last
        assert sha256(target) == before


def test_one_argument_export_says_what_it_exports(tmp_path):
    out = run_module("transip_md.export", "new.pt", "--no-check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.search(r"exporting the shipped model transip-demo \(.*transip-demo\.ckpt\.pt\) to new\.pt",
                     out.stdout), out.stdout
    assert read_metadata(tmp_path / "new.pt")["model_name"] == "transip-demo"


def test_export_help_documents_the_rule():
    out = run_module("transip_md.export", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "writes only new files or previous exports" in text and "--force" in text


# ----------------------------------------------------------------------------- wrong kinds of file
@pytest.mark.parametrize("case,pattern", [
    ("export exported as checkpoint",
     r"model64\.pt is an exported transip-md model, not a training checkpoint; export needs the "
     r"checkpoint it was exported from \(ckpt\.pt"),
    ("export unsafe pickle", r"unsafe\.pt could not be read as a checkpoint: it holds pickled Python objects"),
    ("export foreign torchscript", r"torchscript\.pt is not a transip-md checkpoint: it is a TorchScript archive"),
    ("evaluate unsafe pickle", r"unsafe\.pt could not be read as a checkpoint: it holds pickled Python objects"),
    ("evaluate foreign torchscript", r"torchscript\.pt is not a transip-md checkpoint: it is a TorchScript archive"),
    ("evaluate text file", r"notes\.txt is not a transip-md checkpoint"),
    ("info checkpoint", r"ckpt\.pt is not an exported transip-md model; it looks like a training checkpoint"),
    ("info unsafe pickle", r"unsafe\.pt is not an exported transip-md model; it looks like a training checkpoint"),
])
def test_wrong_kind_of_file(files, tmp_path, case, pattern):
    args = {
        "export exported as checkpoint": ["export", files["model"], tmp_path / "x.pt"],
        "export unsafe pickle": ["export", files["unsafe"], tmp_path / "x.pt"],
        "export foreign torchscript": ["export", files["torchscript"], tmp_path / "x.pt"],
        "evaluate unsafe pickle": ["evaluate", files["unsafe"], files["data"]],
        "evaluate foreign torchscript": ["evaluate", files["torchscript"], files["data"]],
        "evaluate text file": ["evaluate", files["text"], files["data"]],
        "info checkpoint": ["export", "--info", files["ckpt"]],
        "info unsafe pickle": ["export", "--info", files["unsafe"]],
    }[case]
    module = {"export": "transip_md.export", "evaluate": "transip_md.evaluate"}[args[0]]
    last = error_line(run_module(module, *args[1:]))
    assert re.search(pattern, last), last
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------- evaluate on exported files
def test_evaluate_cli_takes_the_exported_file(files, tmp_path):
    results = {}
    for name in ("ckpt", "model"):
        out = console("evaluate", files[name], files["data"], "--json", tmp_path / f"{name}.json",
                      "--rotations", "2")
        assert out.returncode == 0, out.stderr
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["ckpt"]["model_kind"] == "checkpoint" and results["model"]["model_kind"] == "exported"
    for key in ("energy_mae_mev_per_atom", "force_mae_mev_per_A"):
        assert abs(results["ckpt"][key] - results["model"][key]) < 1e-8, key
    assert results["model"]["training_mode"] == "learned"


# ----------------------------------------------------------------------------- the console script
def test_console_help_lists_every_command():
    out = console("--help")
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", out.stdout, re.MULTILINE), (name, out.stdout)
    assert "usage" in console().stderr  # no command: usage, exit 2
    assert console().returncode == 2
    bad = console("bogus")
    assert bad.returncode == 2 and "unknown command 'bogus'" in bad.stderr


def test_python_dash_m_transip_md_is_the_console():
    out = run_module("transip_md", "--help")
    assert out.returncode == 0 and all(name in out.stdout for name in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_console_subcommand_help_is_the_module_help(command):
    out = console(command, "--help")
    assert out.returncode == 0, out.stderr
    assert f"python -m transip_md.{command}" in out.stdout


def test_data_recipes_lists_every_recipe():
    for out in (console("data", "recipes"), run_module("transip_md.data", "recipes")):
        assert out.returncode == 0, out.stderr
        listed = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines() if line.strip()}
        assert set(listed) == set(RECIPES)
        assert all(summary.strip() for summary in listed.values())


def test_console_export_info(files):
    out = console("export", "--info", files["model"])
    assert out.returncode == 0, out.stderr
    assert "transip-md-model" in out.stdout and "float64" in out.stdout
    raw = console("export", "--info", "--json", files["model"])
    assert json.loads(raw.stdout)["source_checkpoint"] == "ckpt.pt"


def test_console_export_writes_and_refuses(files, tmp_path):
    target = tmp_path / "m.pt"
    out = console("export", files["ckpt"], target, "--no-check")
    assert out.returncode == 0 and target.exists(), out.stderr
    assert "use --force" in error_line(console("export", files["ckpt"], target))
