"""A prompt as the text encoder sees it: one token per conditioning column, grouped into words.

A word is what the user typed between spaces ("5pm", "t-rex", "cat,"), whatever the tokenizer makes
of it (CLIP splits "t-rex" into three pieces, T5 marks word starts with "▁", Qwen's byte-level BPE
glues the space to the next word). Each token is given the typed word whose text it spells, by
matching the tokens' text against the prompt's text in order: one rule for every tokenizer.

The conditioning columns of a prompt come in ``segments``, one per text encoder whose tokens the
model attends to (SD3 attends to its CLIP tokens and then to its T5 tokens; most models have one),
each cut into chunks (CLIP's 77 tokens; T5 and Qwen have one chunk). A word appears once per segment.
"""
from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass
from typing import Hashable, Sequence

START, WORD, END, PAD = "start", "word", "end", "pad"
EMBEDDING_PREFIX = "embedding:"
EMBEDDING_TEXT = "<embedding>"


@dataclass(frozen=True)
class Token:
    key: Hashable  # vocabulary id, or a digest of a textual-inversion embedding vector
    text: str  # readable form for labels: "cat", "potam", "<embedding>"
    role: str  # START, WORD, END or PAD
    word: int  # index of the typed word the token belongs to; -1 for START, END and PAD


@dataclass(frozen=True)
class Segment:
    """Columns ``start .. start + length`` of the conditioning: one text encoder's tokens."""

    start: int
    length: int
    chunk_length: int

    @property
    def chunks(self) -> int:
        return self.length // self.chunk_length


@dataclass(frozen=True)
class PromptTokens:
    """Every token of a prompt in conditioning order, and the words they spell."""

    text: str
    words: tuple[str, ...]  # as typed, ComfyUI's prompt syntax ("(word:1.2)") removed
    tokens: tuple[Token, ...]
    segments: tuple[Segment, ...]

    def __len__(self) -> int:
        return len(self.tokens)

    def word_tokens(self, segment: Segment) -> list[list[int]]:
        """Token positions of each word in ``segment`` (a word without tokens there: ``[]``)."""
        grouped: list[list[int]] = [[] for _ in self.words]
        for position in range(segment.start, segment.start + segment.length):
            token = self.tokens[position]
            if token.role == WORD:
                grouped[token.word].append(position)
        return grouped

    def find(self, phrase: str) -> list[int]:
        """Token positions (every segment) of each occurrence of ``phrase`` (see ``phrase_words``)."""
        hits = phrase_words(self.words, phrase)
        return [p for p, t in enumerate(self.tokens) if t.role == WORD and t.word in hits]


def phrase_words(words: Sequence[str], phrase: str) -> set[int]:
    """Indices of the words of every occurrence of ``phrase``, one or more whole words in a row.

    Words compare as typed but for case and the punctuation around them: "cat" finds "Cat," but not
    "catapult"; "red car" finds the two words in a row.
    """
    query = [match_form(w) for w in split_words(phrase)]
    typed = [match_form(w) for w in words]
    return {
        i + k
        for i in range(len(typed) - len(query) + 1) if query and typed[i : i + len(query)] == query
        for k in range(len(query))
    }


def split_words(text: str) -> list[str]:
    """The words a user typed: the runs of text between whitespace."""
    return text.split()


def match_form(word: str) -> str:
    """How words compare when looked up: case folded, without the punctuation around them."""
    folded = unicodedata.normalize("NFKC", word).casefold()
    return folded.strip(string.punctuation) or folded


def _spelled(text: str) -> str:
    """Text as tokens spell it: case folded, accents dropped (CLIP's tokenizer drops them), no
    whitespace."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed.casefold() if not c.isspace() and not unicodedata.combining(c))


def assign_words(words: Sequence[str], pieces: Sequence[str | None], special: Sequence[bool]) -> list[int]:
    """The typed word each token belongs to, or -1.

    ``pieces`` is each token's text (None for an embedding vector), ``special`` marks start, end,
    padding and template tokens, which spell no word. A token is matched to the next place where its
    text appears in the words (tokens spell the prompt in order, so the search only moves forward;
    text no token spells, like a dropped embedding's name, is skipped). A run of embedding vectors
    is the next ``embedding:name`` word. Tokens after the prompt's text (a chat template's end) belong
    to no word; a token whose text the tokenizer changed beyond recognition, or a piece of a
    character split over tokens, stays with the word being spelled.
    """
    chars: list[tuple[str, int]] = [(c, w) for w, word in enumerate(words) for c in _spelled(word)]
    spelled = "".join(c for c, _ in chars)
    cursor = 0
    assigned: list[int] = []
    embedding_word: int | None = None
    for piece, is_special in zip(pieces, special):
        if is_special:
            assigned.append(-1)
            embedding_word = None
            continue
        if piece is None:
            if embedding_word is None:
                embedding_word = _next_embedding_word(words, chars, cursor)
                cursor = next((i for i, (_, w) in enumerate(chars) if w > embedding_word), len(chars))
            assigned.append(embedding_word)
            continue
        embedding_word = None
        text = _spelled(piece)
        found = spelled.find(text, cursor) if text else -1
        if found >= 0:
            assigned.append(chars[found][1])
            cursor = found + len(text)
        elif cursor >= len(chars):
            assigned.append(-1)
        elif not text and assigned and assigned[-1] >= 0:
            assigned.append(assigned[-1])
        else:
            assigned.append(chars[cursor][1])
    return assigned


def _next_embedding_word(words: Sequence[str], chars: list[tuple[str, int]], cursor: int) -> int:
    """The first ``embedding:name`` word from the cursor on (the word at the cursor if none is)."""
    current = chars[cursor][1] if cursor < len(chars) else len(words) - 1
    return next((w for w in range(current, len(words)) if words[w].casefold().startswith(EMBEDDING_PREFIX)), current)


def build_prompt_tokens(
    text: str,
    words: Sequence[str],
    segments: Sequence[Sequence[Sequence[tuple[Hashable, str | None, bool]]]],
) -> PromptTokens:
    """Label the tokenizer's output with roles and words.

    ``segments`` holds each segment's chunks of ``(key, piece, special)`` per token: the token's text
    (None for an embedding vector) and whether it is a special token (start, end, padding, template).
    In each chunk, tokens before the first word token are start tokens, the first non-word token
    after it ends the chunk and everything after is padding.
    """
    owners = []
    for segment in segments:  # each text encoder's tokens spell the whole prompt
        flat = [token for chunk in segment for token in chunk]
        owners += assign_words(words, [piece for _, piece, _ in flat], [special for _, _, special in flat])
    tokens: list[Token] = []
    layout: list[Segment] = []
    position = 0
    for segment in segments:
        lengths = {len(chunk) for chunk in segment}
        if len(lengths) != 1:
            raise ValueError(f"tokenizer chunks have different lengths: {sorted(lengths)}")
        layout.append(Segment(start=position, length=sum(map(len, segment)), chunk_length=lengths.pop()))
        for chunk in segment:
            seen_word = ended = False
            for key, piece in ((k, p) for k, p, _ in chunk):
                word = owners[position]
                position += 1
                if word >= 0 and not ended:
                    role, seen_word = WORD, True
                elif not seen_word:
                    role, word = START, -1
                elif not ended:
                    role, word, ended = END, -1, True
                else:
                    role, word = PAD, -1
                tokens.append(Token(key, _readable(piece), role, word))
    return PromptTokens(text=text, words=tuple(words), tokens=tuple(tokens), segments=tuple(layout))


def _readable(piece: str | None) -> str:
    return EMBEDDING_TEXT if piece is None else piece.strip()
