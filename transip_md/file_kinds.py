"""What kind of file a path holds, found from the zip directory alone (no code is loaded).

transip-md reads two kinds of file, and users mix them up:

* a training checkpoint (``torch.save`` of plain data: a ``data.pkl`` and no ``code/``),
  marked ``kind: transip-md-checkpoint``;
* an exported model (a TorchScript archive: ``code/`` plus ``extra/metadata.json`` with
  ``kind: transip-md-model``).

:func:`sniff` tells them (and everything else) apart so that every reader and writer can say
what a file is before touching it. It never unpickles anything: the checkpoint marker is
looked for as bytes in ``data.pkl``, the model's metadata is plain JSON.

:func:`archive_damage` is asked before torch reads a file, because torch checks neither the
zip CRC-32 of a member nor whether a tensor record has the size ``data.pkl`` gives it: a
flipped bit in the weights, or records from another file, would load and compute wrong
numbers. It follows ``data.pkl`` with an unpickler that imports and runs nothing.

:func:`not_a_file` / :func:`check_regular_file` word a path that is a directory, FIFO, socket or
device ("X is a FIFO (named pipe), not a model file") for every Python reader, before anything
opens it; the C++ door (lammps_examples/plugin/transip_model.cpp) says the same.
"""

import io
import json
import os
import pickle
import re
import stat
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

PathLike = Union[str, os.PathLike]

#: The ``kind`` fields the two file formats carry (checkpoint.py and export/model_file.py).
CHECKPOINT_KIND = "transip-md-checkpoint"
EXPORTED_KIND = "transip-md-model"
METADATA_NAME = "metadata.json"

MISSING = "missing"
DIRECTORY = "directory"
SPECIAL = "special"  # a FIFO, socket or device: opening or reading it may block forever
EMPTY = "empty"
NOT_ZIP = "not-zip"
ZIP = "zip"
TORCH_SAVE = "torch-save"  # torch.save archive that is not a transip-md checkpoint
CHECKPOINT = "checkpoint"
TORCHSCRIPT = "torchscript"  # TorchScript archive that is not a transip-md export
EXPORTED = "exported"

_DESCRIPTIONS = {
    MISSING: "missing",
    DIRECTORY: "a directory",
    SPECIAL: "not a regular file (a FIFO, socket or device)",
    EMPTY: "an empty file",
    NOT_ZIP: "not a PyTorch file (no zip archive)",
    ZIP: "a zip archive that is not a PyTorch file",
    TORCH_SAVE: "a PyTorch (torch.save) file that is not a transip-md checkpoint",
    CHECKPOINT: "a transip-md training checkpoint",
    TORCHSCRIPT: "a TorchScript archive that is not a transip-md model",
    EXPORTED: "an exported transip-md model",
}


def describe(kind: str) -> str:
    """What a :func:`sniff` result is, as words that follow "<path> is ..."."""
    return _DESCRIPTIONS[kind]


