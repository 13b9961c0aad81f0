"""Token alignment: which source tokens each target token takes its attention from.

One representation serves every edit. ``TokenMap.matrix[s, t]`` is the share of the source token
``s``'s attention that the target token ``t`` receives; ``from_source[t]`` is False where the target
token keeps its own attention (a word Refine inserted). Mass is preserved: a word of ``m`` source
tokens swapped for a word of ``n`` target tokens gives each target token ``1/n`` of the word's
attention, and the tokens after it stay aligned (the reference implementation shifts them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import P2PError
from .tokens import END, PAD, START, PromptTokens


@dataclass(frozen=True)
class TokenMap:
    matrix: torch.Tensor  # [source tokens, target tokens], float32
    from_source: torch.Tensor  # [target tokens], bool

    def tile(self, columns: int) -> "TokenMap":
        """The same map on conditioning columns, each prompt repeated to ``columns`` tokens.

        ComfyUI repeats a shorter conditioning to a common length (attention over repeated keys
        is unchanged: each copy gets an equal share), so a source token's attention is split
        over its copies; the target's share is split evenly over the target token's copies.
        """
        source_len, target_len = self.matrix.shape
        if columns % source_len or columns % target_len:
            raise ValueError(f"{columns} columns do not tile prompts of {source_len} and {target_len} tokens")
        matrix = self.matrix.repeat(columns // source_len, columns // target_len) * (target_len / columns)
        return TokenMap(matrix, self.from_source.repeat(columns // target_len))


def word_swap_map(source: PromptTokens, target: PromptTokens, node: str = "P2P Word Swap") -> TokenMap:
    """Word Swap: the prompts have the same words but for some replaced ones, word for word."""
    source_words, target_words = source.words(), target.words()
    if len(source_words) != len(target_words):
        raise P2PError(
            node,
            "target",
            f"the source has {len(source_words)} words and the target {len(target_words)}; "
            "Word Swap replaces words one for one.",
            "change only words (e.g. 'cat' -> 'dog'), or use P2P Refine to add or remove words.",
        )
    pairs = _special_pairs(source, target)
    matrix = torch.zeros(len(source), len(target))
    for s, t in pairs:
        matrix[s, t] = 1.0
    for s_word, t_word in zip(source_words, target_words):
        if len(s_word) == len(t_word):
            for s, t in zip(s_word, t_word):
                matrix[s, t] = 1.0
        else:
            matrix[torch.tensor(s_word)[:, None], torch.tensor(t_word)[None, :]] = 1.0 / len(t_word)
    return TokenMap(matrix, torch.ones(len(target), dtype=torch.bool))


def refine_map(source: PromptTokens, target: PromptTokens) -> TokenMap:
    """Refine: tokens common to both prompts (a global alignment) take the source's attention;
    the tokens the target adds keep their own."""
    source_content = [p for p, t in enumerate(source.tokens) if t.role not in (START, END, PAD)]
    target_content = [p for p, t in enumerate(target.tokens) if t.role not in (START, END, PAD)]
    matched = longest_common_subsequence(
        [source.tokens[p].key for p in source_content], [target.tokens[p].key for p in target_content]
    )
    pairs = _special_pairs(source, target) + [(source_content[i], target_content[j]) for i, j in matched]
    matrix = torch.zeros(len(source), len(target))
    from_source = torch.zeros(len(target), dtype=torch.bool)
    for s, t in pairs:
        matrix[s, t] = 1.0
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


def _special_pairs(source: PromptTokens, target: PromptTokens) -> list[tuple[int, int]]:
    """Start, end and padding tokens, chunk by chunk: the target's start token takes the source's,
    and the k-th token from the target's end token takes the k-th from the source's (the last one
    where the source's padding is shorter). A target chunk beyond the source's last takes its last.
    """
    pairs = []
    for chunk in range(target.chunks):
        s_chunk = _chunk_roles(source, min(chunk, source.chunks - 1))
        t_chunk = _chunk_roles(target, chunk)
        if s_chunk["start"] is not None and t_chunk["start"] is not None:
            pairs.append((s_chunk["start"], t_chunk["start"]))
        for k, t in enumerate(t_chunk["tail"] if s_chunk["tail"] else []):
            pairs.append((s_chunk["tail"][min(k, len(s_chunk["tail"]) - 1)], t))
    return pairs


def _chunk_roles(prompt: PromptTokens, chunk: int) -> dict:
    first = chunk * prompt.chunk_length
    positions = range(first, first + prompt.chunk_length)
    start = next((p for p in positions if prompt.tokens[p].role == START), None)
    tail = [p for p in positions if prompt.tokens[p].role in (END, PAD)]
    return {"start": start, "tail": tail}
