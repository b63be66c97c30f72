"""Reading labelled structures from the formats we meet in practice, and writing extxyz safely.

Formats are chosen by file extension only: guessing from content hides mistakes such as a
training script pointed at the wrong file. Every failure is turned into an exception that
names the offending file, because "could not convert string to float" from deep inside ASE
is useless when a training run reads a dozen files.

Where charge and spin live:
  * extxyz: ``charge=... spin=...`` on the comment line (``atoms.info``).
  * ASE databases (.db/.json/.aselmdb): ``row.data`` (OMol25 keeps ``charge``/``spin`` there,
    ``spin`` being the multiplicity) or ``row.key_value_pairs``. ``row.toatoms()`` drops
    both, so they are copied back into ``atoms.info`` here, ``data`` taking precedence.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import ase.db
import ase.io
from ase.io.formats import string2index

from .frames import Frame, _convert, frame_to_atoms

_XYZ_SUFFIXES = (".extxyz", ".xyz")
_DB_SUFFIXES = (".db", ".json", ".aselmdb")
SUPPORTED_SUFFIXES = _XYZ_SUFFIXES + _DB_SUFFIXES


def _select(items: list, index) -> list:
    """Apply an ASE-style index (int, slice or string such as ``":"`` / ``"-1"``)."""
    if isinstance(index, str):
        index = string2index(index)
    picked = items[index]
    return picked if isinstance(index, slice) else [picked]


def _key_value_pairs(row) -> dict:
    """The row's key/value pairs as stored.

    ``row.key_value_pairs`` reads values through attribute access, where ASE's own
    ``AtomsRow.charge`` property (sum of initial charges, usually 0) shadows a stored
    ``charge`` key; the raw values sit in the row's ``__dict__``.
    """
    raw = vars(row)
    keys = getattr(row, "_keys", None)
    if keys is None:
        return dict(row.get("key_value_pairs", {}) or {})
    return {key: raw[key] for key in keys if key in raw}


def _read_db_atoms(path: Path) -> list:
    """All rows of an ASE database as Atoms, with ``data``/``key_value_pairs`` put in ``info``."""
    suffix = path.suffix.lower()
    if suffix == ".aselmdb":
        # ase.db.connect knows the "aselmdb" type and imports ase_db_backends itself.
        # readonly avoids creating LMDB lock files next to (possibly shared) data.
        db = ase.db.connect(str(path), type="aselmdb", readonly=True, use_lock_file=False)
    else:
        db = ase.db.connect(str(path), type=suffix[1:], use_lock_file=False)
    try:
        images = []
        for row in db.select():
            atoms = row.toatoms()
            atoms.info.update(_key_value_pairs(row))
            data = row.get("data", {}) or {}
            atoms.info.update(data if isinstance(data, dict) else {})
            images.append(atoms)
        return images
    finally:
        close = getattr(db, "close", None)
        if close is not None:
            close()


def read_frames(path: str | Path, index=":") -> list[Frame]:
    """Read all (or ``index``-selected) structures of ``path`` as validated Frames.

    Frames lacking charge/spin get charge 0 / multiplicity 1 and one warning for the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"unsupported file extension {path.suffix!r} for {path}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")

    try:
        if suffix in _XYZ_SUFFIXES:
            if path.stat().st_size == 0:
                images = []
            else:
                images = ase.io.read(str(path), index=":", format="extxyz")
        else:
            images = _read_db_atoms(path)
        images = _select(list(images), index)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # ASE raises many unrelated types on malformed input.
        raise ValueError(f"could not parse {path}: {type(exc).__name__}: {exc}") from exc

    frames, n_missing = [], 0
    for i, atoms in enumerate(images):
        try:
            frame, missing = _convert(atoms, default_charge=0, default_spin=1)
        except ValueError as exc:
            raise ValueError(f"{path}: structure {i}: {exc}") from exc
        n_missing += bool(missing)
        frames.append(frame)
    if n_missing:
        warnings.warn(
            f"{path}: {n_missing} of {len(frames)} structures have no charge and/or spin; "
            "assumed charge=0, spin=1",
            stacklevel=2,
        )
    return frames


def _check_parent(path: Path) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: directory {parent} is not writable")
    return parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stage_extxyz(frames: Iterable[Frame], path: Path) -> Path:
    """Write ``frames`` to a hidden temp file beside ``path``; return its name.

    The caller renames it into place. On any error the temp file is removed, so an
    interrupted or failing write never leaves a truncated data set behind.
    """
    parent = _check_parent(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; data files should be shareable
        with os.fdopen(fd, "w") as handle:
            for frame in frames:
                atoms = frame_to_atoms(frame)
                if not atoms.info["source"]:
                    # ASE's extxyz writes an empty value as ``source=``, which its own
                    # parser then misreads; an absent key reads back as "" anyway.
                    del atoms.info["source"]
                ase.io.write(handle, atoms, format="extxyz")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_frames(frames: Iterable[Frame], path: str | Path) -> None:
    """Write ``frames`` as extended XYZ to ``path`` atomically (temp file + ``os.replace``)."""
    path = Path(path)
    if path.suffix.lower() not in _XYZ_SUFFIXES:
        raise ValueError(f"write_frames writes extxyz; use a .extxyz or .xyz name, not {path}")
    tmp = _stage_extxyz(frames, path)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
