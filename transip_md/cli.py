"""Shared command-line conventions: errors as one line on stderr with exit status 2."""

import sys
from typing import Callable, List, Optional


def run_cli(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run ``main``; user-facing errors become ``error: ...`` and exit status 2, no traceback."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, RuntimeError,
            KeyError, OSError) as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
