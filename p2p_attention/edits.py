"""What flows on a P2P_EDIT socket: a source prompt and the targets made from it.

Edits are plain text here; the controller tokenizes them with the model's own CLIP. Each edit
node appends a target (Word Swap, Refine) or reweights words of the newest one (Reweight), so a
chain of edit nodes reads left to right like the list of images it produces.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .errors import P2PError
from .ranges import FRACTION, REWEIGHT_SCALE, Range
from .tokens import phrase_words, split_words

Words = Callable[[str], list[str]]  # a prompt's words as typed, ComfyUI's weight syntax removed

WORD_SWAP, REFINE = "word_swap", "refine"


@dataclass(frozen=True)
class WordScale:
    word: str
    scale: float
    node: str  # the node that asked for it, named in errors


@dataclass(frozen=True)
class TargetEdit:
    prompt: str
    alignment: str  # WORD_SWAP or REFINE
    node: str
    reweights: tuple[WordScale, ...] = ()


@dataclass(frozen=True, eq=False)  # holds a tensor: compared by identity
class LocalBlendEdit:
    """Where the targets may differ from the source: the region of some words, and/or a mask."""

    source_words: tuple[str, ...]  # looked up in the source prompt
    target_words: tuple[str, ...]  # looked up in every target prompt
    subtract_words: tuple[str, ...]  # their region is removed from the mask (source and targets)
    threshold: float
    start: float  # fraction of the schedule after which blending starts
    mask: torch.Tensor | None  # a user's region [1 or targets, H, W] in 0..1, any resolution
    combine: str  # how a user mask meets the word region: UNION or INTERSECT
    node: str


UNION, INTERSECT = "union", "intersect"


@dataclass(frozen=True)
class P2PEdit:
    source: str
    targets: tuple[TargetEdit, ...]
    blend: LocalBlendEdit | None = None


def add_target(
    edit: P2PEdit | None, source: str, target: str, alignment: str, node: str, words: Words = split_words
) -> P2PEdit:
    """A Word Swap or Refine target from ``source``, appended to ``edit`` when one is plugged in."""
    source, target = _prompt(source, node, "source"), _prompt(target, node, "target")
    # A source that differs from the chain's is the first mistake: the target was written against it.
    if edit is not None and edit.source != source:
        raise P2PError(
            node,
            "source",
            f"the incoming P2P_EDIT's source is {edit.source!r}, this node's is {source!r}; "
            "all targets of one controller are edits of one source.",
            "use the same source text in every chained edit node.",
        )
    source_count, target_count = len(words(source)), len(words(target))
    if alignment == WORD_SWAP and source_count != target_count:
        raise P2PError(
            node,
            "target",
            f"the source has {source_count} words and the target {target!r} has {target_count}; Word Swap "
            "replaces words one for one (a word is what is typed between spaces).",
            "change only words (e.g. 'cat' -> 'dog'), or use P2P Refine to add or remove words.",
        )
    new = TargetEdit(prompt=target, alignment=alignment, node=node)
    if edit is None:
        return P2PEdit(source=source, targets=(new,))
    return replace(edit, targets=edit.targets + (new,))


def reweight(edit: P2PEdit | None, prompt: str, words: str, scale: float, node: str, prompt_words: Words = split_words) -> P2PEdit:
    """Scale the attention to ``words`` in the newest target, or, with no incoming edit, in an
    image of ``prompt`` itself (source and target are the same prompt)."""
    if edit is None:
        text = _prompt(prompt, node, "prompt")
        edit = P2PEdit(source=text, targets=(TargetEdit(prompt=text, alignment=WORD_SWAP, node=node),))
    elif prompt.strip():
        raise P2PError(
            node,
            "prompt",
            "a P2P_EDIT is plugged in, so the reweight applies to its newest target and 'prompt' would be ignored.",
            "clear 'prompt', or unplug 'p2p_edit' to reweight a prompt on its own.",
        )
    scale = REWEIGHT_SCALE.check(scale, node, "scale")
    scales = parse_word_values(words, scale, node, "words", REWEIGHT_SCALE)
    last = edit.targets[-1]
    for word, _ in scales:
        if not phrase_words(prompt_words(last.prompt), word):
            raise P2PError(
                node,
                "words",
                f"{word!r} is not a word of the prompt {last.prompt!r}.",
                "name words as they are typed in the prompt (case and surrounding punctuation do not matter).",
            )
    last = replace(last, reweights=last.reweights + tuple(WordScale(w, s, node) for w, s in scales))
    return replace(edit, targets=edit.targets[:-1] + (last,))


def local_blend(
    edit: P2PEdit,
    source_words: str,
    target_words: str,
    subtract_words: str,
    threshold: float,
    start: float,
    mask: torch.Tensor | None,
    combine: str,
    node: str,
    prompt_words: Words = split_words,
) -> P2PEdit:
    """Confine every target's change to a region: words' attention regions and/or a user mask."""
    if not isinstance(edit, P2PEdit):
        raise P2PError(node, "p2p_edit", "this input is not a P2P edit.", "connect P2P Word Swap, Refine or Reweight.")
    if edit.blend is not None:
        raise P2PError(
            node,
            "p2p_edit",
            f"this edit already has a local blend (from {edit.blend.node}).",
            "use one P2P Local Blend per controller; list all the words in it.",
        )
    words = {name: word_list(text) for name, text in (("source", source_words), ("target", target_words), ("subtract", subtract_words))}
    if not words["source"] and not words["target"] and mask is None:
        raise P2PError(
            node,
            "source_words",
            "no region is given: no source words, no target words and no mask.",
            "name the edited object, e.g. source_words 'cat' and target_words 'dog', or connect a mask.",
        )
    targets = [t.prompt for t in edit.targets]
    for name, prompts, where in (
        ("source", [edit.source], f"the source prompt {edit.source!r}"),
        ("target", targets, "any target prompt"),
        ("subtract", [edit.source] + targets, "the source or any target prompt"),
    ):
        for word in words[name]:
            if not any(phrase_words(prompt_words(text), word) for text in prompts):
                raise P2PError(
                    node,
                    f"{name}_words",
                    f"{word!r} is not a word of {where}.",
                    "name words as they are typed in the prompts (case and surrounding punctuation do not matter).",
                )
    threshold, start = FRACTION.check(threshold, node, "threshold"), FRACTION.check(start, node, "start_blend")
    if mask is not None:
        if not bool(torch.isfinite(mask).all()):
            raise P2PError(node, "mask", "the mask has values that are not finite numbers (NaN or infinite).",
                           "connect a mask with values from 0 to 1 (e.g. from Load Image's mask or the mask editor).")
        mask = mask if mask.dim() == 3 else mask.reshape((-1,) + tuple(mask.shape[-2:]))
        if mask.shape[0] not in (1, len(edit.targets)):
            raise P2PError(
                node,
                "mask",
                f"the mask has a batch of {mask.shape[0]}, the edit has {len(edit.targets)} target(s).",
                "give one mask for all targets, or one per target.",
            )
    blend = LocalBlendEdit(
        source_words=words["source"],
        target_words=words["target"],
        subtract_words=words["subtract"],
        threshold=threshold,
        start=start,
        mask=None if mask is None else mask.detach().float().clamp(0, 1).cpu(),
        combine=combine,
        node=node,
    )
    return replace(edit, blend=blend)


def word_list(text: str) -> tuple[str, ...]:
    """``"cat, red car"`` -> ``("cat", "red car")``: comma- or line-separated words, blanks dropped."""
    return tuple(w.strip() for w in text.replace("\n", ",").split(",") if w.strip())


def parse_word_values(text: str, default: float, node: str, input_name: str, valid: Range) -> list[tuple[str, float]]:
    """``"fluffy, red car: -1"`` -> ``[("fluffy", default), ("red car", -1.0)]``; every typed value
    must be a finite number in ``valid`` (the widget's range, which text skips)."""
    values = []
    for item in text.replace("\n", ",").split(","):
        if not item.strip():
            continue
        word, sep, number = item.rpartition(":") if ":" in item else (item, "", "")
        word = word.strip()
        if not word:
            raise P2PError(node, input_name, f"{item.strip()!r} names no word.", "write 'word' or 'word: number'.")
        try:
            value = float(number) if sep else float(default)
        except ValueError:
            raise P2PError(
                node, input_name, f"{number.strip()!r} in {item.strip()!r} is not a number.", "write 'word: number', e.g. 'cat: 0.5'."
            ) from None
        values.append((word, valid.check(value, node, input_name, repr(item.strip()))))
    if not values:
        raise P2PError(node, input_name, "no word given.", "list one or more words of the prompt, separated by commas.")
    return values


def _prompt(text: str, node: str, input_name: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise P2PError(node, input_name, "the prompt is empty.", "type the prompt this edit starts from or produces.")
    return text.strip()
