"""Writing output files atomically: a temporary file beside the target, renamed into place.

A crash, an error or Ctrl-C mid-write leaves either the old file or none, never half a file.
"""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def check_output_path(path: PathLike) -> Path:
    """Fail early, naming the problem, if ``path`` cannot be written; returns its directory."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {directory}")
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"output directory is not writable: {directory}")
    if path.is_dir():
        raise IsADirectoryError(f"output path is a directory: {path}")
    return directory


@contextmanager
def atomic_output(path: PathLike) -> Iterator[str]:
    """Yield a temporary path to write to; on success it replaces ``path``."""
    path = Path(path)
    directory = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
