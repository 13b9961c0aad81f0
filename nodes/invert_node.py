"""P2P DDIM Invert: a real image's latent inverted along the sampler's schedule, a model that
samples it back (null-text embeddings per step, direct-inversion corrections, mismatch checks) and
the sampler that retraces the method's steps (FireFlow's own, else Euler).

Every model evaluation of the inversion goes through ComfyUI's own conditioning path (the
``calc_cond_batch`` of a ``sample_custom`` run with our own sampler function), so pooled outputs,
SDXL size conditioning, area conds, other packs' patches and model wrappers all apply as in the
sampler. Null-text's gradient pass runs the same path with autograd on; see ``_UnetCalls``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils

from ..p2p_attention.controller import CONTROLLER
from ..p2p_attention.errors import P2PError
from ..p2p_attention.ranges import Range
from ..p2p_attention.inversion import (
    FIREFLOW,
    INVERT,
    METHODS,
    NULL_TEXT,
    InvertedPath,
    ddim_inversion,
    fireflow_inversion,
    fireflow_sample,
    null_text_inversion,
    recovered_cfg,
)
from .host import (
    COND,
    UNCOND,
    input_scale,
    is_flow,
    model_sampling,
    post_cfg_scale,
    predict_branch,
    sample_from_given_latent,
    sampler_conds,
    schedule,
)
from .patch import find_controller

INVERSION_KEY = "p2p_inversion"  # entry of the inverted LATENT: its inversion, for the controller's check
# The numeric inputs' ranges: the widgets' min / max and the check in ``invert``.
STEPS, CFG = Range(1, 1000, integer=True), Range(0.0, 100.0)
ITERATIONS, EARLY_STOP = Range(1, 100, integer=True), Range(0.0, 1.0)

def _tiled(embedding: torch.Tensor, rows: int, tokens: int) -> torch.Tensor | None:
    """``embedding`` ``[1, T0, C]`` as ``rows`` rows of ``tokens`` columns, repeated as ComfyUI pads
    conditionings of different lengths; None if ``tokens`` is not a multiple of ``T0``."""
    if tokens % embedding.shape[1]:
        return None
    return embedding.repeat(1, tokens // embedding.shape[1], 1).expand(rows, -1, -1)


def with_uncond_context(c: dict, chunks: list[int], embedding: torch.Tensor, expected: torch.Tensor | None = None) -> dict:
    """The UNet call's conditioning with every unconditional row's context replaced by ``embedding``.

    ``expected``: the negative the embedding was optimised from; the sampler's must be the same.
    """
    context = c["c_crossattn"]
    rows = context.shape[0] // len(chunks)
    pieces = []
    for k, chunk in enumerate(chunks):
        piece = context[k * rows : (k + 1) * rows]
        if chunk == UNCOND:
            if expected is not None:
                wanted = _tiled(expected.to(piece), rows, piece.shape[1])
                scale = max(1.0, float(piece.abs().max()))
                if wanted is None or not torch.allclose(piece, wanted, rtol=0, atol=1e-5 * scale):
                    raise P2PError(
                        INVERT,
                        "negative",
                        "the sampler's negative conditioning is not the one null-text inversion started from.",
                        "connect the same negative CONDITIONING to the sampler and to P2P DDIM Invert.",
                    )
            piece = _tiled(embedding.to(piece.device), rows, piece.shape[1]).to(piece.dtype)
        pieces.append(piece)
    return {**c, "c_crossattn": torch.cat(pieces)}


def _call_unet(previous: Callable | None, apply_model: Callable, args: dict) -> torch.Tensor:
    """Run the UNet through the wrapper that was on the model before ours, if any."""
    if previous is not None:
        return previous(apply_model, args)
    return apply_model(args["input"], args["timestep"], **args["c"])


class _ApplyModel(torch.nn.Module):
    """``BaseModel.apply_model`` as a module call, so ``functional_call`` can swap its weights."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base.apply_model(*args, **kwargs)


def _trainable_alias(weight: torch.Tensor) -> torch.Tensor:
    """A normal tensor on the memory of ``weight``, an inference tensor that autograd may not save.

    DLPack hands the same storage to a new tensor made outside inference mode: the weights are not
    copied, which keeps null-text's memory at one forward and backward pass. A dtype DLPack cannot
    carry in an older PyTorch is copied instead.
    """
    with torch.inference_mode(False):
        try:
            return torch.utils.dlpack.from_dlpack(weight.detach())
        except (BufferError, RuntimeError, TypeError):
            return weight.detach().clone()


