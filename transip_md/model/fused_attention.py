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

import math
import os

import torch
from torch import Tensor, nn

from .transformer import AttentionLayer, EdgeEncoder

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


class FusedQKVAttentionLayer(AttentionLayer):
    """:class:`AttentionLayer` through ``transip_ops::neighbor_attention_qkv``, the per-token
    key/value form of the same function with the same parameters.

    The token parts of keys and values, ``k_j = Wk x_j + bk`` and ``v_j = Wv x_j + bv``, belong
    to the neighbour alone, so they are computed once per token (one ``qkv`` product for all M
    rows) and the operator gathers them per slot inside its kernel; only the edge parts stay
    folded into the query (``q_edge = Wek_h^T q_h``, [H, R, E]). Per edge the operator does
    ~2W + 2HE multiply-adds instead of the folded form's 2HW + 2HE (8x fewer on the token side
    at 8 heads), and no [R, H, W] tensor exists: the query, folded copies and aggregated tokens
    of :class:`FusedAttentionLayer` were ~30 KiB per atom per layer of TransIP-S's peak memory
    (benchmarks/memory_profile.py). Not for training: the operator has no double backward.
    """

    def forward(self, h: Tensor, nbr_index: Tensor, edge: Tensor, envelope: Tensor) -> Tensor:
        n_rows = nbr_index.shape[0]
        W, H, D, E = self.width, self.heads, self.head_dim, self.edge_width
        x = self.norm_attn(h)
        qkv = self.qkv(x)  # [M, 3W]: q | k | v of every row (ghost rows are keys/values only)
        scale = 1.0 / math.sqrt(D)
        # The attending rows' q | k | v as one split (its backward is one concatenation; three
        # column slices would each zero-fill and copy an [M, 3W] gradient), without a row slice
        # when every row attends (no ghost rows: OpenMM, ASE, LAMMPS with mapped ghosts).
        rows = qkv if n_rows == qkv.shape[0] else qkv[:n_rows]
        q_tok, k_tok, v_tok = rows.split(W, dim=1)
        q = (q_tok * scale).view(n_rows, H, D)
        w_ek, w_ev, w_eb = self.edge_proj.weight.split([W, W, H], dim=0)
        b_ek, b_ev, b_eb = self.edge_proj.bias.split([W, W, H], dim=0)
        s_k, s_v = self.self_kv.chunk(2)
        # The edge's own logit bias e . w_eb[h] is linear in e like the edge key's term
        # e . (Wek_h^T q_h), so it folds into q_edge too (+ w_eb[h] for every row): the
        # operator's dedge then already holds its gradient, where a separate [R, K, H] linear
        # of the edges would cost a product and an [R, K, E] gradient add per layer.
        q_edge = torch.baddbmm(w_eb.unsqueeze(1), q.transpose(0, 1), w_ek.view(H, D, E))  # [H, R, E]
        # bk is inside k_j; what is left of the bias is per row and head (q . bek_h + beb_h).
        q_bias = (q * b_ek.view(H, D)).sum(-1) + b_eb  # [R, H]
        bias = q_bias.unsqueeze(1).expand(n_rows, nbr_index.shape[1], H)  # [R, K, H]
        k_self = k_tok + s_k
        v_self = (v_tok + s_v).view(n_rows, H, D)
        logit_self = (q * k_self.view(n_rows, H, D)).sum(-1)  # [R, H]
        own_row = torch.arange(n_rows, device=nbr_index.device).unsqueeze(1)
        gather_index = torch.where(nbr_index < h.shape[0], nbr_index, own_row)
        agg_v, agg_edge, a_sum, a_self = torch.ops.transip_ops.neighbor_attention_qkv(
            qkv, gather_index, edge, envelope, q_edge, bias, logit_self, scale)
        mixed = (agg_v.view(n_rows, H, D)
                 + torch.einsum("nhe,hde->nhd", agg_edge, w_ev.view(H, D, E))
                 + a_sum.unsqueeze(-1) * b_ev.view(H, D)
                 + a_self.unsqueeze(-1) * v_self)
        return self._finish(h, mixed)


class FusedEdgeEncoder(EdgeEncoder):
    """:class:`EdgeEncoder` through ``transip_ops::edge_encoder``: the same function, with the
    radial basis and both SiLU pre-activations recomputed in the backward instead of kept by
    autograd for the whole backward pass (~38 KiB per atom for TransIP-S; see
    ``transip_md/ops/csrc/edge_encoder.cpp``). ATen operators only, so every device runs it."""

    def forward(self, vec: Tensor, distance: Tensor) -> Tensor:
        first, second = self.mlp[0], self.mlp[2]
        return torch.ops.transip_ops.edge_encoder(
            distance, vec, self.centers, self.gamma, 1.0 / self.cutoff,
            first.weight, first.bias, second.weight, second.bias)


#: Fused forms :func:`use_fused_attention` can switch to: the folded query form (one
#: [R, H, W] query per row, ``neighbor_attention``) and the per-token key/value form.
FUSED_FORMS = {"folded": FusedAttentionLayer, "qkv": FusedQKVAttentionLayer}


def use_fused_attention(model: nn.Module, form: str = "folded") -> nn.Module:
    """Switch every attention layer of ``model`` (a :class:`TransIPPotential` or anything
    holding :class:`AttentionLayer` modules) to the fused layer of ``form`` (a key of
    :data:`FUSED_FORMS`; ``qkv`` also switches the :class:`EdgeEncoder` to
    :class:`FusedEdgeEncoder`), in place, and declare the library on the model
    (``model.operator_library``). Loads the library first (:func:`load_operator_library`),
    since the switched model calls it. Returns ``model``."""
    if form not in FUSED_FORMS:
        raise ValueError(f"unknown fused attention form {form!r}; choose one of "
                         f"{', '.join(FUSED_FORMS)}")
    filtered = [m for m in model.modules() if type(m) is AttentionLayer and m.edge_filter]
    if filtered:
        raise ValueError("this model's attention layers filter neighbour tokens by their edges "
                         "(model config edge_filter: true), which the fused operators do not "
                         "cover; export it with --kernels reference")
    rotary = [m for m in model.modules() if type(m) is AttentionLayer and m.rotary_keys]
    if rotary:
        raise ValueError("this model's attention layers rotate keys by the relative positions "
                         "(model config rotary_keys: true), which the fused operators do not "
                         "cover; export it with --kernels reference")
    load_operator_library()
    for module in model.modules():
        if type(module) is AttentionLayer:
            module.__class__ = FUSED_FORMS[form]
        elif type(module) is EdgeEncoder and form == "qkv":
            module.__class__ = FusedEdgeEncoder
    if hasattr(model, "operator_library"):
        model.operator_library = OPERATOR_LIBRARY
    return model


def uses_fused_attention(model: nn.Module) -> bool:
    """Whether any attention layer of ``model`` is fused (either form)."""
    return any(isinstance(m, tuple(FUSED_FORMS.values())) for m in model.modules())
