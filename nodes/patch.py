"""Installing the controller on a ComfyUI model through the model patcher's attention replace API."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from comfy.ldm.modules.attention import optimized_attention

from ..p2p_attention.controller import CONTROLLER, AttentionCall, P2PController
from ..p2p_attention.errors import P2PError
from .host import model_sampling

Site = tuple[str, int, int]  # (block name, block number, transformer index): ComfyUI's patch key


def transformer_blocks(model: Any) -> dict[Site, Any]:
    """Every transformer block of the UNet, by its patch key."""
    unet = getattr(model.model, "diffusion_model", None)
    if not hasattr(unet, "input_blocks") or not hasattr(unet, "output_blocks"):
        raise P2PError(
            CONTROLLER,
            "model",
            f"{type(model.model).__name__} is not a UNet with SD-style attention blocks.",
            "load an SD1.x, SD2.x or SDXL checkpoint (Prompt-to-Prompt edits their text cross-attention).",
        )
    groups = [("input", unet.input_blocks), ("middle", [getattr(unet, "middle_block", None) or ()]), ("output", unet.output_blocks)]
    found = {}
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                for index, transformer in enumerate(getattr(layer, "transformer_blocks", ())):
                    found[(name, number, index)] = transformer
    return found


def attention_sites(model: Any) -> list[Site]:
    """Every transformer block with cross-attention in the UNet (16 in SD1.5, 70 in SDXL)."""
    sites = [site for site, block in transformer_blocks(model).items() if getattr(block, "attn2", None) is not None]
    if not sites:
        raise P2PError(
            CONTROLLER,
            "model",
            "this model has no cross-attention layers, so there is no text attention to edit.",
            "load an SD1.x, SD2.x or SDXL checkpoint.",
        )
    return sites


def percent_to_sigma(model: Any) -> Callable[[float], float]:
    """ComfyUI's schedule fraction -> sigma (as start/end percent in ControlNet and conditioning)."""
    return model_sampling(model).percent_to_sigma


def map_geometry(original_shape: list[int], queries: int) -> tuple[int, tuple[int, int]]:
    """How much smaller than the latent this layer's attention map is (1, 2, 4, ...), and its size."""
    height, width = original_shape[-2:]
    for downscale in (1, 2, 4, 8, 16, 32, 64):
        size = (math.ceil(height / downscale), math.ceil(width / downscale))
        if size[0] * size[1] == queries:
            return downscale, size
    raise RuntimeError(f"{queries} attention queries match no downscale of a {height}x{width} latent")


class AttentionPatch:
    """One replace patch: the controller's method for a site, over the patch it replaces (if any).

    ComfyUI deep-copies ``model_options`` on every clone; ``__deepcopy__`` returns ``self`` so the
    clones downstream (LoRA loaders, other patch nodes) share this patch instead of copying it.
    """

    def __init__(self, method: Callable, previous: Callable | None, site: tuple) -> None:
        self.method = method
        self.previous = previous
        self.site = site

    def __deepcopy__(self, memo: dict) -> "AttentionPatch":
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        downscale, map_size = map_geometry(extra_options["original_shape"], q.shape[1])
        call = AttentionCall(
            heads=heads,
            sigma=float(extra_options["sigmas"].max()),
            chunks=tuple(c == 0 for c in extra_options["cond_or_uncond"]),
            downscale=downscale,
            map_size=map_size,
            site=self.site,
        )
        if self.previous is None:
            attend = lambda q, k, v: optimized_attention(q, k, v, heads)  # noqa: E731
        else:
            attend = lambda q, k, v: self.previous(q, k, v, extra_options)  # noqa: E731
        return self.method(q, k, v, call, attend)


class AfterCFG:
    """The controller's post-CFG hook (local blend, the run's result); shared by clones like the patches."""

    def __init__(self, controller: P2PController) -> None:
        self.controller = controller

    def __deepcopy__(self, memo: dict) -> "AfterCFG":
        return self

    def __call__(self, args: dict) -> torch.Tensor:
        return self.controller.after_cfg(args["denoised"], float(args["sigma"].max()))


def find_controller(model: Any) -> P2PController | None:
    """The controller that ``install`` put on ``model`` (or on the model it was cloned from), if any."""
    for hook in reversed(getattr(model, "model_options", {}).get("sampler_post_cfg_function", [])):
        if isinstance(hook, AfterCFG):
            return hook.controller
    return None


def installed_controller(model: Any, node: str) -> P2PController:
    """The controller on ``model``; an error naming ``node`` when there is none."""
    controller = find_controller(model)
    if controller is not None:
        return controller
    raise P2PError(node, "model", "this model carries no Prompt-to-Prompt edit.", "connect the P2P Controller's model output, the one the sampler used.")


def install(model: Any, controller: P2PController) -> Any:
    """A clone of ``model`` whose every attention site runs through ``controller``."""
    sites = attention_sites(model)
    patched = model.clone()
    replace = patched.model_options.get("transformer_options", {}).get("patches_replace", {})
    for kind, method, setter in (
        ("attn1", controller.self_attention, patched.set_model_attn1_replace),
        ("attn2", controller.cross_attention, patched.set_model_attn2_replace),
    ):
        existing = replace.get(kind, {})
        for site in sites:
            previous = existing.get(site, existing.get(site[:2]))
            setter(AttentionPatch(method, previous, site), site[0], site[1], site[2])
    patched.set_model_sampler_post_cfg_function(AfterCFG(controller))
    return patched
