"""Attention maths on heads-first tensors ``[batch, heads, tokens, dim]``.

Every model family reaches the controller in this one layout (UNets' ``[b, n, heads * dim]`` is a
free view of it). Explicit probabilities are computed in float32 whatever the model's dtype, as
ComfyUI's own attention upcasts: a half-precision softmax over 77 keys underflows and reweighting by
large factors overflows.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .columns import pick_columns

# ``(q, k, v, key_mask, rows) -> [b, queries, heads * dim_v]``: the model's own (fused) attention on
# ``rows`` of the call's batch (q, k, v and key_mask hold those rows alone); key_mask is None or an
# additive ``[b, 1, 1, keys]`` float mask.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, slice], torch.Tensor]
MASS_CHANNELS = 8  # value channels added to measure the text's share: kernels want dims in steps of 8


def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[b, n, h*d]`` (or ``[b, n, h, d]``, as SD3 passes its values) ``-> [b, h, n, d]``, a view."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[b, h, n, d] -> [b, n, h*d]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def text_distribution(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Each query's softmax over the text keys alone, ``[b, h, queries, keys]`` in float32: the
    cross-attention map (a UNet's cross-attention; a DiT's image-to-text block renormalised).
    ``key_mask`` ``[b, keys]``: additive, -inf on padding columns."""
    scores = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-1, -2)  # scaling q: the smaller tensor
    if key_mask is not None:
        scores = scores + key_mask[:, None, None, :]
    return scores.softmax(dim=-1)


def with_mass_channels(x: torch.Tensor) -> torch.Tensor:
    """``x`` with ``MASS_CHANNELS`` zero channels appended, a new tensor; ``mark_text_mass`` then
    turns the padded q and v into a measure of the text's share.

    Together they let the model's fused attention also give each query's total probability on the
    text keys (``split_mass``), without forming the joint attention matrix: the values get a channel
    that is 1 on the text keys and 0 elsewhere, so that channel of the output is the text's share of
    the softmax; queries and keys get zero channels to match (the scores are unchanged; q is rescaled
    for the kernel's 1/sqrt(dim)).
    """
    d = x.shape[-1]
    wide = x.new_empty(*x.shape[:-1], d + MASS_CHANNELS)  # written once: filling it with zeros first costs time
    wide[..., :d] = x
    wide[..., d:] = 0
    return wide


def mark_text_mass(q_wide: torch.Tensor, v_wide: torch.Tensor, text: slice) -> None:
    """In place on ``with_mass_channels`` copies: q rescaled, v's mass channel set on the text keys."""
    wide = q_wide.shape[-1]
    d = wide - MASS_CHANNELS
    q_wide[..., :d] *= math.sqrt(wide / d)
    v_wide[:, :, text, d] = 1


def split_mass(out: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of attention over ``with_mass_channels`` tensors, ``[b, queries, heads * wide]``
    -> the model's output ``[b, queries, heads * dim]`` and the text's share ``[b, heads, queries]``
    (float32). Both are copies: the wide output is freed with the caller's reference."""
    out = out.unflatten(-1, (heads, -1))
    d = out.shape[-1] - MASS_CHANNELS
    return out[..., :d].flatten(-2), out[..., d].transpose(1, 2).to(torch.float32, copy=True)


def map_cross_probs(
    source: torch.Tensor, own: torch.Tensor, matrix: torch.Tensor, from_source: torch.Tensor, picks: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's cross-attention replacement for ``n`` targets.

    ``source`` ``[h, q, K]`` and ``own`` ``[n, h, q, K]`` are probabilities; ``matrix`` ``[n, K, K]``
    maps source columns to target columns; ``from_source`` ``[n, K]`` says which target columns take
    the source's map now (aligned and inside their replace window). ``picks`` (``selection(matrix)``,
    where it is one) makes the map a gather instead of a product over all K x K column pairs, with
    the same result. Returns ``[n, h, q, K]``. Whether any column does is the caller's to know:
    testing it here would wait for the device.
    """
    if picks is None:
        mapped = torch.einsum("hqs,nst->nhqt", source, matrix)
    else:
        mapped = pick_columns(source, picks.flatten()).unflatten(-1, picks.shape).movedim(2, 0)
    return torch.where(from_source[:, None, None, :], mapped, own)


def selection(matrix: torch.Tensor, from_source: torch.Tensor) -> torch.Tensor | None:
    """``[n, K]``: the one source column each target column takes whole, where ``matrix`` ``[n, K, K]``
    is such a selection on its ``from_source`` ``[n, K]`` columns (word swaps of equal token counts,
    reweights; in one copy of the prompt); None where some such column sums or splits source
    columns (words of unequal token counts, or a refine's tail of padding tokens)."""
    nonzero = matrix != 0
    whole = (nonzero.sum(dim=1) == 1) & (matrix.sum(dim=1) == 1)
    if not bool(whole[from_source].all()):
        return None
    return nonzero.to(torch.uint8).argmax(dim=1)  # outside from_source: some column, never used
