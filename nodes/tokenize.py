"""ComfyUI's tokenizers and text encoders, seen as the core's ``PromptTokens``.

Which of ``clip.tokenize()``'s token lists the diffusion model attends to, and in which order, is
the text layout of a model family (``TEXT_LAYOUTS``): SD1.x/SDXL attend to CLIP tokens, Flux.1 and
Chroma to T5 tokens, SD3.x to its CLIP tokens followed by its T5 tokens, Qwen-Image to its Qwen2.5
tokens after the chat template's system part (which its encoder drops), Flux.2 to its Mistral tokens
with the whole template (a system prompt, then the prompt inside [INST] ... [/INST]). Every token is
labelled with the text it spells (the tokenizer's own decoding), so words are matched the same way
for CLIP's BPE, T5's SentencePiece and the byte-level BPEs of Qwen and Mistral's Tekken.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import comfy.sd1_clip

from ..p2p_attention.controller import CONTROLLER
from ..p2p_attention.errors import P2PError
from ..p2p_attention.ranges import Range
from ..p2p_attention.tokens import PromptTokens, build_prompt_tokens, split_words
from .host import encode_tokens

Chunk = list[tuple[Any, str | None, bool]]  # (key, piece, special) per token
# ComfyUI's prompt weights have no range of their own; far past this the conditioning overflows.
PROMPT_WEIGHT = Range(-100.0, 100.0)


def _after_chat_template(tokenizer: Any, chunk: Chunk) -> Chunk:
    """Qwen-Image's encoder keeps the tokens from the template's user turn on: from the second
    ``<|im_start|>``, and past ``user`` and a newline right after it (as ComfyUI's QwenImageTEModel)."""
    hf = tokenizer.tokenizer
    im_start = hf.convert_tokens_to_ids("<|im_start|>")
    user, newline = hf.encode("user"), hf.encode("\n")
    starts = [i for i, (key, _, _) in enumerate(chunk) if key == im_start][:2]
    end = starts[-1] if starts else 0
    if len(chunk) > end + 3 and [chunk[end + 1][0]] == user and [chunk[end + 2][0]] == newline:
        end += 3
    return chunk[end:]


def _within_instruction(tokenizer: Any, chunk: Chunk) -> Chunk:
    """Flux.2's encoder attends to its whole template, "[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]{prompt}
    [/INST]" (ComfyUI's Flux2Tokenizer): the tokens outside the instruction spell no word of the prompt
    (the tokenizer does not count [INST] and [/INST] as special)."""
    hf = tokenizer.tokenizer
    keys = [key for key, _, _ in chunk]
    opening, closing = hf.convert_tokens_to_ids("[INST]"), hf.convert_tokens_to_ids("[/INST]")
    start = keys.index(opening) + 1 if opening in keys else 0
    stop = keys.index(closing, start) if closing in keys[start:] else len(keys)
    return [(key, piece, special or not start <= i < stop) for i, (key, piece, special) in enumerate(chunk)]


@dataclass(frozen=True)
class TextLayout:
    name: str  # the model family, for messages
    segments: tuple[str, ...]  # keys of clip.tokenize()'s output the model attends to, in column order
    weights: bool = True  # ComfyUI's "(word:1.2)" syntax is parsed (Qwen-Image's and Flux.2's tokenizers disable it)
    # What the encoder keeps of the tokenizer's template, its tokens that spell no word marked special.
    template: Callable[[Any, Chunk], Chunk] | None = None


TEXT_LAYOUTS = {
    frozenset({"l"}): TextLayout("SD1.x", ("l",)),
    frozenset({"h"}): TextLayout("SD2.x", ("h",)),
    # SDXL's CLIP-L and CLIP-G tokens sit side by side in the width: one column each.
    frozenset({"g", "l"}): TextLayout("SDXL", ("l",)),
    # Flux.1: CLIP-L gives the pooled vector only.
    frozenset({"l", "t5xxl"}): TextLayout("Flux.1", ("t5xxl",)),
    frozenset({"t5xxl"}): TextLayout("Chroma", ("t5xxl",)),
    frozenset({"g", "l", "t5xxl"}): TextLayout("SD3.x", ("l", "t5xxl")),
    frozenset({"qwen25_7b"}): TextLayout("Qwen-Image", ("qwen25_7b",), weights=False, template=_after_chat_template),
    frozenset({"mistral3_24b"}): TextLayout("Flux.2", ("mistral3_24b",), weights=False, template=_within_instruction),
}


def text_layout(clip: Any, tokens: dict) -> TextLayout:
    layout = TEXT_LAYOUTS.get(frozenset(tokens))
    if layout is None:
        raise P2PError(
            CONTROLLER,
            "clip",
            f"this text encoder (tokens {', '.join(sorted(tokens))}) belongs to no model family the pack supports.",
            "use the text encoder of an SD1.x, SD2.x, SDXL, SD3.x, Flux.1, Chroma, Qwen-Image or Flux.2 model.",
        )
    if layout.name == "SD3.x":  # an SD3 encoder loaded without CLIP or without T5 gives no columns for it
        model = clip.cond_stage_model
        present = (model.clip_l is not None or model.clip_g is not None, model.t5xxl is not None)
        layout = TextLayout(layout.name, tuple(s for s, kept in zip(layout.segments, present) if kept))
    return layout


def prompt_weights(text: str) -> list[tuple[str, float]]:
    """(text, weight) of each part of a prompt, as ComfyUI's tokenizer parses "(red car:1.2)"."""
    escaped = comfy.sd1_clip.escape_important(text)
    return [(comfy.sd1_clip.unescape_important(part), weight) for part, weight in comfy.sd1_clip.token_weights(escaped, 1.0)]


def check_prompt_weights(text: str, node: str, input_name: str) -> None:
    """Every "(word:w)" weight is a finite number in ``PROMPT_WEIGHT``: ComfyUI reads "(cat:nan)" as a
    NaN weight, which makes the prompt's conditioning, and the image, NaN."""
    for part, weight in prompt_weights(text):
        PROMPT_WEIGHT.check(weight, node, input_name, f"the weight of {part.strip()!r}")


def typed_words(text: str, weights: bool) -> list[str]:
    """The prompt's words as the user typed them, with ComfyUI's weight syntax removed as its tokenizer
    removes it ("a (red car:1.2)" has the words a, red, car)."""
    if weights:
        text = "".join(part for part, _ in prompt_weights(text))
    return split_words(text)


def _token_key(token: Any) -> Any:
    """Vocabulary ids compare as ints; an embedding vector by the digest of its values."""
    if isinstance(token, torch.Tensor):
        return ("embedding", hashlib.sha1(token.detach().float().cpu().numpy().tobytes()).hexdigest())
    return int(token)


def _tokenizer(clip: Any, key: str) -> Any:
    """The ``SDTokenizer`` behind one of ``clip.tokenize()``'s keys."""
    for name in (key, f"clip_{key}"):
        found = getattr(clip.tokenizer, name, None)
        if found is not None:
            return found
    raise P2PError(CONTROLLER, "clip", f"this CLIP has no tokenizer for its {key!r} tokens.", "load the model's own text encoder.")


def _chunks(tokenizer: Any, chunks: list[list[tuple]]) -> list[Chunk]:
    """(key, text, special) per token: start, end and the tokenizer's special tokens are special (their
    text is their name), and so is everything after a chunk's end token (padding); a word token's
    text is its decoding, an embedding vector's None."""
    hf = tokenizer.tokenizer
    special_ids = set(getattr(hf, "all_special_ids", ())) | {tokenizer.start_token, tokenizer.end_token}
    out = []
    for chunk in chunks:
        labelled, ended = [], False
        for entry in chunk:
            token = entry[0]
            if isinstance(token, torch.Tensor):
                labelled.append((_token_key(token), None, False))
                continue
            special = ended or int(token) in special_ids
            ended |= tokenizer.end_token is not None and int(token) == tokenizer.end_token
            # A special token is labelled with its name ("<|startoftext|>", "</s>"); it spells no word.
            labelled.append((int(token), hf.convert_ids_to_tokens(int(token)) if special else hf.decode([int(token)]), special))
        out.append(labelled)
    return out


def prompt_tokens(clip: Any, text: str, tokens: dict | None = None) -> PromptTokens:
    """The prompt's tokens in the model's conditioning columns (weights and embeddings parsed)."""
    tokens = clip.tokenize(text) if tokens is None else tokens
    layout = text_layout(clip, tokens)
    segments = []
    for key in layout.segments:
        tokenizer = _tokenizer(clip, key)
        chunks = _chunks(tokenizer, tokens[key])
        if layout.template is not None:
            chunks = [layout.template(tokenizer, chunk) for chunk in chunks]
        segments.append(chunks)
    # ComfyUI wraps a text in Qwen-Image's and Flux.2's templates; the words are the user's text alone.
    return build_prompt_tokens(text, typed_words(text, layout.weights), segments)


def encode_prompt(clip: Any, text: str) -> tuple[PromptTokens, torch.Tensor, dict]:
    """Tokens, conditioning ``[1, columns, width]`` and the encoder's other outputs (pooled, ...)."""
    tokens = clip.tokenize(text)
    cond, extras = encode_tokens(clip, tokens)
    prompt = prompt_tokens(clip, text, tokens)
    if cond.shape[1] != len(prompt):
        raise P2PError(
            CONTROLLER,
            "clip",
            f"this text encoder gives {cond.shape[1]} conditioning columns for {len(prompt)} tokens of {text!r}.",
            "use the text encoder of an SD1.x, SD2.x, SDXL, SD3.x, Flux.1, Chroma, Qwen-Image or Flux.2 model.",
        )
    return prompt, cond, extras
