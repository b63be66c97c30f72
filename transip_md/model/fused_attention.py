"""The compiled fast path of the attention layer (issue #16): one fused operator per layer.

:class:`FusedAttentionLayer` computes exactly what :class:`~.transformer.AttentionLayer` does,
with the same parameters, but replaces the gather / logits / softmax / aggregation block by
``torch.ops.transip_ops.neighbor_attention`` from the ``transip_ops`` library
(:mod:`transip_md.ops`), which never materialises the gathered neighbour tokens ``[R, K, W]``.
The queries before and the value projection, output projection and feed-forward block after
are the reference layer's own code.

:func:`use_fused_attention` switches a model to it in place (``layer.__class__``), so a state
dict, a checkpoint and every other attribute stay those of the reference model; only an export
of a switched model mentions the operator, and it declares ``operator_library = "transip_ops"``
so that loaders load the library first (export/CONTRACT.md). The reference layer stays the
tested reference, the training path (the operator has no double backward) and the export for
machines without the library.
"""

import os

import torch
from torch import Tensor, nn

from .transformer import AttentionLayer

#: The operator library a fused export declares (``operator_library`` in its metadata).
OPERATOR_LIBRARY = "transip_ops"
#: The operator the fused layer calls, as the dispatcher names it.
OPERATOR_NAME = "transip_ops::neighbor_attention"
#: A prebuilt library to load instead of building one (every loader honours it, C++ too).
LIBRARY_ENV = "TRANSIP_OPS_LIBRARY"


class OperatorUnavailable(RuntimeError):
    """The ``transip_ops`` library cannot be built or loaded in this process."""


def operator_registered() -> bool:
    """Whether ``transip_ops::neighbor_attention`` is registered in this process (by whatever
    loaded it): the test every loader applies, in Python and in C++."""
    try:
        torch.ops.transip_ops.neighbor_attention  # noqa: B018  (lookup raises if unregistered)
    except (AttributeError, RuntimeError):
        return False
    return True


def load_operator_library() -> str:
    """Make the operator available (idempotent) and return where it came from.

    ``$TRANSIP_OPS_LIBRARY`` names a prebuilt ``libtransip_ops.so``; otherwise
    :func:`transip_md.ops.load_library` builds (once, cached) and loads the package's own.
    Raises :class:`OperatorUnavailable` saying what was tried and what to do.
    """
    if operator_registered():
        return "already loaded"
    chosen = os.environ.get(LIBRARY_ENV, "")
    if chosen:
        try:
            torch.ops.load_library(chosen)
        except (OSError, RuntimeError) as exc:
            raise OperatorUnavailable(
                f"the operator library {OPERATOR_LIBRARY} could not be loaded from {chosen} "
                f"(${LIBRARY_ENV}): {exc}; point ${LIBRARY_ENV} at a libtransip_ops.so built "
                f"for this torch, or unset it to build one") from None
        where = chosen
    else:
        try:
            from .. import ops
        except ImportError as exc:
            raise OperatorUnavailable(f"this transip-md has no operator library "
                                      f"{OPERATOR_LIBRARY} (transip_md.ops: {exc})") from None
        try:
            ops.load_library()
        except (OSError, RuntimeError) as exc:  # OperatorLibraryError is a RuntimeError
            raise OperatorUnavailable(f"the operator library {OPERATOR_LIBRARY} could not be "
                                      f"built or loaded: {exc}") from None
        where = str(ops.library_path(build=False))
    if not operator_registered():
        raise OperatorUnavailable(f"{where} was loaded but does not register {OPERATOR_NAME}; "
                                  "it is not a transip_ops library of this transip-md")
    return where


class FusedAttentionLayer(AttentionLayer):
    """:class:`AttentionLayer` with its attention block computed by the fused operator.

    Same parameters and same function (to rounding); forces and virials through the
    operator's first derivatives. Not for training: the operator has no double backward.
    """

    def forward(self, h: Tensor, nbr_index: Tensor, edge: Tensor, envelope: Tensor) -> Tensor:
        x, gather_index, q_tok, q_edge, bias, logit_self, v_self = self._queries(h, nbr_index, edge)
        # The operator takes contiguous inputs (einsum and linear may return strided views).
        agg_tok, agg_edge, a_sum, a_self = torch.ops.transip_ops.neighbor_attention(
            x.contiguous(), gather_index.contiguous(), edge.contiguous(), envelope.contiguous(),
            q_tok.contiguous(), q_edge.contiguous(), bias.contiguous(), logit_self.contiguous())
        # The operator's weights are already normalised (divided by the softmax denominator).
        return self._finish(h, self._values(agg_tok, agg_edge, a_sum, a_self, v_self))


def use_fused_attention(model: nn.Module) -> nn.Module:
    """Switch every attention layer of ``model`` (a :class:`TransIPPotential` or anything
    holding :class:`AttentionLayer` modules) to :class:`FusedAttentionLayer`, in place, and
    declare the library on the model (``model.operator_library``). Loads the library first
    (:func:`load_operator_library`), since the switched model calls it. Returns ``model``."""
    load_operator_library()
    for module in model.modules():
        if type(module) is AttentionLayer:
            module.__class__ = FusedAttentionLayer
    if hasattr(model, "operator_library"):
        model.operator_library = OPERATOR_LIBRARY
    return model


def uses_fused_attention(model: nn.Module) -> bool:
    """Whether any attention layer of ``model`` is fused."""
    return any(isinstance(m, FusedAttentionLayer) for m in model.modules())
