"""Where the ComfyUI versions this pack supports differ, one small named shim each.

Everything else in the adapter is one code path for both the March-2024 ComfyUI (a28a9dc) and
current ComfyUI (v0.3.75, late 2025). Each shim says which version does what.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

import torch
import comfy.model_sampling
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


def is_flow(model: Any) -> bool:
    """Whether the model is a rectified flow (``x = (1 - sigma) x0 + sigma eps``). The 2024 host has
    no flow models (no ``CONST`` class)."""
    return isinstance(model_sampling(model), getattr(comfy.model_sampling, "CONST", ()))


_FROM_LATENT_CLASSES: dict[type, type] = {}


def _from_given_latent_class(base: type) -> type:
    """``base`` with ``noise_scaling`` adding the noise (as ``base`` scales it) to the latent as it
    is: only flow models differ, whose own rule scales the latent by ``1 - sigma``."""

    def noise_scaling(self: Any, sigma: Any, noise: torch.Tensor, latent_image: torch.Tensor, max_denoise: bool = False) -> torch.Tensor:
        return latent_image + base.noise_scaling(self, sigma, noise, torch.zeros_like(latent_image), max_denoise)

    if base not in _FROM_LATENT_CLASSES:
        _FROM_LATENT_CLASSES[base] = type(f"FromGivenLatent{base.__name__}", (base,), {"noise_scaling": noise_scaling})
    return _FROM_LATENT_CLASSES[base]


def sample_from_given_latent(model: Any) -> None:
    """Make the samplers of ``model`` (a clone; patched in place) start from the latent they are given.

    An inverted latent already is the latent at the top of the schedule, the sampler's own state.
    Epsilon models start there anyway (``latent + sigma * noise``, noise 0 without added noise);
    flow models would start from ``(1 - sigma) * latent + sigma * noise``, which is 0 at sigma 1.
    The model sampling is replaced (an object patch, as ComfyUI's ModelSampling* nodes do) by a
    shallow copy of the model's own whose class overrides only ``noise_scaling``.
    """
    sampling = model_sampling(model)
    if type(sampling) in _FROM_LATENT_CLASSES.values():
        return
    patched = copy.copy(sampling)
    patched.__class__ = _from_given_latent_class(type(sampling))
    model.add_object_patch("model_sampling", patched)


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
