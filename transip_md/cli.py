"""Shared command-line conventions: errors as one line on stderr with exit status 2."""

import sys
from typing import Callable, List, Optional

from .file_kinds import mentions_unsafe_load, safe_error_text


def error_line(exc: BaseException) -> str:
    """The one line shown for ``exc``: its last line, never torch's advice to load unsafely."""
    text = str(exc).strip()
    if mentions_unsafe_load(text):
        return safe_error_text(exc)
    return text.splitlines()[-1] if text else type(exc).__name__


def run_cli(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run ``main``; user-facing errors become ``error: ...`` and exit status 2, no traceback."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, RuntimeError,
            KeyError, OSError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
