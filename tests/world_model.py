"""The tiny world model: a text-to-image model in ComfyUI's real SD1.x architecture, trained on the
synthetic world of ``world_scenes`` by ``scripts/train_world.py``.

Like ``tiny_models``, it is a test-only subclass of ComfyUI's real ``SD15`` model config with small
widths, put first in ``comfy.supported_models.models`` so that the stock CheckpointLoaderSimple
loads ``WORLD_CHECKPOINT``. Everything else is ComfyUI's: ``UNetModel``, the CLIP text model
(``SDClipModel``, CLIP-L's last layer after the final layer norm, as SD1.x) with the real CLIP
tokenizer, SD1.x's eps prediction and noise schedule (shifted to end at a higher noise level for the
smaller latent, see ``SAMPLING_SETTINGS``), and TAESD as the VAE. (The stock loader builds
a KL autoencoder only at its full width of 128 channels, ~80M parameters; a TAESD found in a
checkpoint's ``first_stage_model.`` keys it loads as it is.)

The layout mirrors SD1.5's at 1/4 of its latent size and 1/10 of its width, for 128 px images
(16x16 latents): four levels (1/1, 1/2, 1/4, 1/8 of the latent), cross-attention at the first three
and in the middle block, as SD1.5 has at 64/32/16 (and 8 in the middle). So the maps P2P reads
exist at every resolution SD1.5 has them, relative to the latent: Local Blend's 1/4 (4x4 here,
16x16 in SD1.5) and the two choices of self-attention replacement (1/2 and coarser, or 1/4 and
coarser).

A model family names how a family's checkpoint is built, trained and saved; ``sd15`` is the one
implemented. A DiT family (ComfyUI's ``comfy.ldm.flux``) would add its own entry with a flow
matching loss, and the training script would train it unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import tiny_models

REPO = Path(__file__).resolve().parents[1]
WORLD_CHECKPOINT = REPO / "tests" / "data" / "world_sd15.safetensors"
WORLD_CHECKPOINT_NAME = "world_sd15.safetensors"  # its name in a checkpoints folder

TEXT_WIDTH = 48
TEXT_CONFIG = tiny_models.text_config(TEXT_WIDTH, "quick_gelu", layers=4, heads=4)

UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "adm_in_channels": None,
    "num_res_blocks": [1, 1, 1, 1],
    "channel_mult": [1, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": TEXT_WIDTH,
}
HEADS = 4
# SD1.x's noise schedule, shifted for a latent 4x smaller than SD1.5's (Hoogeboom et al. 2023, "simple
# diffusion"): SD1.5's schedule (linear_end 0.012) ends at sigma 14.6, where a 16x16 latent's mean colour
# and the layout of its 5x5-cell objects still show through the noise (signal-to-noise about 1), so a
# model trained with it reads the background and the places from the seed's noise, not from the
# caption. Ending at 0.02 gives sigma 66 (4.5x), with the low-noise steps as SD1.5's.
SAMPLING_SETTINGS = {"linear_end": 0.02}
MATCH_KEYS = ("context_dim", "model_channels", "use_linear_in_transformer", "adm_in_channels", "use_temporal_attention",
              "transformer_depth", "channel_mult", "num_res_blocks")

_REGISTERED: dict[str, type] = {}


def _world_sd15_class() -> type:
    import comfy.supported_models as supported
    import comfy.supported_models_base as base

    encoder = tiny_models.text_encoder_class("world_l", "clip_l", TEXT_CONFIG, projected_pooled=False)

    class WorldSD15(supported.SD15):
        """SD15 with the world model's widths: matched only by its own UNet."""

        unet_config = {k: UNET_CONFIG[k] for k in MATCH_KEYS}
        unet_extra_config = {**supported.SD15.unet_extra_config, "num_heads": HEADS, "num_head_channels": -1}
        sampling_settings = SAMPLING_SETTINGS

        def clip_target(self, state_dict: Any = None) -> Any:
            return base.ClipTarget(tiny_models.single_tokenizer_class("l", TEXT_WIDTH, True), tiny_models.single_clip_class("l", encoder))

    return WorldSD15


def register_world_architecture() -> type:
    """Put the world model's config first in ComfyUI's model registry (idempotent; after boot)."""
    import comfy.supported_models as supported

    if "sd15" not in _REGISTERED:
        _REGISTERED["sd15"] = _world_sd15_class()
    cls = _REGISTERED["sd15"]
    if cls not in supported.models:
        supported.models.insert(0, cls)
    return cls


# --- model families: what the training script needs of one --------------------------------------

