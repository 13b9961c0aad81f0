"""P2P Controller: encodes the edit's prompts, patches the model and lays out the latent batch."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..p2p_attention.columns import Columns
from ..p2p_attention.controller import CONTROLLER, DEFAULT_SELF_REPLACE, SELF_REPLACE_DOWNSCALES, P2PController as Controller, build_plan
from ..p2p_attention.edits import P2PEdit, parse_word_values
from ..p2p_attention.errors import P2PError
from ..p2p_attention.ranges import FRACTION
from .edit_nodes import fraction_input
from .invert_node import check_inverted_latent
from .patch import CONDITIONING_KEY, SUPPORTED, install, layout_of, percent_to_sigma
from .tokenize import encode_prompt


def batched_conditioning(conds: list[torch.Tensor], extras: list[dict], columns: list[Columns], key: str) -> list:
    """One CONDITIONING whose batch rows are the prompts, in order: ComfyUI gives latent row i the
    conditioning row i. Each prompt's columns are placed as ``columns`` says (repeated to a common
    length for UNets, padded for DiTs: see p2p_attention/columns.py).

    Of the encoders' other outputs the pooled vectors are batched; T5 / Qwen attention masks are left
    out, as the supported models do not use them for the text's keys (the controller masks its own
    padding). ``key`` marks the conditioning as the controller's (the sampler's hook checks it).
    """
    rows = []
    for cond, placed in zip(conds, columns):
        row = cond.new_zeros(1, placed.count, cond.shape[-1])
        row[:, placed.spread_index.to(cond.device)] = cond.repeat(1, placed.copies, 1)
        rows.append(row)
    pooled = [e.get("pooled_output") for e in extras]
    # Present even where the encoder has none (Chroma's T5), as CLIP Text Encode gives it.
    batched = {"pooled_output": torch.cat(pooled) if all(p is not None for p in pooled) else None, CONDITIONING_KEY: key}
    return [[torch.cat(rows), batched]]


def shared_noise_latent(latent: dict, images: int) -> dict:
    """The latent repeated once per image, with one ``batch_index`` so that every image starts
    from the same noise in KSampler, KSamplerAdvanced and SamplerCustom."""
    samples = latent["samples"]
    if samples.shape[0] != 1:
        raise P2PError(
            CONTROLLER,
            "latent",
            f"the latent has a batch of {samples.shape[0]}; the controller makes the batch itself "
            "(the source followed by one image per target).",
            "give it a batch-1 latent (Empty Latent Image with batch_size 1, or one encoded image).",
        )
    index = latent.get("batch_index", [0])[0]
    out = {key: value for key, value in latent.items() if key not in ("samples", "batch_index", "noise_mask")}
    out["samples"] = samples.repeat(images, *([1] * (samples.dim() - 1)))  # 4-D, or 5-D (Qwen-Image)
    out["batch_index"] = [index] * images
    if "noise_mask" in latent:
        out["noise_mask"] = latent["noise_mask"]
    return out


class P2PController:
    DESCRIPTION = (
        "Prompt-to-Prompt: generates the source image and the edited images together from the same "
        "noise, injecting the source's attention into the edits. Plug model -> sampler model, "
        "positive -> sampler positive (any negative prompt), latent -> sampler latent_image; the "
        "decoded batch is the source followed by the edits. Deterministic samplers (euler, ddim, "
        "dpmpp_2m, uni_pc, heun, lms, ...) work in the stock KSampler. Ancestral, SDE and lcm samplers "
        "draw separate noise per image there: use SamplerCustom with P2P Shared Noise Sampler."
    )
    CATEGORY = "P2P"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("model", "positive", "latent")
    OUTPUT_TOOLTIPS = (
        "The model with the attention edit patched in (a clone; the input model is unchanged).",
        "The source and target prompts as one batched conditioning: use as the sampler's positive.",
        "One latent per image (source first) sharing one noise: use as the sampler's latent_image.",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": f"An {SUPPORTED} model (the DiT ones need ComfyUI v0.3.64 or later, Flux.2 v0.3.75)."}),
                "clip": ("CLIP", {"tooltip": "The model's CLIP, used to tokenize and encode the edit's prompts."}),
                "p2p_edit": ("P2P_EDIT", {"tooltip": "From P2P Word Swap, P2P Refine or P2P Reweight."}),
                "latent": (
                    "LATENT",
                    {"tooltip": "A batch-1 latent: Empty Latent Image, or an encoded / inverted image."},
                ),
                "cross_replace_steps": fraction_input(
                    0.6,
                    "Fraction of the schedule (from the start, as ComfyUI's start/end percent) during which "
                    "the edits take the source's cross-attention maps. Higher keeps more of the source; "
                    "lower lets refined words act earlier (the paper uses 0.8). Reweighted words are edited "
                    "over the whole schedule unless cross_replace_words gives them a window.",
                ),
                "self_replace_steps": fraction_input(
                    0.4,
                    "Fraction of the schedule during which the edits take the source's self-attention "
                    "(layout and shapes). Lower lets the edit change shape more; typical 0.2-0.6.",
                ),
            },
            "optional": {
                "cross_replace_words": (
                    "STRING",
                    {
                        "multiline": False,
                        "default": "",
                        "tooltip": "Per-word cross_replace_steps (0 to 1) for words of the target prompts, e.g. "
                        "'lasagne: 0.2, pizza: 0.5' (the paper's dictionary form).",
                    },
                ),
                "self_replace_resolution": (
                    list(SELF_REPLACE_DOWNSCALES),
                    {
                        "default": DEFAULT_SELF_REPLACE,
                        "tooltip": "The layers whose self-attention the edits take from the source, by map size relative "
                        "to the latent: '1/4 and coarser' is the official implementation's choice (16x16 maps and "
                        "smaller at 512 px); '1/2 and coarser' also takes the 32x32 maps, holding the layout tighter.",
                    },
                ),
            },
        }

    def apply(
        self,
        model: Any,
        clip: Any,
        p2p_edit: P2PEdit,
        latent: dict,
        cross_replace_steps: float,
        self_replace_steps: float,
        cross_replace_words: str = "",
        self_replace_resolution: str = DEFAULT_SELF_REPLACE,
    ) -> tuple:
        if clip is None:
            raise P2PError(CONTROLLER, "clip", "no CLIP is connected.", "connect the checkpoint loader's CLIP output.")
        if not isinstance(p2p_edit, P2PEdit):
            raise P2PError(CONTROLLER, "p2p_edit", "this input is not a P2P edit.", "connect P2P Word Swap, Refine or Reweight.")
        cross_replace_steps = FRACTION.check(cross_replace_steps, CONTROLLER, "cross_replace_steps")
        self_replace_steps = FRACTION.check(self_replace_steps, CONTROLLER, "self_replace_steps")
        words = parse_word_values(cross_replace_words, cross_replace_steps, CONTROLLER, "cross_replace_words", FRACTION) if cross_replace_words.strip() else []
        if self_replace_resolution not in SELF_REPLACE_DOWNSCALES:
            raise P2PError(CONTROLLER, "self_replace_resolution", f"{self_replace_resolution!r} is not one of {list(SELF_REPLACE_DOWNSCALES)}.",
                           "pick one of the listed choices.")
        check_inverted_latent(model, latent)
        prompts = [p2p_edit.source] + [t.prompt for t in p2p_edit.targets]
        encoded = {text: encode_prompt(clip, text) for text in prompts}
        plan = build_plan(p2p_edit, lambda text: encoded[text][0], cross_replace_steps, self_replace_steps, words,
                          SELF_REPLACE_DOWNSCALES[self_replace_resolution])
        controller = Controller(plan, percent_to_sigma(model), *layout_of(model))
        width = controller.columns_width or math.lcm(*(len(encoded[t][0]) for t in prompts))
        columns = controller.prompt_columns(width)
        positive = batched_conditioning([encoded[t][1] for t in prompts], [encoded[t][2] for t in prompts], columns, controller.key)
        return install(model, controller), positive, shared_noise_latent(latent, controller.images)
