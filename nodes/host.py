"""Where the ComfyUI versions this pack supports differ, one small named shim each.

Everything else in the adapter is one code path for both the March-2024 ComfyUI (a28a9dc) and
current ComfyUI (v0.3.75, late 2025). Each shim says which version does what.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import comfy.samplers

COND, UNCOND = 0, 1  # ComfyUI's chunk labels in ``cond_or_uncond``


def model_sampling(model: Any) -> Any:
    """The model's noise schedule object, including any model-sampling patch.

    Current: ``get_model_object``; 2024: the ``object_patches`` entry, else the model's own.
    """
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    return model.object_patches.get("model_sampling", model.model.model_sampling)


def input_scale(model: Any) -> Callable[[float], float]:
    """sigma -> the factor by which ComfyUI scales the model's input (``1 / sqrt(1 + sigma^2)`` for
    epsilon and v-prediction, 1 for flow models), from the model's own ``calculate_input``."""
    sampling = model_sampling(model)
    return lambda sigma: float(sampling.calculate_input(torch.tensor([float(sigma)]), torch.ones(1)).flatten()[0])


def schedule(model: Any, scheduler: str, steps: int) -> list[float]:
    """The sigmas KSampler / KSamplerAdvanced use for ``scheduler`` and ``steps`` (denoise 1).

    Current: ``calculate_sigmas(model_sampling, ...)``; 2024: ``calculate_sigmas_scheduler``, which
    reads ``.model_sampling`` of what it is given.
    """
    sampling = model_sampling(model)
    if hasattr(comfy.samplers, "calculate_sigmas"):
        sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps)
    else:
        holder = type("Sampling", (), {"model_sampling": sampling})()
        sigmas = comfy.samplers.calculate_sigmas_scheduler(holder, scheduler, steps)
    return [float(s) for s in sigmas]


def predict_branch(base: Any, conds: list, branch: int, x: torch.Tensor, sigma: float, options: dict) -> torch.Tensor:
    """One branch's prediction (``x0``) through ComfyUI's conditioning path, the branch labelled as
    the sampler labels it (other packs' patches look at ``cond_or_uncond``).

    Current: ``calc_cond_batch``; 2024: ``calc_cond_uncond_batch``.
    """
    timestep = x.new_full((x.shape[0],), sigma)
    if hasattr(comfy.samplers, "calc_cond_batch"):
        pair = [conds, None] if branch == COND else [None, conds]
        return comfy.samplers.calc_cond_batch(base, pair, x, timestep, options)[branch]
    cond, uncond = (conds, None) if branch == COND else ([], conds)
    return comfy.samplers.calc_cond_uncond_batch(base, cond, uncond, x, timestep, options)[branch]


def sampler_conds(model_k: Any, extra_args: dict) -> tuple[Any, list, list]:
    """(BaseModel, processed positive, processed negative) inside a sampler function.

    Current: on the guider (``model_k.inner_model.conds``); 2024: in ``extra_args``.
    """
    guider = model_k.inner_model
    if "cond" in extra_args:
        return guider.inner_model, extra_args["cond"], extra_args["uncond"]
    return guider.inner_model, guider.conds["positive"], guider.conds["negative"]


def post_cfg_scale(args: dict) -> float | None:
    """The cfg a post-CFG hook runs at: current ComfyUI passes ``cond_scale``; the 2024 host does
    not (None: the caller recovers it from the predictions)."""
    return args.get("cond_scale")


def encode_tokens(clip: Any, tokens: dict) -> tuple[torch.Tensor, dict]:
    """The conditioning ``[1, columns, width]`` of tokenized text and the encoder's other outputs.

    Current: ``encode_from_tokens(return_dict=True)`` (pooled output, attention masks, ...); 2024:
    ``(cond, pooled)``.
    """
    if "return_dict" in inspect.signature(clip.encode_from_tokens).parameters:
        out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        return out.pop("cond"), out
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, {"pooled_output": pooled}
