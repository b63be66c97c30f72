"""Turning errors raised inside TorchScript into the Python exceptions users expect."""

import re

import torch

#: What a scripted model raises; its text ends with "builtins.ValueError: <message>".
ScriptError = (torch.jit.Error, RuntimeError)


def translate_model_error(exc: BaseException) -> Exception:
    """``torch.jit.Error('... builtins.ValueError: element X ...')`` -> ``ValueError('element X ...')``."""
    text = str(exc)
    match = None
    for match in re.finditer(r"^(?:builtins\.)?(ValueError|RuntimeError|IndexError): (.+)$", text, re.M):
        pass
    if match is None:
        return exc if isinstance(exc, Exception) else RuntimeError(text)
    kind, message = match.group(1), match.group(2).strip()
    return ValueError(message) if kind == "ValueError" else RuntimeError(message)
