"""What kind of file a path holds, found from the zip directory alone (no code is loaded).

transip-md reads two kinds of file, and users mix them up:

* a training checkpoint (``torch.save`` of plain data: a ``data.pkl`` and no ``code/``),
  marked ``kind: transip-md-checkpoint``;
* an exported model (a TorchScript archive: ``code/`` plus ``extra/metadata.json`` with
  ``kind: transip-md-model``).

:func:`sniff` tells them (and everything else) apart so that every reader and writer can say
what a file is before touching it. It never unpickles anything: the checkpoint marker is
looked for as bytes in ``data.pkl``, the model's metadata is plain JSON.
"""

import json
import os
import re
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


def sniff(path: PathLike) -> str:
    """One of 'missing', 'directory', 'empty', 'not-zip', 'zip', 'torch-save', 'checkpoint',
    'torchscript', 'exported'. An unreadable file raises the OSError that names it."""
    path = Path(path)
    if not path.exists():
        return MISSING
    if path.is_dir():
        return DIRECTORY
    with open(path, "rb") as fh:  # PermissionError names the file
        if not fh.read(1):
            return EMPTY
    if not zipfile.is_zipfile(path):
        return NOT_ZIP
    try:
        with zipfile.ZipFile(path) as archive:
            return _archive_kind(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError):
        return NOT_ZIP  # a zip directory with broken entries: truncated or corrupt


def exported_metadata(path: PathLike) -> Optional[Dict[str, Any]]:
    """The raw (unvalidated) ``extra/metadata.json`` of an archive, or None if it has none
    that parses as a JSON object."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _metadata(archive)
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError):
        return None


def metadata_entry(names: List[str]) -> Optional[str]:
    """The archive member holding the model metadata (``<root>/extra/metadata.json``)."""
    for name in names:
        parts = name.split("/")
        if len(parts) == 3 and parts[1:] == ["extra", METADATA_NAME]:
            return name
    return None


def _archive_kind(archive: zipfile.ZipFile) -> str:
    names = archive.namelist()
    meta = _metadata(archive)
    if meta is not None and meta.get("kind") == EXPORTED_KIND:
        return EXPORTED
    if any(len(parts) > 2 and parts[1] == "code" for parts in (n.split("/") for n in names)):
        return TORCHSCRIPT
    pickle = next((n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")), None)
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
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


# ----------------------------------------------------------------------------- torch errors
_UNSAFE_ADVICE = re.compile(r"weights_only|weights only|safe_globals|arbitrary code execution",
                            re.IGNORECASE)
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def mentions_unsafe_load(text: str) -> bool:
    """Whether an error text carries torch's advice to retry with ``weights_only=False``."""
    return bool(_UNSAFE_ADVICE.search(text))


def safe_error_text(exc: BaseException) -> str:
    """The first line of an error; a refused ``weights_only`` load becomes a summary without
    torch's advice to load the file unsafely (which would let it run code)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    if not mentions_unsafe_load(text):
        return text.splitlines()[0]
    found = _UNSUPPORTED_GLOBAL.search(text)
    what = f" ({found.group(1)})" if found else ""
    return (f"it holds pickled Python objects{what} that a safe load does not run; "
            "transip-md files contain only tensors and plain data")
