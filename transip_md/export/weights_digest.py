"""A digest of an exported model's weights: written at export, recomputed by every loader (#18).

The zip CRC-32 of each member catches bytes damaged on disk or in transfer, and the record-size
check (:func:`transip_md.file_kinds.storage_mismatch`) records of another dtype or shape. Neither
sees a tensor record replaced by one of the same dtype and shape -- from another export of the
same architecture, or edited on purpose: every member is then intact, and the model computes
other energies without a word. The metadata therefore carries ``weights_digest``, a SHA-1 over
every parameter and buffer, and both doors (Python: model_file.load_exported, C++:
transip_model.cpp) recompute it after loading and refuse a file whose weights differ. A file
without the key (exported before it existed) is loaded without this check.

The byte layout (export/CONTRACT.md, "The weights digest"), for each parameter and buffer of the
exported module, in increasing byte order of its dotted name (``network.energy_scale``):

    "<name> <dtype> [<d0>,<d1>,...] <nbytes>\\n"  then the tensor's nbytes raw bytes

(ASCII; dtype as torch names it without ``torch.``: float64, float32, int64, bool, ...; ``[]``
for a 0-d tensor; the bytes of the contiguous CPU tensor, little-endian as on every platform
torch ships for). The digest is ``"sha1:" + hexdigest`` of the concatenation. It is a check
against damage and mix-ups, not a signature: whoever edits the weights can edit the digest.
"""

import hashlib
import warnings
from typing import Dict, Optional

import torch

#: The metadata key and the one algorithm this build computes.
DIGEST_KEY = "weights_digest"
ALGORITHM = "sha1"


def _named_tensors(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer by dotted name; a tensor shared by two names counts twice,
    as the C++ door (torch::jit::Module::named_parameters) sees it."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def weights_digest(module: torch.nn.Module) -> str:
    """``"sha1:<hex>"`` of the module's parameters and buffers (layout: module docstring)."""
    tensors = _named_tensors(module)
    h = hashlib.sha1()
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        t = tensors[name].detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = str(t.dtype).replace("torch.", "")
        shape = ",".join(str(int(n)) for n in t.shape)
        h.update(f"{name} {dtype} [{shape}] {len(data)}\n".encode("utf-8"))
        h.update(data)
    return f"{ALGORITHM}:{h.hexdigest()}"


def non_finite_weight(module: torch.nn.Module) -> Optional[str]:
    """The name of the first floating-point parameter or buffer holding NaN or an infinity,
    else None (a flipped exponent bit, a record from another dtype: the model would compute
    NaN or 1e180 energies)."""
    for name, t in sorted(_named_tensors(module).items()):
        if (t.is_floating_point() or t.is_complex()) and t.numel() and \
                not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


def weights_problem(module: torch.nn.Module, recorded: object, path: str = "") -> Optional[str]:
    """Words that follow "<path>" for weights that cannot be right, or None: a non-finite
    weight, or a digest that differs from ``recorded`` (the metadata's ``weights_digest``;
    None: an older file, not checked). A digest of an unknown algorithm warns, unchecked."""
    bad = non_finite_weight(module)
    if bad is not None:
        return f" is damaged: its weight {bad} holds NaN or infinite values; export the model again"
    if recorded is None:
        return None
    if not isinstance(recorded, str) or ":" not in recorded:
        return (f" has an invalid {DIGEST_KEY} in its metadata ({str(recorded)[:60]!r}); "
                "re-export it with python -m transip_md.export")
    if not recorded.startswith(f"{ALGORITHM}:"):  # a newer exporter's: not checkable here
        warnings.warn(f"{path}: its weights digest {recorded[:20]}... is of an algorithm this "
                      "transip-md does not compute; the weights are not checked", stacklevel=3)
        return None
    if weights_digest(module) != recorded:
        return (": its weights do not match the digest recorded at export (damaged or edited "
                "file): re-export it with python -m transip_md.export")
    return None

