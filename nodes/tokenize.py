"""ComfyUI's CLIP tokenizer and text encoder, seen as the core's ``PromptTokens``."""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..p2p_attention.tokens import PromptTokens, build_prompt_tokens


def _token_key(token: Any) -> Any:
    """Vocabulary ids compare as ints; an embedding vector by the digest of its values."""
    if isinstance(token, torch.Tensor):
        return ("embedding", hashlib.sha1(token.detach().float().cpu().numpy().tobytes()).hexdigest())
    return int(token)


def _structure_key(tokens: dict) -> str:
    # SDXL tokenizes for CLIP-L and CLIP-G; their tokens agree but for padding, and the
    # conditioning columns follow them, so either one describes the prompt.
    return "l" if "l" in tokens else next(iter(tokens))


def prompt_tokens(clip: Any, text: str, tokens: dict | None = None) -> PromptTokens:
    """The prompt's tokens as ComfyUI's tokenizer produced them (weights and embeddings parsed)."""
    tokens = clip.tokenize(text) if tokens is None else tokens
    key = _structure_key(tokens)
    tokenizer = getattr(clip.tokenizer, f"clip_{key}")
    inverse = tokenizer.inv_vocab
    chunks = [
        [(_token_key(t[0]), None if isinstance(t[0], torch.Tensor) else inverse.get(int(t[0]), "")) for t in chunk]
        for chunk in tokens[key]
    ]
    return build_prompt_tokens(text, chunks, tokenizer.start_token, tokenizer.end_token)


def encode_prompt(clip: Any, text: str) -> tuple[PromptTokens, torch.Tensor, torch.Tensor | None]:
    """Tokens, conditioning ``[1, tokens, width]`` and pooled output of one prompt."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return prompt_tokens(clip, text, tokens), cond, pooled