@dataclass
class Parts:
    """A family's trainable modules: the denoiser, the text encoder and the VAE, as ComfyUI builds them."""

    config: Any  # the registered model config (supported_models_base.BASE)
    model: Any  # comfy.model_base.BaseModel: .diffusion_model, .model_sampling
    clip: Any  # comfy.sd.CLIP: .tokenizer, .cond_stage_model
    vae: torch.nn.Module  # comfy.taesd.taesd.TAESD

    def text_encoder(self) -> torch.nn.Module:
        """The module CLIPTextEncode runs: ``SDClipModel`` (``forward(token lists) -> (cond, pooled)``)."""
        return self.clip.cond_stage_model.clip_l

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """What ``text_encoder()`` computes for rows of 77 token ids, as one batched call
        (``SDClipModel.forward`` walks every token of every row in Python, the bulk of a GPU training
        step). v0.3.75's ``SDClipModel``; ``scripts/train_world.py`` checks it against the stock path.
        ``tokens`` stay on the CPU, where their lengths are read without waiting for the GPU."""
        encoder = self.text_encoder()
        before_end = (tokens == encoder.special_tokens["end"]).int().cumsum(1) == 0
        num_tokens = (before_end.sum(1) + 1).tolist()  # up to and including the first end token
        device = encoder.transformer.get_input_embeddings().weight.device
        embeds = encoder.transformer.get_input_embeddings()(tokens.to(device), out_dtype=torch.float32)
        outputs = encoder.transformer(None, None, embeds=embeds, num_tokens=num_tokens, intermediate_output=encoder.layer_idx,
                                      final_layer_norm_intermediate=encoder.layer_norm_hidden_state, dtype=torch.float32)
        return outputs[0].float() if encoder.layer == "last" else outputs[1].float()

    def trainable(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.model.diffusion_model, "text": self.text_encoder()}


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], Parts]
    loss: Callable[[Parts, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]  # (parts, latents, cond, generator)
    state_dict: Callable[[Parts], dict[str, torch.Tensor]]  # the checkpoint, as ComfyUI saves one


def _reset(module: torch.nn.Module) -> None:
    """Default PyTorch initialisation for every layer (ComfyUI's layers skip it: they expect weights
    to be loaded); normalisations 1 / 0, embeddings N(0, 0.02)."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.modules.conv._ConvNd):
                torch.nn.modules.conv._ConvNd.reset_parameters(sub)
            elif isinstance(sub, torch.nn.Linear):
                torch.nn.Linear.reset_parameters(sub)
            elif isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if sub.weight is not None:
                    sub.weight.fill_(1.0)
                    sub.bias.zero_()
            elif isinstance(sub, torch.nn.Embedding):
                sub.weight.normal_(0.0, 0.02)


def _build_sd15() -> Parts:
    import comfy.sd
    import comfy.taesd.taesd

    cls = register_world_architecture()
    config = cls(json.loads(json.dumps(UNET_CONFIG)))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    clip = comfy.sd.CLIP(config.clip_target())
    vae = comfy.taesd.taesd.TAESD()
    for module in (model.diffusion_model, clip.cond_stage_model, vae):
        _reset(module)
    # ComfyUI builds text encoders frozen (SDClipModel.freeze) and in float16 (where AdamW's moments
    # underflow to inf at the first step): this one learns, in float32 like the UNet.
    clip.cond_stage_model.requires_grad_(True).to(torch.float32)
    with torch.no_grad():
        vae.vae_scale.fill_(config.latent_format.scale_factor)
        clip.cond_stage_model.clip_l.logit_scale.fill_(4.6055)
    return Parts(config, model, clip, vae)


def _sd15_loss(parts: Parts, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SD1.x's training objective: eps prediction at a uniform discrete timestep of its schedule,
    the input scaled as ComfyUI's EPS model sampling scales it (x = x0 + sigma * eps)."""
    sampling = parts.model.model_sampling
    steps = torch.randint(0, len(sampling.sigmas), (latents.shape[0],), generator=generator)
    sigma = sampling.sigmas[steps].to(latents)[:, None, None, None]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    noisy = latents + sigma * noise
    prediction = parts.model.diffusion_model(noisy / (sigma**2 + 1).sqrt(), timesteps=steps.to(latents.device).float(), context=cond)
    return torch.nn.functional.mse_loss(prediction, noise)


def _sd15_state_dict(parts: Parts) -> dict[str, torch.Tensor]:
    vae_sd = dict(parts.vae.state_dict())
    vae_sd.setdefault("vae_shift", torch.tensor(0.0))
    return parts.model.state_dict_for_saving(parts.clip.get_sd(), vae_sd, None)


FAMILIES: dict[str, Family] = {"sd15": Family("sd15", _build_sd15, _sd15_loss, _sd15_state_dict)}


def check_detection(state: dict[str, torch.Tensor]) -> None:
    """A written checkpoint must be detected as the world model's config, with its exact layout."""
    import comfy.model_detection

    detected = comfy.model_detection.detect_unet_config(state, "model.diffusion_model.")
    diff = {k: (detected.get(k), v) for k, v in UNET_CONFIG.items() if detected.get(k) != v}
    if diff:
        raise RuntimeError(f"world model UNet is detected with a different layout: {diff}")
    config = comfy.model_detection.model_config_from_unet(dict(state), "model.diffusion_model.")
    if type(config) is not register_world_architecture():
        raise RuntimeError(f"world model checkpoint is detected as {type(config).__name__}")


def install_world_checkpoint(checkpoints_dir: Path) -> str:
    """Link the committed checkpoint into a ComfyUI checkpoints folder; returns its file name there."""
    link = Path(checkpoints_dir) / WORLD_CHECKPOINT_NAME
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(WORLD_CHECKPOINT)
    return WORLD_CHECKPOINT_NAME