#: What a path that exists but is neither a regular file nor a directory is, by its st_mode.
_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_a_file(path: PathLike, what: str = "model file") -> Optional[str]:
    """"<path> is a directory, not a model file", "<path> is a FIFO (named pipe), not a model
    file" (a socket, a character or block device): why a path that exists is no file to read;
    None for a regular file or a missing path (the caller says "not found" its own way).

    The one place that decides these words (the C++ door, transip_model.cpp, says the same).
    Judged from the directory entry alone: nothing is opened, since opening a FIFO blocks until
    a writer comes (every loader hung on one)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing, a symlink loop, a dangling link: not ours to word
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"{path} is a directory, not a {what}"
    name = next((words for test, words in _SPECIAL_KINDS if test(mode)), "not a regular file")
    return f"{path} is {name}, not a {what}"


def check_regular_file(path: PathLike, what: str = "model file",
                       error: type = ValueError) -> None:
    """Raise FileNotFoundError ("<what> not found: <path>") if nothing is at ``path``, and
    ``error`` with the words of :func:`not_a_file` if it is a directory, FIFO, socket or
    device; return for a regular file. Nothing is opened."""
    if not Path(path).exists():  # also a symlink loop or a dangling link
        raise FileNotFoundError(f"{what} not found: {path}")
    problem = not_a_file(path, what)
    if problem is not None:
        raise error(problem)


def sniff(path: PathLike) -> str:
    """One of 'missing', 'directory', 'special', 'empty', 'not-zip', 'zip', 'torch-save',
    'checkpoint', 'torchscript', 'exported'. An unreadable file raises the OSError that names
    it. A FIFO, socket or device is 'special' and never opened (reading one can block)."""
    path = Path(path)
    if not path.exists():
        return MISSING
    if path.is_dir():
        return DIRECTORY
    if not stat.S_ISREG(path.stat().st_mode):
        return SPECIAL
    with open(path, "rb") as fh:  # PermissionError names the file
        if not fh.read(1):
            return EMPTY
    if not zipfile.is_zipfile(path):
        return NOT_ZIP
    try:
        with zipfile.ZipFile(path) as archive:
            return _archive_kind(archive)
    except PermissionError:
        raise
    except Exception:  # noqa: BLE001 -- zipfile, zlib and struct errors of a damaged archive
        return NOT_ZIP  # a zip directory with broken entries: truncated or corrupt


def exported_metadata(path: PathLike) -> Optional[Dict[str, Any]]:
    """The raw (unvalidated) ``extra/metadata.json`` of an archive, or None if it has none
    that parses as a JSON object."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with zipfile.ZipFile(path) as archive:
            return _metadata(archive)
    except Exception:  # noqa: BLE001 -- OSError, zipfile, zlib, struct: a damaged file
        return None


def metadata_entry(names: List[str]) -> Optional[str]:
    """The archive member holding the model metadata (``<root>/extra/metadata.json``)."""
    for name in names:
        parts = name.split("/")
        if len(parts) == 3 and parts[1:] == ["extra", METADATA_NAME]:
            return name
    return None


def archive_damage(path: PathLike) -> Optional[str]:
    """Why the zip archive at ``path`` is damaged (words that follow "<path> is damaged: "),
    or None if every member passes its CRC-32 check and no name occurs twice. torch checks
    neither: it reads stored tensors without their CRC, so a flipped bit in the weights loads
    and computes wrong numbers unless this is asked first. Reads the whole file."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if len(set(names)) != len(names):
                twice = sorted({n for n in names if names.count(n) > 1})
                return f"its archive holds {_member(twice[0])} more than once"
            bad = archive.testzip()
    except PermissionError:
        raise
    except Exception as exc:  # noqa: BLE001 -- zipfile, zlib, struct errors of damaged data
        name = type(exc).__name__
        if name == "error":  # zlib.error, struct.error
            name = f"{type(exc).__module__} error"
        return f"its zip archive does not read back ({name}: {safe_error_text(exc)})"
    if bad is not None:
        return f"its member {_member(bad)} fails the zip CRC-32 check (corrupted on disk or in transfer?)"
    return storage_mismatch(path)


# ----------------------------------------------------------------------------- tensor records
#: Bytes per element of the storage classes that torch pickles (typed storages by name).
_ELEMENT_BYTES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8,
    "UntypedStorage": 1,
}


class _Opaque:
    """Stands for every object of a scanned pickle: takes any arguments and state, runs
    nothing."""

    _name = ""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _StorageRef:
    def __init__(self, kind: str, key: str, numel: int):
        self.kind, self.key, self.numel = kind, key, numel


class _RecordScanner(pickle.Unpickler):
    """Unpickles data.pkl without importing or running anything: every global is an
    :class:`_Opaque` class, and the tensor records (persistent ids) and tensor views
    (``_rebuild_tensor_v2``) are collected to be checked against the archive."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: Dict[str, _StorageRef] = {}
        self.views: List[tuple] = []

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        return type(name, (_Opaque,), {"_name": name})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        ref = _StorageRef(getattr(kind, "_name", ""), str(key), int(numel))
        self.storages[ref.key] = ref
        return ref

    def _rebuild_tensor(self, storage, offset, size, stride, *rest):
        self.views.append((storage, int(offset), tuple(int(v) for v in size),
                           tuple(int(v) for v in stride)))
        return _Opaque()


