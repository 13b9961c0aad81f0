"""P2P Word Swap, P2P Refine and P2P Reweight: the edits, as data on a P2P_EDIT socket."""
from __future__ import annotations

from functools import partial

from ..p2p_attention import edits
from ..p2p_attention.ranges import FRACTION, REWEIGHT_SCALE
from .tokenize import check_prompt_weights, typed_words

# ComfyUI passes the node's id: messages name "P2P Word Swap #12", so chained nodes are told apart.
HIDDEN = {"unique_id": "UNIQUE_ID"}
parsed_words = partial(typed_words, weights=True)  # words as CLIP Text Encode parses the prompt


def node_label(name: str, unique_id: str | None) -> str:
    return f"{name} #{unique_id}" if unique_id is not None else name


def fraction_input(default: float, tooltip: str) -> tuple:
    """A FLOAT input from 0 to 1 (a fraction of the schedule, a threshold), checked with ``FRACTION``."""
    return ("FLOAT", {"default": default, **FRACTION.widget(), "step": 0.01, "tooltip": tooltip})


EDIT_TOOLTIP = "Optional: an edit to extend. This node's target is added after its targets (one more image per run)."


def _text(default: str, tooltip: str) -> tuple:
    return ("STRING", {"multiline": True, "default": default, "tooltip": tooltip})


class P2PWordSwap:
    DESCRIPTION = (
        "Prompt-to-Prompt Word Swap: replace words of the source prompt (same number of words). "
        "The edited image takes the source's cross-attention maps for the first cross_replace_steps, "
        "so the composition stays and only the swapped object changes. Connect to P2P Controller."
    )
    CATEGORY = "P2P"
    RETURN_TYPES = ("P2P_EDIT",)
    RETURN_NAMES = ("p2p_edit",)
    OUTPUT_TOOLTIPS = ("The source prompt and its targets, for P2P Controller or another edit node.",)
    FUNCTION = "edit"
    ALIGNMENT = edits.WORD_SWAP
    NODE_NAME = "P2P Word Swap"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "source": _text("a photo of a cat riding a bicycle", "The prompt of the original image."),
                "target": _text(
                    "a photo of a dog riding a bicycle",
                    "The source with some words replaced, word for word. ComfyUI prompt syntax "
                    "((word:1.2), embedding:name) works; a replacement may be longer or shorter in tokens.",
                ),
            },
            "optional": {"p2p_edit": ("P2P_EDIT", {"tooltip": EDIT_TOOLTIP})},
            "hidden": HIDDEN,
        }

    def edit(self, source: str, target: str, p2p_edit: edits.P2PEdit | None = None, unique_id: str | None = None) -> tuple:
        node = node_label(self.NODE_NAME, unique_id)
        check_prompt_weights(source, node, "source")
        check_prompt_weights(target, node, "target")
        return (edits.add_target(p2p_edit, source, target, self.ALIGNMENT, node, parsed_words),)


class P2PRefine(P2PWordSwap):
    DESCRIPTION = (
        "Prompt-to-Prompt Refine: add (or remove) words, e.g. 'a castle' -> 'a gothic castle at night'. "
        "Tokens the prompts share (global sequence alignment) take the source's attention maps; new "
        "tokens keep their own, so the new words act where they belong. Connect to P2P Controller."
    )
    ALIGNMENT = edits.REFINE
    NODE_NAME = "P2P Refine"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "source": _text("a photo of a house by a lake", "The prompt of the original image."),
                "target": _text(
                    "a watercolor painting of a house by a lake at sunset",
                    "The source with words added or removed; shared words keep the source's layout.",
                ),
            },
            "optional": {"p2p_edit": ("P2P_EDIT", {"tooltip": EDIT_TOOLTIP})},
            "hidden": HIDDEN,
        }


class P2PReweight:
    DESCRIPTION = (
        "Prompt-to-Prompt Reweight: scale the attention to chosen words up (more of it), down, to 0 "
        "(remove it) or below 0. With a P2P_EDIT plugged in it reweights that edit's newest target "
        "(on top of a swap or refine); alone it edits an image of 'prompt' itself. Acts over the whole "
        "schedule, or inside the word's window where the controller's cross_replace_words gives one."
    )
    CATEGORY = "P2P"
    RETURN_TYPES = ("P2P_EDIT",)
    RETURN_NAMES = ("p2p_edit",)
    OUTPUT_TOOLTIPS = ("The edit with the reweight added, for P2P Controller or another edit node.",)
    FUNCTION = "edit"
    NODE_NAME = "P2P Reweight"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "words": (
                    "STRING",
                    {
                        "multiline": False,
                        "default": "fluffy",
                        "tooltip": "Words of the (target) prompt to reweight, comma separated; 'word: 2.5' "
                        "gives a word its own scale (-10 to 10, as scale). Several-word phrases ('red car') work.",
                    },
                ),
                "scale": (
                    "FLOAT",
                    {
                        "default": 2.0,
                        **REWEIGHT_SCALE.widget(),
                        "step": 0.1,
                        "tooltip": "Factor on the attention to the words: >1 strengthens, <1 weakens, 0 removes, <0 inverts.",
                    },
                ),
            },
            "optional": {
                "p2p_edit": ("P2P_EDIT", {"tooltip": "Optional: reweight this edit's newest target."}),
                "prompt": _text("", "With no p2p_edit: the prompt to generate and reweight (source = target)."),
            },
            "hidden": HIDDEN,
        }

    def edit(self, words: str, scale: float, p2p_edit: edits.P2PEdit | None = None, prompt: str = "", unique_id: str | None = None) -> tuple:
        node = node_label(self.NODE_NAME, unique_id)
        check_prompt_weights(prompt, node, "prompt")
        return (edits.reweight(p2p_edit, prompt, words, scale, node, parsed_words),)