class _UnetCalls:
    """The inversion model's UNet wrapper: the unconditional context under optimisation, and, while
    gradients are on, weights autograd may save (ComfyUI's are inference tensors)."""

    def __init__(self, previous: Callable | None) -> None:
        self.previous = previous
        self.embedding: torch.Tensor | None = None
        self.module: _ApplyModel | None = None
        self.params: dict[str, torch.Tensor] | None = None

    def __deepcopy__(self, memo: dict) -> "_UnetCalls":
        return self

    def trainable(self, base: torch.nn.Module) -> None:
        self.module = _ApplyModel(base)
        self.params = {name: _trainable_alias(p) for name, p in self.module.named_parameters()}

    def __call__(self, apply_model: Callable, args: dict) -> torch.Tensor:
        if self.embedding is not None:
            args = {**args, "c": with_uncond_context(args["c"], args["cond_or_uncond"], self.embedding)}
        if torch.is_grad_enabled() and self.params is not None:
            module, params = self.module, self.params
            apply_model = lambda *a, **k: torch.func.functional_call(module, params, a, k)  # noqa: E731
        return _call_unet(self.previous, apply_model, args)


class NullTextContext:
    """Sampling: each step's unconditional rows (every image of the batch) take the embedding that
    null-text optimised for that step."""

    def __init__(self, inverted: InvertedPath, previous: Callable | None) -> None:
        self.inverted = inverted
        self.previous = previous

    def __deepcopy__(self, memo: dict) -> "NullTextContext":
        return self

    def __call__(self, apply_model: Callable, args: dict) -> torch.Tensor:
        chunks = args["cond_or_uncond"]
        if UNCOND in chunks:
            step = self.inverted.step_of(float(args["timestep"].max()))
            embedding = self.inverted.embeddings[step]
            args = {**args, "c": with_uncond_context(args["c"], chunks, embedding, self.inverted.negative)}
        return _call_unet(self.previous, apply_model, args)


class InversionSteps:
    """Sampling: the post-CFG check of every step against the inversion (schedule, start, cfg, path)
    and direct inversion's correction, applied to every row."""

    def __init__(self, inverted: InvertedPath) -> None:
        self.inverted = inverted

    def __deepcopy__(self, memo: dict) -> "InversionSteps":
        return self

    def __call__(self, args: dict) -> torch.Tensor:
        x, denoised = args["input"], args["denoised"]
        cfg = post_cfg_scale(args)
        if cfg is None:
            cfg = recovered_cfg(denoised, args["cond_denoised"], args["uncond_denoised"])
        step = self.inverted.check(x, float(args["sigma"].max()), cfg)
        return self.inverted.correct(denoised, x, step)


def check_inverted_latent(model: Any, latent: dict) -> None:
    """An inverted latent is sampled back only by the model its inversion returned: with another
    model the inversion's per-step data is silently ignored and the source is not the photo."""
    record = latent.get(INVERSION_KEY)
    if record is None:
        return
    hooks = model.model_options.get("sampler_post_cfg_function", [])
    if not any(isinstance(hook, InversionSteps) and hook.inverted is record for hook in hooks):
        raise P2PError(
            CONTROLLER,
            "model",
            "the latent comes from P2P DDIM Invert, but this model is not that node's model output, "
            "so the inversion would be ignored and the source image would not be the inverted photo.",
            "connect P2P DDIM Invert's model output to the P2P Controller's model input.",
        )


def _tooltip(kind: str, tooltip: str, **options: Any) -> tuple:
    return (kind, {"tooltip": tooltip, **options})


