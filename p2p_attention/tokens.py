"""A prompt as the text encoder sees it: one token per conditioning column, grouped into words.

CLIP's byte-pair vocabulary marks the last piece of every word with ``</w>`` ("hippopotamus" is
``hip``, ``po``, ``potamus</w>``), so words are recovered from the tokens themselves. That keeps
ComfyUI's prompt syntax ("(word:1.2)", "embedding:name", escapes) out of the picture: the tokenizer
has already parsed it, and weights do not change token ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

START, WORD, END, PAD = "start", "word", "end", "pad"
WORD_END = "</w>"


@dataclass(frozen=True)
class Token:
    key: Hashable  # vocabulary id, or a digest of a textual-inversion embedding vector
    text: str  # readable form for labels: "cat", "potamus", "<embedding>"
    role: str  # START, WORD, END or PAD
    word: int  # index of the word the token belongs to; -1 for START, END and PAD


@dataclass(frozen=True)
class PromptTokens:
    """Every token of a prompt in conditioning order: ``chunks`` blocks of ``chunk_length``."""

    text: str
    tokens: tuple[Token, ...]
    chunk_length: int

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def chunks(self) -> int:
        return len(self.tokens) // self.chunk_length

    def words(self) -> list[list[int]]:
        """Token positions of each word, in order."""
        grouped: dict[int, list[int]] = {}
        for position, token in enumerate(self.tokens):
            if token.role == WORD:
                grouped.setdefault(token.word, []).append(position)
        return [grouped[w] for w in sorted(grouped)]

    def find(self, query: Sequence[Hashable]) -> list[list[int]]:
        """Positions of every occurrence of the word(s) whose token keys are ``query``.

        A match must start at a word's first token and end at a word's last token, so "cat"
        does not match inside "catapult"; it may cross a chunk boundary.
        """
        content = [p for p, t in enumerate(self.tokens) if t.role == WORD]
        n = len(query)
        matches = []
        for i in range(len(content) - n + 1):
            span = content[i : i + n]
            if [self.tokens[p].key for p in span] != list(query):
                continue
            first, last = self.tokens[span[0]], self.tokens[span[-1]]
            starts_word = i == 0 or self.tokens[content[i - 1]].word != first.word
            ends_word = i + n == len(content) or self.tokens[content[i + n]].word != last.word
            if starts_word and ends_word:
                matches.append(span)
        return matches


def build_prompt_tokens(
    text: str,
    chunks: Sequence[Sequence[tuple[Hashable, str | None]]],
    start_key: Hashable | None,
    end_key: Hashable,
) -> PromptTokens:
    """Label the tokenizer's chunks with roles and words.

    ``chunks`` holds ``(key, vocabulary_text)`` per token, ``vocabulary_text`` None for an
    embedding vector. In each chunk the first token is the start token, the first ``end_key``
    after the content ends it, and everything after is padding (which may repeat ``end_key``).
    A word ends at a ``</w>`` piece; a run of embedding vectors is one word.
    """
    tokens: list[Token] = []
    word = -1
    word_open = False
    for chunk in chunks:
        ended = False
        for position, (key, piece) in enumerate(chunk):
            if position == 0 and start_key is not None and key == start_key:
                role = START
            elif ended:
                role = PAD
            elif key == end_key and piece is not None:
                role, ended = END, True
            else:
                role = WORD
            if role != WORD:
                tokens.append(Token(key, _readable(piece), role, -1))
                if role != START:
                    word_open = False
                continue
            is_embedding = piece is None
            if not word_open or (is_embedding != (tokens[-1].text == "<embedding>")):
                word += 1
            tokens.append(Token(key, _readable(piece), WORD, word))
            word_open = is_embedding or not piece.endswith(WORD_END)
    lengths = {len(c) for c in chunks}
    if len(lengths) != 1:
        raise ValueError(f"tokenizer chunks have different lengths: {sorted(lengths)}")
    return PromptTokens(text=text, tokens=tuple(tokens), chunk_length=lengths.pop())


def _readable(piece: str | None) -> str:
    if piece is None:
        return "<embedding>"
    return piece[: -len(WORD_END)] if piece.endswith(WORD_END) else piece
