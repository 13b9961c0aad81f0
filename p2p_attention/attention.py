"""Attention maths on ComfyUI's projected tensors ``[batch, tokens, heads * dim_head]``.

Edited cross-attention probabilities are computed in float32 whatever the model's dtype, as
ComfyUI's own attention upcasts: half precision softmax over 77 keys underflows and reweighting
by large factors overflows.
"""
from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[b, n, h*d] -> [b, h, n, d]``."""
    b, n, width = x.shape
    return x.view(b, n, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[b, h, n, d] -> [b, n, h*d]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention probabilities ``[b, h, queries, keys]`` in float32."""
    q, k = split_heads(q.float(), heads), split_heads(k.float(), heads)
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1)  # scaling q: the smaller tensor


def apply_probs(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``probs @ v`` with heads merged back: ``[b, queries, h*d]`` in float32."""
    return merge_heads(probs @ split_heads(v.float(), heads))


def edit_cross_probs(
    source: torch.Tensor,
    own: torch.Tensor,
    matrix: torch.Tensor,
    from_source: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """The paper's cross-attention edit for ``n`` targets.

    ``source`` ``[h, q, K]`` and ``own`` ``[n, h, q, K]`` are probabilities; ``matrix`` ``[n, K, K]``
    maps source tokens to target tokens; ``from_source`` ``[n, K]`` says which target tokens take
    the source's map now (aligned and inside their replace window), ``scale`` ``[n, K]`` the
    reweight factors now in force (1 outside the window). Returns ``[n, h, q, K]``: ``own`` itself
    when nothing changes it.
    """
    edited = own
    if bool(from_source.any()):
        mapped = torch.einsum("hqs,nst->nhqt", source, matrix)
        edited = torch.where(from_source[:, None, None, :], mapped, own)
    if not bool((scale == 1).all()):
        edited = edited * scale[:, None, None, :]
    return edited