class P2PDDIMInvert:
    DESCRIPTION = (
        "Inverts an encoded image (VAE Encode) along the sampler's schedule so that Prompt-to-Prompt can edit it; "
        "SD1.x, SD2.x, SDXL and flow models (Flux.1, Flux.2, SD3.5, Qwen-Image, Chroma). "
        "Plug latent -> P2P Controller latent, model -> P2P Controller model, then sample with SamplerCustom "
        "(add_noise off, sampler from this node's sampler output, sigmas from BasicScheduler with the same steps and "
        "scheduler, the same cfg) or, except for fireflow, KSamplerAdvanced (add_noise disable, sampler ddim or euler). "
        "Methods: null-text (the paper's: optimises the negative per step, slow, best edits; needs cfg above 1, so not "
        "guidance-distilled Flux), direct (exact reconstruction at any cfg, no optimisation, one conditional forward per step), "
        "ddim (plain inversion: exact only at cfg 1 and many steps, drifts at high cfg), "
        "fireflow (flow models: a second-order solver, far closer than ddim at few steps, with its own sampler)."
    )
    CATEGORY = "P2P"
    RETURN_TYPES = ("LATENT", "MODEL", "SAMPLER")
    RETURN_NAMES = ("latent", "model", "sampler")
    OUTPUT_TOOLTIPS = (
        "The inverted latent (batch 1): the P2P Controller's latent input. Sample it without adding noise.",
        "The model with the inversion's per-step data and checks patched in (a clone): the P2P Controller's model input.",
        "The sampler that retraces the method's steps: FireFlow's for fireflow, else Euler (ddim). For SamplerCustom.",
    )
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": _tooltip(
                    "MODEL", "An SD1.x, SD2.x (also v-prediction), SDXL or flow model (Flux.1, Flux.2, SD3.5, Qwen-Image, Chroma): the one you sample with."
                ),
                "positive": _tooltip(
                    "CONDITIONING", "The source prompt, encoded: a description of the image, the same text as the P2P edit's source."
                ),
                "negative": _tooltip(
                    "CONDITIONING",
                    "The sampler's negative conditioning, connected to the sampler too. Null-text starts from it "
                    "(the paper: an empty prompt) and replaces it per step.",
                ),
                "latent": _tooltip("LATENT", "The image's latent from VAE Encode (batch 1)."),
                "steps": _tooltip("INT", "Sampling steps; the sampler must use the same. The paper uses 50.", default=50, **STEPS.widget()),
                "cfg": _tooltip(
                    "FLOAT",
                    "The sampler's cfg (1 for guidance-distilled Flux, whose guidance comes from FluxGuidance on the "
                    "positive). Null-text optimises for it and the sampler must use the same; the other methods do not depend on it.",
                    default=7.5, **CFG.widget(), step=0.1, round=0.01,
                ),
                "scheduler": _tooltip(
                    comfy.samplers.KSampler.SCHEDULERS,
                    "The sampler's scheduler; it must use the same. ddim_uniform is the paper's DDIM schedule.",
                    default="ddim_uniform",
                ),
                "method": _tooltip(
                    list(METHODS),
                    "null-text: optimises the unconditional embedding per step (paper; steps x iterations backward "
                    "passes; cfg above 1 only). direct: exact at any cfg by correcting each step, no optimisation. ddim: "
                    "plain inversion, exact only at cfg 1 and many steps. fireflow: flow models only, second-order "
                    "inversion (one model call per step), sample with this node's sampler output.",
                    default=NULL_TEXT,
                ),
                "null_text_iterations": _tooltip(
                    "INT", "Null-text: Adam iterations per step at most (the paper: 10).", default=10, **ITERATIONS.widget()
                ),
                "early_stop": _tooltip(
                    "FLOAT",
                    "Null-text: a step stops early when its loss is below this plus 2e-5 per step of 50 (the paper: 1e-5).",
                    default=1e-5, **EARLY_STOP.widget(), step=1e-6, round=False,
                ),
            }
        }

    def invert(
        self,
        model: Any,
        positive: list,
        negative: list,
        latent: dict,
        steps: int,
        cfg: float,
        scheduler: str,
        method: str,
        null_text_iterations: int = 10,
        early_stop: float = 1e-5,
    ) -> tuple:
        steps, cfg = STEPS.check(steps, INVERT, "steps"), CFG.check(cfg, INVERT, "cfg")
        null_text_iterations = ITERATIONS.check(null_text_iterations, INVERT, "null_text_iterations")
        early_stop = EARLY_STOP.check(early_stop, INVERT, "early_stop")
        samples = self._check(model, positive, negative, latent, method, cfg)
        sigmas = schedule(model, scheduler, steps)
        progress = comfy.utils.ProgressBar(steps * (1 + (null_text_iterations if method == NULL_TEXT else 0)))

        def tick() -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update(1)

        calls = _UnetCalls(model.model_options.get("model_function_wrapper"))
        inverting = model.clone()
        inverting.set_model_unet_function_wrapper(calls)
        sample_from_given_latent(inverting)  # the sampler function gets the image's latent itself
        found: dict[str, Any] = {}
        model_input_scale = input_scale(model)

        def sampler_function(model_k: Any, x: torch.Tensor, _sigmas: torch.Tensor, extra_args: dict, callback: Any = None, disable: Any = None) -> torch.Tensor:
            base, cond, uncond = sampler_conds(model_k, extra_args)
            options = extra_args["model_options"]
            denoise_cond = lambda x, s: predict_branch(base, cond, COND, x, s, options)  # noqa: E731
            if method == FIREFLOW:
                path = fireflow_inversion(x, sigmas, denoise_cond, tick)
            else:
                path = ddim_inversion(x, sigmas, denoise_cond, model_input_scale, tick)
            found["path"] = path
            if method == NULL_TEXT:
                start = negative[0][0].to(x.device, torch.float32)
                found["negative"] = start
                calls.trainable(base)

                def denoise_uncond(x: torch.Tensor, sigma: float, embedding: torch.Tensor) -> torch.Tensor:
                    calls.embedding = embedding
                    try:
                        return predict_branch(base, uncond, UNCOND, x, sigma, options)
                    finally:
                        calls.embedding = None

                found["embeddings"] = null_text_inversion(
                    path, sigmas, denoise_cond, denoise_uncond, start, cfg, null_text_iterations, early_stop, model_input_scale, tick
                )
            return path[0]

        noise = torch.zeros_like(samples)
        sampler = comfy.samplers.KSAMPLER(sampler_function)
        inverted = comfy.sample.sample_custom(
            inverting, noise, cfg, sampler, torch.tensor(sigmas), positive, negative, samples, disable_pbar=True, seed=0
        )
        record = InvertedPath(
            method=method,
            sigmas=sigmas,
            path=[z.detach() for z in found["path"]],
            cfg=cfg,
            scheduler=scheduler,
            embeddings=found.get("embeddings"),
            negative=found.get("negative"),
        )
        out = model.clone()
        sample_from_given_latent(out)
        if method == NULL_TEXT:
            out.set_model_unet_function_wrapper(NullTextContext(record, model.model_options.get("model_function_wrapper")))
        out.set_model_sampler_post_cfg_function(InversionSteps(record))
        sampler = comfy.samplers.KSAMPLER(fireflow_sample) if method == FIREFLOW else comfy.samplers.sampler_object("ddim")
        return {"samples": inverted.to(samples), INVERSION_KEY: record}, out, sampler

    @staticmethod
    def _check(model: Any, positive: list, negative: list, latent: dict, method: str, cfg: float) -> torch.Tensor:
        if method not in METHODS:
            raise P2PError(INVERT, "method", f"unknown method {method!r}.", f"choose one of {', '.join(METHODS)}.")
        flow = is_flow(model)
        if not flow and not isinstance(model_sampling(model), comfy.model_sampling.EPS):
            raise P2PError(
                INVERT,
                "model",
                f"{type(model.model).__name__} samples with {type(model_sampling(model)).__name__}, neither a "
                "noise-prediction diffusion model nor a rectified flow.",
                "load an SD1.x, SD2.x, SDXL, Flux, SD3.5, Qwen-Image or Chroma checkpoint.",
            )
        if method == FIREFLOW and not flow:
            raise P2PError(
                INVERT,
                "method",
                f"fireflow is a solver for rectified-flow models; {type(model.model).__name__} is a diffusion model.",
                "choose direct (exact) or null-text for SD1.x, SD2.x and SDXL.",
            )
        if method == NULL_TEXT and math.isclose(cfg, 1.0):
            raise P2PError(
                INVERT,
                "cfg",
                "null-text optimises the sampler's unconditional (negative) branch, and at cfg 1 there is none: "
                "guidance-distilled models such as Flux.1 dev (guidance from FluxGuidance, cfg 1) and Flux schnell never use one.",
                "choose method direct (exact at any cfg) or fireflow (flow models); or, for a model sampled with a "
                "negative prompt, set cfg above 1 here and in the sampler.",
            )
        if find_controller(model) is not None:
            raise P2PError(
                INVERT,
                "model",
                "this model already carries a Prompt-to-Prompt edit: inversion needs the plain model.",
                "connect the checkpoint's model here, and this node's model output to the P2P Controller.",
            )
        for name, cond in (("positive", positive), ("negative", negative)):
            if not cond:
                raise P2PError(INVERT, name, "the conditioning is empty.", "connect a CLIP Text Encode output.")
        samples = latent["samples"]
        if samples.shape[0] != 1:
            raise P2PError(
                INVERT,
                "latent",
                f"the latent has a batch of {samples.shape[0]}; one image is inverted at a time.",
                "encode a single image (or pick one with Latent From Batch).",
            )
        return samples
