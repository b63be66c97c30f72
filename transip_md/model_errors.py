"""Turning errors raised inside TorchScript into the Python exceptions users expect."""

import re

import torch

#: What a scripted model raises; its text ends with "builtins.ValueError: <message>".
ScriptError = (torch.jit.Error, RuntimeError)


#: The machine-readable suffix of model errors about particular atoms (rows of the model input).
_ROWS_SUFFIX = re.compile(r"\s*\[atom rows:((?: \d+)+)\]\s*$")


def split_atom_rows(message: str):
    """``"atoms 3 and 7 ... [atom rows: 3 7]"`` -> (``"atoms 3 and 7 ..."``, [3, 7])."""
    match = _ROWS_SUFFIX.search(message)
    if match is None:
        return message, []
    return message[:match.start()], [int(r) for r in match.group(1).split()]


def translate_model_error(exc: BaseException) -> Exception:
    """``torch.jit.Error('... builtins.ValueError: element X ...')`` -> ``ValueError('element X ...')``."""
    text = str(exc)
    match = None
    for match in re.finditer(r"^(?:builtins\.)?(ValueError|RuntimeError|IndexError): (.+)$", text, re.M):
        pass
    if match is None:
        return exc if isinstance(exc, Exception) else RuntimeError(text)
    kind, message = match.group(1), split_atom_rows(match.group(2).strip())[0]
    return ValueError(message) if kind == "ValueError" else RuntimeError(message)
