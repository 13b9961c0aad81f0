"""P2P Local Blend (an edit: where the targets may change) and P2P Local Blend Mask (the mask used)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..p2p_attention import edits
from ..p2p_attention.errors import P2PError
from .edit_nodes import HIDDEN, fraction_input, node_label, parsed_words
from .patch import installed_controller

VAE_DOWNSCALE = 8  # pixels per latent cell in SD1.x, SD2.x and SDXL
# The inputs of the nodes that look at a finished run: the sampler's output orders them after it.
RUN_INPUTS = {
    "model": ("MODEL", {"tooltip": "The P2P Controller's model, as plugged into the sampler."}),
    "samples": ("LATENT", {"tooltip": "The sampler's output: picks the run (and makes this node run after it)."}),
}


def _words(default: str, tooltip: str) -> tuple:
    return ("STRING", {"multiline": False, "default": default, "tooltip": tooltip})


class P2PLocalBlend:
    DESCRIPTION = (
        "Prompt-to-Prompt Local Blend: the edited images change only where the chosen words attend (or "
        "inside a mask you give); everywhere else they keep the source image. The region is the words' "
        "cross-attention at the coarse (16x16 at 512px) layers, averaged over the steps so far, max-pooled, "
        "normalised and thresholded, as in the paper. Put after the edit nodes, before P2P Controller; "
        "see the mask with P2P Local Blend Mask."
    )
    CATEGORY = "P2P"
    RETURN_TYPES = ("P2P_EDIT",)
    RETURN_NAMES = ("p2p_edit",)
    OUTPUT_TOOLTIPS = ("The edit with the local blend added, for P2P Controller.",)
    FUNCTION = "edit"
    NODE_NAME = "P2P Local Blend"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "p2p_edit": ("P2P_EDIT", {"tooltip": "The edit to confine (word swap, refine, reweight, several targets)."}),
                "source_words": _words("cat", "Words of the source prompt whose region may change, comma separated (e.g. the replaced object)."),
                "target_words": _words("dog", "Words of the target prompt(s) whose region may change (e.g. the new object). Either list may be empty."),
                "subtract_words": _words("", "Optional words whose region is cut out of the mask and kept from the source (e.g. 'bicycle')."),
                "threshold": fraction_input(0.3, "Normalised attention above which a pixel is in the region: lower grows the region. The paper uses 0.3."),
                "start_blend": fraction_input(
                    0.2, "Fraction of the schedule after which the blend applies (the first steps settle the maps). The paper uses 0.2."
                ),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional region you paint or make yourself (1 = may change); alone or with the words' region."}),
                "mask_combine": (
                    [edits.UNION, edits.INTERSECT],
                    {"default": edits.UNION, "tooltip": "With both words and a mask: 'union' changes either region, 'intersect' only where both agree."},
                ),
            },
            "hidden": HIDDEN,
        }

    def edit(
        self,
        p2p_edit: edits.P2PEdit,
        source_words: str,
        target_words: str,
        subtract_words: str,
        threshold: float,
        start_blend: float,
        mask: torch.Tensor | None = None,
        mask_combine: str = edits.UNION,
        unique_id: str | None = None,
    ) -> tuple:
        node = node_label(self.NODE_NAME, unique_id)
        blended = edits.local_blend(p2p_edit, source_words, target_words, subtract_words, threshold, start_blend, mask, mask_combine, node, parsed_words)
        return (blended,)


class P2PBlendMask:
    DESCRIPTION = (
        "The local blend mask of a finished P2P run: one mask per edited image (white = changed), at image "
        "size, as a MASK to reuse and as an IMAGE to look at. Connect the model the sampler used and the "
        "sampler's output latent."
    )
    CATEGORY = "P2P"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "image")
    OUTPUT_TOOLTIPS = ("One mask per edited image, at image size.", "The same masks as black-and-white images.")
    FUNCTION = "mask"
    NODE_NAME = "P2P Local Blend Mask"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": dict(RUN_INPUTS)}

    def mask(self, model: Any, samples: dict) -> tuple:
        _, run = find_run(model, samples, self.NODE_NAME)
        if run.blend_mask is None:
            raise P2PError(
                self.NODE_NAME,
                "model",
                "this run had no local blend (or it never started: start_blend is past the last step).",
                "add P2P Local Blend to the edit, or lower its start_blend.",
            )
        latent = samples["samples"]
        size = (latent.shape[-2] * VAE_DOWNSCALE, latent.shape[-1] * VAE_DOWNSCALE)
        mask = F.interpolate(run.blend_mask[:, None].float().cpu(), size=size, mode="nearest")[:, 0]
        return mask, mask[..., None].expand(-1, -1, -1, 3).contiguous()


def find_run(model: Any, samples: dict, node: str) -> tuple[Any, Any]:
    """``model``'s controller and its run that produced ``samples`` (never another run's maps)."""
    controller = installed_controller(model, node)
    latent = samples["samples"]
    try:
        return controller, controller.maps.run_of(model.model.process_latent_in(latent.to(torch.float32)))
    except LookupError:
        raise P2PError(
            node,
            "samples",
            f"no recent run of this model produced a latent of shape {tuple(latent.shape)}.",
            "connect the LATENT output of the sampler that used this model (before any upscale or crop).",
        ) from None
