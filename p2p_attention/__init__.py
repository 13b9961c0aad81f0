"""Prompt-to-Prompt in pure PyTorch, no ComfyUI import: the data flow of the paper.

prompts -> ``tokens`` (what the text encoder sees) -> ``alignment`` (which source token each target
token takes its attention from) -> ``edits`` (word swap, refine, reweight as data) -> ``controller``
(the edit compiled on tokens, applied per attention call) -> ``attention`` (the maths).
"""
from . import alignment, attention, controller, edits, errors, tokens

__all__ = ["alignment", "attention", "controller", "edits", "errors", "tokens"]
