"""Running P2P and plain generations on the real host with stock nodes, for mechanism tests."""
from __future__ import annotations

import math
from typing import Any

import torch

import tiny_models

NEGATIVE = "blurry, low quality"


# Node ids of ``controller_prompt``'s fixed nodes (the edit nodes take "2" on, so that their labels,
# "P2P Word Swap #3", say where they are in the chain).
CHECKPOINT_ID, LATENT_ID, CONTROLLER_ID, NEGATIVE_ID, SAMPLER_ID, CAPTURE_ID = "1", "10", "11", "12", "13", "14"


def controller_prompt(edits: list[dict], steps: int = 0, negative: str = "", capture: str = "out") -> dict:
    """An API prompt on the tiny SD1.5 checkpoint: the edit nodes ``edits`` (``{"class_type", "inputs"}``,
    ids "2" on, each fed the one before it, the last into the controller) -> P2P Controller -> with
    ``steps``, KSampler (euler, cfg 7, seed 1) on ``negative``, whose LATENT is captured as
    ``capture``; without, the controller's latent is captured."""
    prompt = {CHECKPOINT_ID: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_models.tiny_checkpoint_name("sd15")}}}
    for number, edit in enumerate(edits, start=2):
        chained = {"p2p_edit": [str(number - 1), 0]} if number > 2 else {}
        prompt[str(number)] = {"class_type": edit["class_type"], "inputs": {**edit["inputs"], **chained}}
    prompt[LATENT_ID] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt[CONTROLLER_ID] = {"class_type": "P2PController", "inputs": {
        "model": [CHECKPOINT_ID, 0], "clip": [CHECKPOINT_ID, 1], "p2p_edit": [str(len(edits) + 1), 0], "latent": [LATENT_ID, 0],
        "cross_replace_steps": 0.8, "self_replace_steps": 0.4}}
    captured = [CONTROLLER_ID, 2]
    if steps:
        prompt[NEGATIVE_ID] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [CHECKPOINT_ID, 1], "text": negative}}
        prompt[SAMPLER_ID] = {"class_type": "KSampler", "inputs": {
            "model": [CONTROLLER_ID, 0], "seed": 1, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": [CONTROLLER_ID, 1], "negative": [NEGATIVE_ID, 0], "latent_image": [CONTROLLER_ID, 2], "denoise": 1.0}}
        captured = [SAMPLER_ID, 0]
    prompt[CAPTURE_ID] = {"class_type": "TestCaptureLatent", "inputs": {"value": captured, "key": capture}}
    return prompt


def controller_of(host: Any, model: Any) -> Any:
    """The P2P controller installed on a patched model (every hook shares it)."""
    return host.pack.nodes.patch.find_controller(model)


def empty_latent(model: Any, size: int) -> dict:
    """The stock empty latent for the model: 4 channels for SD, 16 for Flux.1, SD3 and Qwen-Image, at
    1/8 of the image; Flux.2's 128 at 1/16 (EmptyFlux2LatentImage)."""
    channels = getattr(model.model.latent_format, "latent_channels", 4)
    downscale = 16 if channels == 128 else 8
    return {"samples": torch.zeros(1, channels, size // downscale, size // downscale)}


def p2p(host: Any, model: Any, clip: Any, edit: Any, cross: float = 0.8, self_: float = 0.4, words: str = "", size: int = 64) -> tuple:
    """(patched model, positive, latent) from the P2P Controller node."""
    with torch.inference_mode():
        return host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(model, clip, edit, empty_latent(model, size), cross, self_, words)


def sample(host: Any, model: Any, clip: Any, positive: Any, latent: dict, sampler: str = "euler", steps: int = 4, cfg: float = 7.5, seed: int = 3, scheduler: str = "normal") -> torch.Tensor:
    """A stock KSampler run; returns the sampled latent."""
    with torch.inference_mode():
        negative = host.nodes.CLIPTextEncode().encode(clip, NEGATIVE)[0]
        out = host.nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)[0]
    return out["samples"]


def plain(host: Any, model: Any, clip: Any, prompt: str, size: int = 64, **kwargs: Any) -> torch.Tensor:
    """An ordinary generation of ``prompt`` (batch 1) with the same noise as a P2P run's rows."""
    with torch.inference_mode():
        positive = host.nodes.CLIPTextEncode().encode(clip, prompt)[0]
    return sample(host, model, clip, positive, empty_latent(model, size), **kwargs)


def edits(host: Any) -> Any:
    return host.pack.p2p_attention.edits


def swap(host: Any, source: str, target: str, previous: Any = None) -> Any:
    return edits(host).add_target(previous, source, target, edits(host).WORD_SWAP, "P2P Word Swap")


def refine(host: Any, source: str, target: str) -> Any:
    return edits(host).add_target(None, source, target, edits(host).REFINE, "P2P Refine")


def reweight(host: Any, words: str, scale: float, previous: Any = None, prompt: str = "") -> Any:
    return edits(host).reweight(previous, prompt, words, scale, "P2P Reweight")


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding, which depends on the batch size: within 1e-4 of the latent's
    scale (an untrained eps model's latents reach |x| ~ 200)."""
    scale = max(1.0, float(expected.abs().max()))
    difference = float((actual - expected).abs().max())
    assert difference <= 1e-4 * scale, f"max difference {difference:.3g} > 1e-4 x {scale:.3g}"


class MapRecorder:
    """Keeps every cross-attention map the controller reports (conditional branch): per call, the
    images' maps ``[queries, tokens]`` stacked (the prompts of these tests have equal token counts)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, torch.Tensor]] = []

    def record(self, call: Any, rows: slice, maps: list[torch.Tensor]) -> None:
        block = torch.stack(maps).clone()
        if rows.start == 0:
            self.calls.append((call, block))
        else:  # the call's next block of queries
            self.calls[-1] = (call, torch.cat([self.calls[-1][1], block], dim=1))


def steer_attention(host: Any, model: Any, column: int, gain: float = 12.0) -> Any:
    """A clone of ``model`` whose every cross-attention attends to conditioning column ``column``
    in the top-left quarter of the map: a region known in advance, for an untrained model.

    Through a stock ``attn2_patch`` (it runs before the projections), each query there is moved
    along ``W_q^+ k``, where ``k`` is that column's key: its score rises by ``gain`` logits in every
    head, so the token takes almost all of the attention there and keeps its own elsewhere.
    """
    modules = {site: block.attn2 for site, block in host.pack.nodes.patch.transformer_blocks(model).items()}

    def patch(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict) -> tuple:
        attention = modules[(extra["block"][0], extra["block"][1], extra["block_index"])]
        height, width = extra["original_shape"][-2:]
        size = next((-(-height // d), -(-width // d)) for d in (1, 2, 4, 8) if -(-height // d) * -(-width // d) == n.shape[1])
        key = attention.to_k(context[:, column])  # [batch, heads * dim_head]
        heads = attention.heads
        per_head = key.view(key.shape[0], heads, -1)
        step = gain * per_head.shape[-1] ** 0.5 / per_head.pow(2).sum(-1).min(dim=1).values
        direction = key @ torch.linalg.pinv(attention.to_q.weight.float()).T.to(key)
        region = torch.zeros(size, dtype=n.dtype, device=n.device)
        region[: size[0] // 2, : size[1] // 2] = 1
        return n + region.reshape(1, -1, 1) * (step[:, None, None] * direction[:, None, :]), context, value

    steered = model.clone()
    steered.set_model_attn2_patch(patch)
    return steered


def image_latent(host: Any, vae: Any, size: int = 64) -> dict:
    """A smooth synthetic image through the stock VAE Encode: what a user's photo becomes."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([xs, ys, 0.5 + 0.4 * torch.sin(6 * xs) * torch.cos(4 * ys)], dim=-1)[None]
    with torch.inference_mode():
        return host.nodes.VAEEncode().encode(vae, image)[0]


def psnr(out: torch.Tensor, original: torch.Tensor) -> float:
    """Latent-space PSNR against the original latent's own peak (tiny random models' latents are
    not in the usual range, so no fixed peak would mean anything)."""
    peak = float(original.abs().max())
    mse = float((out - original).double().pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def smooth(host: Any, model: Any, weight: float = 0.005, variance: float = 1.0) -> Any:
    """A clone whose denoiser is a Gaussian posterior mean plus ``weight`` times the tiny model's own
    correction, through a stock UNet wrapper (which the inversion chains to).

    A trained model's denoiser is smooth in the latent and the noise level; a random-weight model's
    is not, and no DDIM inversion retraces it (a round trip at cfg 1 gives about -10 dB). This keeps
    the real UNet or DiT, its conditioning and gradients in every prediction while making the
    trajectory as well behaved as a trained model's, so PSNRs mean what they mean on real checkpoints.
    The posterior mean is the model sampling's own: ``x = a * x0 + sigma * eps`` with ``a`` 1 for
    epsilon and v-prediction models, ``1 - sigma`` for flow models, and ``x0 ~ N(0, variance)``.
    """
    sampling = host.pack.nodes.host.model_sampling(model)

    def wrapper(apply_model, args):
        x = args["input"]
        sigma = args["timestep"].reshape(-1, *[1] * (x.ndim - 1))  # Qwen-Image latents have a frame axis
        a = sampling.noise_scaling(sigma, torch.zeros_like(x), torch.ones_like(x))
        prior = x * (a * variance / (a * a * variance + sigma**2))
        return prior + weight * (apply_model(x, args["timestep"], **args["c"]) - x)

    clone = model.clone()
    clone.set_model_unet_function_wrapper(wrapper)
    return clone
