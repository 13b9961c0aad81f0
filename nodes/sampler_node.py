"""P2P Shared Noise Sampler: ancestral and SDE samplers with one noise for every image of the batch.

Stochastic samplers draw fresh noise at every step; drawn per batch row, it would make the edited
images drift away from the source even where nothing was edited. This wraps any stock k-diffusion
sampler so that every row receives the noise of row 0 (a Brownian tree seeded by the sampler's seed,
as the SDE samplers use).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import comfy.samplers
from comfy.k_diffusion.sampling import BrownianTreeNoiseSampler

from ..p2p_attention.errors import P2PError

NODE_NAME = "P2P Shared Noise Sampler"
TREE_TOLERANCE = 1e-6  # torchsde.BrownianTree's default tol, to which it rounds its ends


def shared_noise_sampler_function(sampler_function: Callable) -> Callable:
    """``sampler_function`` with a ``noise_sampler`` that gives every batch row the same noise."""

    def sample(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback: Any = None, disable: Any = None, **options: Any) -> torch.Tensor:
        seed = (extra_args or {}).get("seed")
        positive = sigmas[sigmas > 0]
        # torchsde's BrownianTree rounds its ends to its tolerance (6 decimals): a largest sigma
        # rounded down lies past the end ("Should have tb<=t1"). The ends are widened by that much.
        low, high = float(positive.min()) - TREE_TOLERANCE, float(sigmas.max()) + TREE_TOLERANCE
        row = BrownianTreeNoiseSampler(x[:1], max(low, 0.0), high, seed=seed)
        options["noise_sampler"] = lambda sigma, sigma_next: row(sigma, sigma_next).expand_as(x)
        return sampler_function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)

    return sample


class P2PSampler:
    DESCRIPTION = (
        "Makes ancestral, SDE and LCM samplers (euler_ancestral, dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m_sde, lcm, "
        "...) share their per-step noise across the source and the edited images, so a Prompt-to-Prompt "
        "edit keeps the source's composition. Put between KSamplerSelect and SamplerCustom. "
        "Deterministic samplers pass through unchanged (they need nothing)."
    )
    CATEGORY = "P2P"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("The sampler, drawing one noise for the whole batch; plug into SamplerCustom.",)
    FUNCTION = "wrap"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"sampler": ("SAMPLER", {"tooltip": "A stock sampler, e.g. from KSamplerSelect."})}}

    def wrap(self, sampler: Any) -> tuple:
        function = getattr(sampler, "sampler_function", None)
        if not isinstance(sampler, comfy.samplers.KSAMPLER) or function is None:
            if hasattr(sampler, "sample"):  # e.g. uni_pc in older ComfyUI: deterministic
                return (sampler,)
            raise P2PError(NODE_NAME, "sampler", f"{type(sampler).__name__} is not a ComfyUI sampler.", "connect KSamplerSelect's SAMPLER output.")
        if "noise_sampler" not in inspect.signature(function).parameters:
            return (sampler,)  # deterministic: no per-step noise to share
        return (comfy.samplers.KSAMPLER(shared_noise_sampler_function(function), sampler.extra_options, sampler.inpaint_options),)