def storage_mismatch(path: PathLike) -> Optional[str]:
    """Whether every tensor record of a torch archive (TorchScript or torch.save) has the size
    that data.pkl gives it, and every tensor fits in its record; words for the first that does
    not, else None. torch checks neither: a record swapped in from another file (other dtype or
    shapes) loads as garbage weights or beyond its end. An archive whose data.pkl this scan
    cannot follow is left to torch (None)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickle_name = pickle_entry(names)
        if pickle_name is None:
            return None
        root = pickle_name.split("/")[0]
        scanner = _RecordScanner(archive.read(pickle_name))
        try:
            scanner.load()
        except Exception:  # noqa: BLE001 -- not a pickle this scan follows: torch decides
            return None
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    for ref in scanner.storages.values():
        record = f"{root}/data/{ref.key}"
        if record not in sizes:
            return f"its tensor record data/{ref.key} is missing"
        element = _ELEMENT_BYTES.get(ref.kind)
        if element is not None and sizes[record] != ref.numel * element:
            return (f"its tensor record data/{ref.key} holds {sizes[record]} bytes where data.pkl "
                    f"expects {ref.numel} x {element} ({ref.kind}); records from another file?")
    for storage, offset, size, stride in scanner.views:
        if not isinstance(storage, _StorageRef) or len(size) != len(stride):
            continue
        if any(n == 0 for n in size):
            continue
        end = offset + sum((n - 1) * abs(st) for n, st in zip(size, stride)) + 1
        if offset < 0 or end > storage.numel:
            return (f"a tensor of shape {list(size)} reaches element {end} of its record "
                    f"data/{storage.key}, which holds {storage.numel}")
    return None


def _member(name: str) -> str:
    """A member's name without the archive's root folder."""
    return name.split("/", 1)[-1]


def pickle_entry(names: List[str]) -> Optional[str]:
    """The archive member holding the pickled object (``<root>/data.pkl``)."""
    return next((n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")), None)


def _archive_kind(archive: zipfile.ZipFile) -> str:
    names = archive.namelist()
    meta = _metadata(archive)
    if meta is not None and meta.get("kind") == EXPORTED_KIND:
        return EXPORTED
    if any(len(parts) > 2 and parts[1] == "code" for parts in (n.split("/") for n in names)):
        return TORCHSCRIPT
    pickle = pickle_entry(names)
    if pickle is None:
        return ZIP
    # The kind string is pickled verbatim (BINUNICODE), so a byte search finds it unpickled.
    return CHECKPOINT if CHECKPOINT_KIND.encode() in archive.read(pickle) else TORCH_SAVE


def _metadata(archive: zipfile.ZipFile) -> Optional[Dict[str, Any]]:
    name = metadata_entry(archive.namelist())
    if name is None:
        return None
    try:
        meta = json.loads(archive.read(name).decode("utf-8"))
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a 4300-digit number, deep nesting
        return None
    return meta if isinstance(meta, dict) else None


# ----------------------------------------------------------------------------- torch errors
_UNSAFE_ADVICE = re.compile(r"weights_only|weights only|safe_globals|arbitrary code execution",
                            re.IGNORECASE)
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
#: torch's boilerplate after some of its checks ("Expected hasRecord(...) to be true ...").
_TORCH_BOILERPLATE = re.compile(r"\s*\(Could this error message be improved\?[^)]*\)")


def mentions_unsafe_load(text: str) -> bool:
    """Whether an error text carries torch's advice to retry with ``weights_only=False``."""
    return bool(_UNSAFE_ADVICE.search(text))


def safe_error_text(exc: BaseException) -> str:
    """The first line of an error; a refused ``weights_only`` load becomes a summary without
    torch's advice to load the file unsafely (which would let it run code)."""
    text = _TORCH_BOILERPLATE.sub("", str(exc)).strip()
    if not text:
        return type(exc).__name__
    if not mentions_unsafe_load(text):
        return text.splitlines()[0].rstrip(":")
    found = _UNSUPPORTED_GLOBAL.search(text)
    what = f" ({found.group(1)})" if found else ""
    return (f"it holds pickled Python objects{what} that a safe load does not run; "
            "transip-md files contain only tensors and plain data")
