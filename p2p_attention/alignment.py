"""Token alignment: which source tokens each target token takes its attention from.

One representation serves every edit. ``TokenMap.matrix[s, t]`` is the share of the source token
``s``'s attention that the target token ``t`` receives; ``from_source[t]`` is False where the target
token keeps its own attention (a word Refine inserted). Mass is preserved: a word of ``m`` source
tokens swapped for a word of ``n`` target tokens gives each target token ``1/n`` of the word's
attention, and the tokens after it stay aligned (the reference implementation shifts them).

Prompts are aligned segment by segment (SD3 attends to a CLIP and a T5 rendering of the same words):
a token only ever takes attention from the same text encoder's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import P2PError
from .tokens import END, PAD, START, WORD, PromptTokens, Segment


@dataclass(frozen=True)
class TokenMap:
    matrix: torch.Tensor  # [source tokens, target tokens], float32
    from_source: torch.Tensor  # [target tokens], bool


def word_swap_map(source: PromptTokens, target: PromptTokens, node: str = "P2P Word Swap") -> TokenMap:
    """Word Swap: the prompts have the same words but for some replaced ones, word for word."""
    if len(source.words) != len(target.words):
        raise P2PError(
            node,
            "target",
            f"the source has {len(source.words)} words and the target {target.text!r} has {len(target.words)}; "
            "Word Swap replaces words one for one (a word is what is typed between spaces).",
            "change only words (e.g. 'cat' -> 'dog'), or use P2P Refine to add or remove words.",
        )
    matrix = torch.zeros(len(source), len(target))
    for s_segment, t_segment in _segments(source, target):
        for s, t, share in _special_pairs(source, s_segment, target, t_segment):
            matrix[s, t] += share
        pairs = zip(source.word_tokens(s_segment), target.word_tokens(t_segment))
        for index, (s_word, t_word) in enumerate(pairs):
            if bool(s_word) != bool(t_word):
                empty, prompt = (target, target) if s_word else (source, source)
                raise _no_tokens(empty.words[index], prompt.text, node)
            if len(s_word) == len(t_word):
                for s, t in zip(s_word, t_word):
                    matrix[s, t] = 1.0
            elif t_word:
                matrix[torch.tensor(s_word)[:, None], torch.tensor(t_word)[None, :]] = 1.0 / len(t_word)
    return TokenMap(matrix, torch.ones(len(target), dtype=torch.bool))


def refine_map(source: PromptTokens, target: PromptTokens) -> TokenMap:
    """Refine: tokens common to both prompts (a global alignment) take the source's attention;
    the tokens the target adds keep their own."""
    matrix = torch.zeros(len(source), len(target))
    from_source = torch.zeros(len(target), dtype=torch.bool)
    for s_segment, t_segment in _segments(source, target):
        source_content = _content(source, s_segment)
        target_content = _content(target, t_segment)
        matched = longest_common_subsequence(
            [source.tokens[p].key for p in source_content], [target.tokens[p].key for p in target_content]
        )
        pairs = _special_pairs(source, s_segment, target, t_segment)
        pairs += [(source_content[i], target_content[j], 1.0) for i, j in matched]
        for s, t, share in pairs:
            matrix[s, t] += share
            from_source[t] = True
    return TokenMap(matrix, from_source)


def longest_common_subsequence(a: list, b: list) -> list[tuple[int, int]]:
    """Index pairs of a longest common subsequence: the global alignment with a free gap, a
    reward for a match and a penalty for a mismatch, as the paper's Refine uses."""
    n, m = len(a), len(b)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            table[i][j] = table[i + 1][j + 1] + 1 if a[i] == b[j] else max(table[i + 1][j], table[i][j + 1])
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if a[i] == b[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def _segments(source: PromptTokens, target: PromptTokens) -> list[tuple[Segment, Segment]]:
    if len(source.segments) != len(target.segments):
        raise ValueError(f"prompts encoded in {len(source.segments)} and {len(target.segments)} segments")
    return list(zip(source.segments, target.segments))


def _content(prompt: PromptTokens, segment: Segment) -> list[int]:
    return [p for p in range(segment.start, segment.start + segment.length) if prompt.tokens[p].role == WORD]


def _no_tokens(word: str, text: str, node: str) -> P2PError:
    if word.casefold().startswith("embedding:"):
        return P2PError(
            node,
            "target",
            f"the embedding {word!r} in {text!r} was not found, so ComfyUI left it out of the prompt.",
            "put the embedding file in ComfyUI's models/embeddings folder (or fix its name), or remove it.",
        )
    return P2PError(node, "target", f"the word {word!r} of {text!r} gives no token.", "replace it with a word the model knows.")


def _special_pairs(source: PromptTokens, s_segment: Segment, target: PromptTokens, t_segment: Segment) -> list[tuple[int, int, float]]:
    """Start, end and padding tokens, chunk by chunk, as (source, target, share): the target's start
    token takes the source's, and the k-th token from the target's end token the k-th from the
    source's. Where one tail is longer, its extra tokens fold into the other's last token (a longer
    source's pass their attention to it; a longer target's share the source's last), so every source
    token's attention is passed on whole. A target chunk beyond the source's last takes its last.
    """
    pairs = []
    for chunk in range(t_segment.chunks):
        s_chunk = _chunk_roles(source, s_segment, min(chunk, s_segment.chunks - 1))
        t_chunk = _chunk_roles(target, t_segment, chunk)
        for role in ("start", "tail"):
            s_tokens, t_tokens = s_chunk[role], t_chunk[role]
            if not s_tokens or not t_tokens:
                continue
            for k in range(max(len(s_tokens), len(t_tokens))):
                s, t = s_tokens[min(k, len(s_tokens) - 1)], t_tokens[min(k, len(t_tokens) - 1)]
                split = max(1, len(t_tokens) - len(s_tokens) + 1) if k >= len(s_tokens) - 1 else 1
                pairs.append((s, t, 1.0 / split))
    return pairs


def _chunk_roles(prompt: PromptTokens, segment: Segment, chunk: int) -> dict[str, list[int]]:
    first = segment.start + chunk * segment.chunk_length
    positions = range(first, first + segment.chunk_length)
    return {
        "start": [p for p in positions if prompt.tokens[p].role == START],
        "tail": [p for p in positions if prompt.tokens[p].role in (END, PAD)],
    }
